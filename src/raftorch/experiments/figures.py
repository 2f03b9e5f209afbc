"""A panel's figure, drawn from its saved ``summary.csv`` only (so ``--redraw`` needs no training).

The layout of the paper's panels: test accuracy (mean ± std over seeds, error bars) against
the spec's ``figure.x`` (usually the feedback rank), one curve per series that varies ``x``
(split by ``figure.group``, e.g. the constrained layer or the number of classes K);
series without ``x`` (BP, a narrow BP net) are horizontal lines with their ±std band (one per
group value where they have one); the no-feedback control (the spec's ``control``) is a grey
dash-dot line, and chance (100 / classes, from ``summary.csv``'s ``chance``) a dotted one. The paper's published numbers, where the spec gives them,
are hollow diamonds (``x`` given) or dotted lines. Theory panels redraw Figure 2 from the
first seed's ``theory.json``. Written as ``figure.png`` and ``figure.pdf``.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

from raftorch.experiments.aggregate import done_values
from raftorch.training.summary import mean_std
from raftorch.experiments.spec import Panel


def _num(v) -> float | None:
    try:
        f = float(v)
        return f if math.isfinite(f) else None
    except (TypeError, ValueError):
        return None


def _stats(rows: list[dict], metric: str) -> tuple[float, float, int] | None:
    return mean_std(done_values(rows, metric))


def draw_panel(panel: Panel, rows: list[dict], folder: str | Path) -> list[Path]:
    """Draw ``figure.png`` and ``figure.pdf`` into ``folder`` from summary ``rows``."""
    folder = Path(folder)
    if panel.kind == "theory":
        return _draw_theory(panel, rows, folder)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_spec, metric = panel.figure, "test_accuracy"
    x = fig_spec.get("x", "rank")
    group = fig_spec.get("group")
    curves = [s for s in panel.series if x in s.variables]
    lines = [s for s in panel.series if x not in s.variables]
    xs_all = [r.get(x) for r in rows if r.get(x) not in (None, "")]
    numeric = bool(xs_all) and all(_num(v) is not None for v in xs_all)
    order = sorted({str(v) for v in xs_all}, key=lambda v: (_num(v) if numeric else 0, v))
    if not numeric:
        order = [str(v) for v in dict.fromkeys(str(v) for v in xs_all)]
    pos = (lambda v: float(v)) if numeric else (lambda v: order.index(str(v)))  # noqa: E731

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color_of: dict[str, str] = {}

    def color(key: str) -> str:
        if key not in color_of:
            color_of[key] = colors[len(color_of) % len(colors)]
        return color_of[key]

    groups = sorted({r.get(group) for r in rows if group and r.get(group) not in (None, "")},
                    key=lambda g: (_num(g) if _num(g) is not None else math.inf, str(g))) if group else [None]
    counts: dict[tuple, int] = {}
    for r in rows:
        if r.get("status") == "done":
            key = (r["series"], *(str(r.get(v, "")) for v in panel.variables))
            counts[key] = counts.get(key, 0) + 1
    lo, hi = (min(counts.values()), max(counts.values())) if counts else (len(panel.seeds),) * 2
    n_seeds = f"{lo}" if lo == hi else f"{lo}-{hi}"
    def color_key(series: str, g) -> str:  # one colour per group value when one series is split
        return f"{group}={g}" if g is not None and len(curves) <= 1 else f"{series}|{g}"

    for s in curves:
        for g in groups:
            mine = [r for r in rows if r["series"] == s.name and (g is None or str(r.get(group)) == str(g))]
            pts = []
            for v in {str(r.get(x)) for r in mine}:
                st = _stats([r for r in mine if str(r.get(x)) == v], metric)
                if st:
                    pts.append((pos(v), *st))
            if not pts:
                continue
            pts.sort()
            label = s.name if g is None else (f"{s.name}, {group} = {g}" if len(curves) > 1 else f"{group} = {g}")
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        ms=4, capsize=3, lw=1.5, color=color(color_key(s.name, g)), label=label)
    for s in lines:
        mine = [r for r in rows if r["series"] == s.name]
        split = sorted({str(r.get(group)) for r in mine if group and r.get(group) not in (None, "")},
                       key=lambda g: (_num(g) if _num(g) is not None else math.inf, g)) or [None]
        for g in split:
            st = _stats([r for r in mine if g is None or str(r.get(group)) == g], metric)
            if not st:
                continue
            m, sd, _ = st
            label = s.name if g is None else f"{s.name}, {group} = {g}"
            control = s.name == panel.control
            c = ("black" if g is None and s.name.upper() == "BP" else "0.45" if control
                 else color(color_key(s.name, g)))
            ax.axhline(m, color=c, ls="-." if control else "--", lw=1.2, label=f"{label} ({m:.1f})")
            ax.axhspan(m - sd, m + sd, color=c, alpha=0.12, lw=0)
    chances = sorted({float(r["chance"]) for r in rows if _num(r.get("chance")) is not None})
    for k, level in enumerate(chances):
        ax.axhline(level, color="0.6", ls=":", lw=1, label="chance" if k == 0 else None)
    for pub in panel.published:
        v = pub.get(x)
        if v is not None and (not numeric or _num(v) is not None):
            if not numeric and str(v) not in order:
                continue
            ax.plot([pos(v)], [pub["value"]], marker="D", ms=6, mfc="none", mec="0.3", ls="none")
        else:
            ax.axhline(pub["value"], color="0.4", ls=":", lw=1)
    if any(pub.get(x) is not None for pub in panel.published):
        ax.plot([], [], marker="D", ms=6, mfc="none", mec="0.3", ls="none", label="paper (published)")
    if any(pub.get(x) is None for pub in panel.published):
        ax.plot([], [], color="0.4", ls=":", lw=1, label="paper reference (published)")
    if numeric:
        scale = fig_spec.get("xscale", "linear")
        if scale == "log":
            ax.set_xscale("log", base=2)
        ticks = sorted({float(v) for v in order})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.minorticks_off()
    else:
        ax.set_xticks(range(len(order)))
        labels = fig_spec.get("labels", order)
        crowded = sum(len(str(t)) for t in labels) > 60  # e.g. an ablation's variant names
        ax.set_xticklabels(labels, rotation=35 if crowded else 0, ha="right" if crowded else "center",
                           fontsize=8 if crowded else None)
    ax.set_xlabel(fig_spec.get("xlabel", x))
    ax.set_ylabel(fig_spec.get("ylabel", "test accuracy (%), final epoch"))
    ax.set_title(textwrap.fill(f"{panel.paper or panel.id}: {fig_spec.get('title', panel.title)}", 80) + "\n"
                 f"{panel.profile} profile, mean ± std over {n_seeds} seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="best", framealpha=0.85)
    fig.tight_layout()
    paths = [folder / "figure.png", folder / "figure.pdf"]
    for p in paths:
        fig.savefig(p, dpi=110)
    plt.close(fig)
    if panel.analysis:
        paths += _draw_fields(panel, rows, folder)
    return paths


# scores of an analysis panel drawn against the figure's x: summary column -> (label, file)
PLOTTED_SCORES = {"orientedness": ("orientedness", "orientedness.png"),
                  "field_dimensionality": ("field dimensionality", "dimensionality.png")}


def _draw_fields(panel: Panel, rows: list[dict], folder: Path) -> list[Path]:
    """``fields.png`` (the analysed layer's receptive fields of each point's first finished
    seed, one row per point, then one row per distinct initial net of those runs),
    ``orientedness.png`` and ``dimensionality.png`` (mean orientedness / field dimensionality ±
    std over seeds against the figure's ``x``; series without ``x`` as lines, and the initial
    nets' score as a line: the baseline), from the runs' saved files."""
    from raftorch.analysis.figure import draw_fields, draw_orientedness_vs_rank, init_row, load_fields

    x = panel.figure.get("x", "rank")
    sources, points, inits = {}, {m: [] for m in PLOTTED_SCORES}, {}
    for s in panel.series:
        mine = [r for r in rows if r["series"] == s.name and r.get("status") == "done"]
        others = [k for k in s.variables if k != x]  # grid variables besides x: one row / line each
        for key in dict.fromkeys(tuple(str(r.get(k, "")) for k in s.variables) for r in mine):
            values_of = dict(zip(s.variables, key))
            same = [r for r in mine if tuple(str(r.get(k, "")) for k in s.variables) == key]
            v = values_of.get(x, "")
            named = ", ".join([s.name] + [f"{k} = {values_of[k]}" for k in others])
            npz = folder / "runs" / same[0]["point"] / "receptive_fields.npz"
            if npz.exists():
                label = named if v == "" else f"{named}, {x} = {v}"
                sources[label] = saved = load_fields(npz)  # read once: the trained and the init row
                init = init_row(saved)
                if init is not None:  # one row per distinct initial net (seed, model options)
                    inits.setdefault(init["fields"].tobytes(), {**init, "label": f"initial net of\n{label}"})
            for metric in PLOTTED_SCORES:
                values = done_values(same, metric)
                if values:
                    points[metric].append({"series": named, "rank": _num(v), "values": values})
    out = []
    if sources:
        out.append(draw_fields([sources, *inits.values()], folder / "fields.png", max_channels=8))
    layer = panel.analysis.get("layer", "the retina")
    options = {p.id: p.config.get("model_options") or {} for p in panel.points()}
    for metric, (label, name) in PLOTTED_SCORES.items():
        points[metric] += _baselines(options, rows, f"init_{metric}")
        if points[metric]:
            out.append(draw_orientedness_vs_rank(points[metric], folder / name,
                                                 ylabel=label, xlabel=panel.figure.get("xlabel", x),
                                                 title=f"{panel.paper or panel.id}: {label} of {layer}"))
    return out


def _baselines(options: dict[str, dict], rows: list[dict], column: str) -> list[dict]:
    """The initial nets' score ``column`` as lines for :func:`draw_orientedness_vs_rank`: one
    value per distinct initial net (seed x model options; ``options`` maps each point id to its
    model options) among the finished runs, one line per model (labelled with the model options
    that differ, where the series use several)."""
    groups: dict[str, dict] = {}
    for r in rows:
        if r.get("status") == "done" and r.get(column) not in (None, ""):
            opts = options.get(r["point"], {})
            key = repr(sorted(opts.items()))
            groups.setdefault(key, {"options": opts, "values": {}})["values"][r.get("seed")] = float(r[column])
    out = []
    for g in groups.values():
        differ = [k for k in g["options"] if len({repr(o["options"].get(k)) for o in groups.values()}) > 1]
        which = ", ".join(f"{k} {g['options'][k]}" for k in differ)
        out.append({"series": f"at initialisation{', ' + which if which else ''} ({len(g['values'])} nets)",
                    "rank": None, "values": list(g["values"].values())})
    return out


def _draw_theory(panel: Panel, rows: list[dict], folder: Path) -> list[Path]:
    from raftorch.theory.figure import draw_figure

    done = sorted({r["point"] for r in rows if r.get("status") == "done"})
    if not done:
        return []
    source = folder / "runs" / done[0] / "theory.json"
    return [draw_figure(source, folder / "figure.png"), draw_figure(source, folder / "figure.pdf")]
