"""Figure 2 (paper section 3), drawn from a saved result file only.

Top row: mode strengths ``u_i^T W2 W1 v_i`` against flow time ``t = step * lr`` (lines: the
ODE; dots: the SGD simulation; dashed: the true ``s_i``). Bottom row: relative error
``||W2 W1 - A|| / ||A||`` (black) and, for rules with a ``P``, the alignment ``|Pi_P p_i|^2`` of
``P`` with the targets' principal directions (coloured, dashed).
"""
from __future__ import annotations

import os
from pathlib import Path

from raftorch.theory.result import TheoryResult, load_results


def _panels(meta: dict, results: list[TheoryResult]) -> list[dict]:
    if meta.get("panels"):
        return meta["panels"]
    seen = []
    for r in results:
        key = {"title": r.label, "rule": r.rule, "rank": r.rank}
        if key not in seen:
            seen.append(key)
    return seen


def draw_figure(json_path: str | os.PathLike, png_path: str | os.PathLike, dpi: int = 90) -> Path:
    """Redraw the Figure-2 PNG at ``png_path`` from the JSON written by ``save_results``."""
    meta, results = load_results(json_path)
    fig = build_figure(meta, results, source=json_path)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


def build_figure(meta: dict, results: list, source="results"):
    """The Figure-2 matplotlib figure of ``results`` (top row: mode strengths, ODE lines and SGD
    dots; bottom row: relative error and P's alignment per mode), with one legend below the
    panels so that it covers no curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(meta, results)
    if not panels:
        raise ValueError(f"{source} holds no results to draw")
    fig, axes = plt.subplots(2, len(panels), figsize=(3.1 * len(panels), 5.6), sharex=True,
                             squeeze=False, gridspec_kw={"height_ratios": [3, 2]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, panel in enumerate(panels):
        top, bottom = axes[0, col], axes[1, col]
        runs = {r.method: r for r in results if r.rule == panel["rule"] and r.rank == panel["rank"]}
        if not runs:
            top.set_title(f"{panel['title']}\n(no result)", fontsize=9)
            continue
        first = runs.get("ode", next(iter(runs.values())))
        for i, s in enumerate(first.strengths):
            c = colors[i % len(colors)]
            top.axhline(s, color=c, ls="--", lw=0.8, alpha=0.7)
            if "ode" in runs:
                top.plot(runs["ode"].times, runs["ode"].mode_strength_trajectory[:, i], color=c, lw=1.6)
            if "sim" in runs:
                sim = runs["sim"]
                k = max(1, len(sim.times) // 25)
                top.plot(sim.times[::k], sim.mode_strength_trajectory[::k, i], "o", color=c, ms=2.5)
        top.set_title(f"{panel['title']}\nerror {first.relative_error:.3f}, "
                      f"{len(first.recovered())}/{len(first.strengths)} modes", fontsize=9)
        bottom.plot(first.times, first.relative_error_trajectory, color="k", lw=1.4)
        if first.alignment_trajectory is not None:
            for i in range(first.alignment_trajectory.shape[1]):
                bottom.plot(first.times, first.alignment_trajectory[:, i], color=colors[i % len(colors)],
                            ls="--", lw=1.0)
        bottom.set_ylim(-0.03, 1.05)
        bottom.set_xlabel("t = step x lr")
    axes[0, 0].set_ylabel("mode strength $u_i^T W_2 W_1 v_i$")
    axes[1, 0].set_ylabel("error / alignment")
    # one legend for the whole figure, below the panels, so that no curve is covered: the
    # colour is the mode in both rows (strength on top, P's alignment with it below)
    from matplotlib.lines import Line2D

    n_modes = max((len(r.strengths) for r in results), default=0)
    handles = [Line2D([], [], color=colors[i % len(colors)], lw=1.6, label=f"mode {i + 1}") for i in range(n_modes)]
    handles += [Line2D([], [], color="0.3", lw=1.6, label="ODE"),
                Line2D([], [], color="0.3", marker="o", ms=3, ls="none", label="SGD"),
                Line2D([], [], color="0.3", ls="--", lw=0.8, label="target strength (top)"),
                Line2D([], [], color="k", lw=1.4, label="relative error (bottom)"),
                Line2D([], [], color="0.3", ls="--", lw=1.0,
                       label="P alignment with mode i (bottom, in the mode's colour)")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7.5, frameon=False)
    task = meta.get("task", {})
    if task:
        fig.suptitle(
            f"Linear network {task.get('n_in')}-{task.get('n_hidden')}-{task.get('n_out')}, d = "
            f"{len(task.get('strengths', []))}, N = {task.get('n_samples')}, noise {task.get('noise')}, "
            f"seed {task.get('seed')}", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig
