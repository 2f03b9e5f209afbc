"""What a study panel adds to a paper panel's figure: how its points got there, and each point
against references, all from the saved run folders (so ``--redraw`` needs no training).

Asked for by the spec's ``figure`` mapping:

``history: {gaps: [[A, B], ...]}``
    ``history.png``: test accuracy against the epoch (every scored epoch: the spec's
    ``eval_every``), mean over seeds with the seeds' range as a band, a colour per series and a
    line style per value of the figure's ``x``; and, where the runs tracked
    ``error_alignment``, one panel per feedback series at the largest ``x``: each layer's angle
    between the error it receives and backprop's against the epoch (mean over seeds, colour =
    depth). ``gaps.csv``: for every pair ``A - B`` of series, every value of ``x`` and every
    scored epoch, the paired difference of test accuracy and its 95% interval
    (:func:`raftorch.experiments.stats.difference`).
``table: {against: [{series: ..., <variable>: ...}, ...]}``
    ``differences.csv``: every point's test accuracy (mean, std, seeds), its difference from
    each reference point with the 95% interval (paired over common seeds), and the mean over
    layers of the final angle between each layer's feedback matrix and ``W^T``
    (``alignment_deg``: 0 is backprop's feedback; about 90 unrelated), from ``final.json``.

Both read ``metrics.jsonl`` / ``final.json`` of finished runs only; a point without finished
runs is left out.
"""
from __future__ import annotations

import json
import math
import statistics
import textwrap
from pathlib import Path
from typing import Any

from raftorch.training import checkpoint as ckpt
from raftorch.experiments import stats
from raftorch.experiments.aggregate import panel_dir, run_dir, run_status, to_csv
from raftorch.experiments.claims import signed
from raftorch.experiments.spec import Panel, Point

__all__ = ["histories", "gap_rows", "difference_rows", "draw_history", "write_study", "study_lines", "STUDY_FILES"]

STUDY_FILES = ("history.png", "gaps.csv", "differences.csv")


def _records(folder: Path) -> list[dict]:
    path = folder / ckpt.METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _key(panel: Panel, p: Point) -> tuple:
    """A point without its seed: ``(series, *grid values as text)``."""
    return (p.series, *(str(p.values.get(v, "")) for v in panel.variables))


def _find(hist: dict, panel: Panel, series: str, x: str | None, xv: str) -> tuple | None:
    """The key of ``series`` at ``x = xv`` in ``hist`` (any key of the series when the panel
    has no ``x`` variable)."""
    at = 1 + panel.variables.index(x) if x in panel.variables else None
    return next((k for k in hist if k[0] == series and (at is None or k[at] == xv)), None)


def histories(root: str | Path, panel: Panel, points: list[Point]) -> dict[tuple, dict[int, list[dict]]]:
    """``{(series, *grid values as text): {seed: [epoch records]}}`` of the finished runs."""
    out: dict[tuple, dict[int, list[dict]]] = {}
    for p in points:
        folder = run_dir(root, panel, p)
        if run_status(folder) != "done":
            continue
        out.setdefault(_key(panel, p), {})[p.seed] = _records(folder)
    return out


def _scored(records: list[dict], metric: str = "test_accuracy") -> dict[int, float]:
    """``{epoch: 100 * metric}`` of the epochs where ``metric`` was measured."""
    return {int(r["epoch"]): 100 * float(r[metric]) for r in records if r.get(metric) is not None}


def gap_rows(panel: Panel, hist: dict, pairs: list[list[str]]) -> list[dict[str, Any]]:
    """Per pair ``[A, B]`` of series, value of the grid and scored epoch: ``A - B`` in test
    accuracy (points), paired over common seeds, with its 95% interval."""
    rows = []
    for a_name, b_name in pairs:
        for key, a_seeds in hist.items():
            if key[0] != a_name:
                continue
            b_seeds = hist.get((b_name, *key[1:]))
            if not b_seeds:
                continue
            a_by_epoch = {s: _scored(r) for s, r in a_seeds.items()}
            b_by_epoch = {s: _scored(r) for s, r in b_seeds.items()}
            epochs = sorted(set.intersection(*(set(e) for e in [*a_by_epoch.values(), *b_by_epoch.values()])))
            for epoch in epochs:
                a = {s: v[epoch] for s, v in a_by_epoch.items()}
                b = {s: v[epoch] for s, v in b_by_epoch.items()}
                iv = stats.difference(a, b)
                rows.append({"a": a_name, "b": b_name, **dict(zip(panel.variables, key[1:])), "epoch": epoch,
                             "difference": round(iv.estimate, 3),
                             "lo": round(iv.lo, 3) if math.isfinite(iv.lo) else "",
                             "hi": round(iv.hi, 3) if math.isfinite(iv.hi) else "",
                             "n": iv.n, "method": iv.method})
    return rows


def _final(folder: Path) -> dict:
    path = folder / ckpt.FINAL
    return json.loads(path.read_text()) if path.exists() else {}


def difference_rows(root: str | Path, panel: Panel, points: list[Point], against: list[dict]) -> list[dict]:
    """:data:`differences.csv <STUDY_FILES>`'s rows (module docstring)."""
    acc: dict[tuple, dict[int, float]] = {}
    angle: dict[tuple, list[float]] = {}
    for p in points:
        folder = run_dir(root, panel, p)
        if run_status(folder) != "done":
            continue
        final = _final(folder)
        key = _key(panel, p)
        acc.setdefault(key, {})[p.seed] = 100 * float(final["test_accuracy"])
        layers = [v for v in (final.get("alignment") or {}).values() if v is not None and math.isfinite(v)]
        if layers:
            angle.setdefault(key, []).append(statistics.fmean(layers))
    refs = []
    for ref in against:
        key = (ref["series"], *(str(ref.get(v, "")) for v in panel.variables))
        refs.append((" ".join(str(ref[k]) for k in ref), key))
    rows = []
    for key, sample in acc.items():
        values = list(sample.values())
        row = {"series": key[0], **dict(zip(panel.variables, key[1:])), "n": len(values),
               "test_accuracy_mean": round(statistics.fmean(values), 3),
               "test_accuracy_std": round(statistics.stdev(values), 3) if len(values) > 1 else "",
               "alignment_deg": round(statistics.fmean(angle[key]), 2) if key in angle else ""}
        for label, ref_key in refs:
            if ref_key in acc and ref_key != key:
                iv = stats.difference(sample, acc[ref_key])
                row[f"minus {label}"] = round(iv.estimate, 3)
                row[f"minus {label} lo"] = round(iv.lo, 3) if math.isfinite(iv.lo) else ""
                row[f"minus {label} hi"] = round(iv.hi, 3) if math.isfinite(iv.hi) else ""
        rows.append(row)
    return rows


def draw_history(panel: Panel, hist: dict, path: str | Path) -> Path:
    """``history.png`` (module docstring) from :func:`histories`' output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = panel.figure.get("x")
    xs = sorted({k[1 + panel.variables.index(x)] for k in hist} if x in panel.variables else {""},
                key=lambda v: (float(v) if _is_number(v) else math.inf, v))
    styles = dict(zip(xs, ["--", "-", ":", "-."] * 4)) if len(xs) > 1 else {xs[0]: "-"}
    series = list(dict.fromkeys(k[0] for k in hist))
    tracked = [s for s in series if _angles(hist, s, xs[-1], x, panel)]
    fig, axes = plt.subplots(1, 1 + len(tracked), figsize=(5.2 * (1 + len(tracked)), 4.2), squeeze=False)
    ax = axes[0][0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, s in enumerate(series):
        for v in xs:
            key = _find(hist, panel, s, x, v)
            if key is None:
                continue
            by_epoch: dict[int, list[float]] = {}
            for records in hist[key].values():
                for e, a in _scored(records).items():
                    by_epoch.setdefault(e, []).append(a)
            epochs = sorted(by_epoch)
            mean = [statistics.fmean(by_epoch[e]) for e in epochs]
            ax.plot(epochs, mean, styles[v], color=colors[i % len(colors)], marker="o", ms=3,
                    label=s + (f", {x} = {v}" if len(xs) > 1 else ""))
            ax.fill_between(epochs, [min(by_epoch[e]) for e in epochs], [max(by_epoch[e]) for e in epochs],
                            color=colors[i % len(colors)], alpha=0.12, lw=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("test accuracy (mean, band: seeds' range)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    lows = [min(_scored(r).values()) for seeds in hist.values() for r in seeds.values() if _scored(r)]
    tops = [max(_scored(r).values()) for seeds in hist.values() for r in seeds.values() if _scored(r)]
    if lows and tops:  # the control can sit far below: keep the feedback rules readable
        feedback = [min(_scored(r).values()) for k, seeds in hist.items() if k[0] != panel.control
                    for r in seeds.values() if _scored(r)]
        ax.set_ylim(max(min(feedback or lows) - 2, 0), max(tops) + 1)
    cmap = plt.get_cmap("viridis")
    for j, s in enumerate(tracked, start=1):
        ax = axes[0][j]
        layers, curves = _angles(hist, s, xs[-1], x, panel)
        for li, layer in enumerate(layers):
            epochs = sorted(curves[layer])
            ax.plot(epochs, [statistics.fmean(curves[layer][e]) for e in epochs],
                    color=cmap(li / max(len(layers) - 1, 1)), label=layer, lw=1.2)
        ax.set_xlabel("epoch")
        ax.set_ylabel("angle to backprop's error (degrees)")
        ax.set_title(f"{s}" + (f", {x} = {xs[-1]}" if len(xs) > 1 else "") + ": error received", fontsize=10)
        ax.set_ylim(0, 90)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(textwrap.fill(f"{panel.id}: {panel.title}", 60 * (1 + len(tracked))), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def _angles(hist: dict, series: str, xv: str, x: str | None, panel: Panel):
    """(layers in network order, {layer: {epoch: [angle per seed]}}) of ``error_alignment``
    for ``series`` at ``x = xv``; ``None`` when not tracked or all zero (backprop)."""
    key = _find(hist, panel, series, x, xv)
    if key is None:
        return None
    curves: dict[str, dict[int, list[float]]] = {}
    for records in hist[key].values():
        for r in records:
            for layer, a in (r.get("error_alignment") or {}).items():
                if a is not None and math.isfinite(a):
                    curves.setdefault(layer, {}).setdefault(int(r["epoch"]), []).append(a)
    if not curves or all(max(map(max, c.values())) < 1e-3 for c in curves.values()):
        return None
    return list(curves), curves


def write_study(root: str | Path, panel: Panel, points: list[Point]) -> list[Path]:
    """Write what ``panel.figure`` asks for (module docstring) into the panel's folder; returns
    the files written (none for a panel that asks for nothing)."""
    spec_history, spec_table = panel.figure.get("history"), panel.figure.get("table")
    if not spec_history and not spec_table:
        return []
    folder = panel_dir(root, panel)
    written = []
    if spec_history:
        hist = histories(root, panel, points)
        if hist:
            written.append(draw_history(panel, hist, folder / "history.png"))
            pairs = (spec_history or {}).get("gaps") or []
            rows = gap_rows(panel, hist, pairs)
            cols = ["a", "b", *panel.variables, "epoch", "difference", "lo", "hi", "n", "method"]
            ckpt.write_text(folder / "gaps.csv", to_csv(rows, cols))
            written.append(folder / "gaps.csv")
    if spec_table:
        rows = difference_rows(root, panel, points, spec_table.get("against") or [])
        cols = list(dict.fromkeys(k for r in rows for k in r))
        ckpt.write_text(folder / "differences.csv", to_csv(rows, cols))
        written.append(folder / "differences.csv")
    return written


def _read_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _iv(d: str, lo: str, hi: str) -> str:
    """A difference and its interval as the claims table writes them (:func:`claims.signed`)."""
    return signed(float(d)) + (f" [{signed(float(lo))}, {signed(float(hi))}]" if lo != "" and hi != "" else "")


def study_lines(panel: Panel, folder: str | Path) -> list[str]:
    """Markdown for the report from the study files in ``folder``: ``history.png``; the gaps as
    one row per pair and value of ``x``, one column per scored epoch (``A - B`` in points and
    its 95% interval); the differences table."""
    folder, lines = Path(folder), []
    if (folder / "history.png").exists():
        lines += [f"![{panel.id} history]({panel.id}/history.png)", ""]
    if (folder / "gaps.csv").exists():
        rows = _read_csv(folder / "gaps.csv")
        x = panel.figure.get("x")
        epochs = sorted({int(r["epoch"]) for r in rows})
        groups: dict[tuple, dict[int, str]] = {}
        for r in rows:
            groups.setdefault((r["a"], r["b"], r.get(x, "")), {})[int(r["epoch"])] = _iv(r["difference"], r["lo"], r["hi"])
        if groups:
            lines += ["Test accuracy difference A - B (points, 95% interval, paired by seed) at each scored epoch:", "",
                      f"| A - B | {x} | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
                      "|---|---|" + "---|" * len(epochs)]
            lines += [f"| {a} - {b} | {xv} | " + " | ".join(cells.get(e, "") for e in epochs) + " |"
                      for (a, b, xv), cells in groups.items()]
            lines.append("")
    if (folder / "differences.csv").exists():
        rows = _read_csv(folder / "differences.csv")
        refs = [k[len("minus "):] for k in (rows[0] if rows else {}) if k.startswith("minus ") and not k.endswith((" lo", " hi"))]
        variables = [v for v in panel.variables if rows and v in rows[0]]
        lines += ["Final test accuracy (mean ± std over seeds) and its difference from each reference (points, "
                  "95% interval, paired by seed); `B vs W^T`: the final angle between each layer's feedback "
                  "matrix and W^T, mean over layers (degrees):", "",
                  "| series | " + "".join(f"{v} | " for v in variables) + "n | accuracy | "
                  + "".join(f"- {ref} | " for ref in refs) + "B vs W^T |",
                  "|---|" + "---|" * (len(variables) + 2 + len(refs) + 1)]
        for r in rows:
            std = f" ± {float(r['test_accuracy_std']):.2f}" if r["test_accuracy_std"] else ""
            cells = [_iv(r[f"minus {ref}"], r[f"minus {ref} lo"], r[f"minus {ref} hi"]) if r.get(f"minus {ref}") else ""
                     for ref in refs]
            lines.append(f"| {r['series']} | " + "".join(f"{r[v]} | " for v in variables)
                         + f"{r['n']} | {float(r['test_accuracy_mean']):.2f}{std} | " + "".join(f"{c} | " for c in cells)
                         + (f"{float(r['alignment_deg']):.1f}" if r["alignment_deg"] else "") + " |")
        lines.append("")
    return lines
