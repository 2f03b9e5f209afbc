"""Figures of receptive fields and their scores, drawn from saved files only.

* :func:`draw_fields`: a grid of fields, one row per run (a ``receptive_fields.npz`` written
  by :func:`raftorch.analysis.analyze_run`, or the same keys in a dict), one column per
  channel; each field in grey with a colour scale symmetric about 0 (its own ``max |F|``:
  mid-grey is 0, white positive, black negative), titled with its orientedness ``O`` and
  centre-surround index ``C``.
* :func:`init_row`: the fields of a run's initial net (saved beside the trained ones) as a
  row of that grid, the baseline to read the trained fields against.
* :func:`draw_orientedness_vs_rank`: mean ± std over seeds of a score against the feedback
  rank (log x), one curve per series with ranks; series without a rank (BP, the dRAF
  bottleneck model) are horizontal lines with a ±std band.

Files are written atomically (PNG, matplotlib's Agg backend: no display needed).
"""
from __future__ import annotations

import json
import math
import statistics
import textwrap
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from raftorch.training.checkpoint import atomic_write

_LINESTYLES = ("--", ":", "-.")

__all__ = ["draw_fields", "draw_orientedness_vs_rank", "init_row", "load_fields"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: str | Path) -> Path:
    out = Path(out_png)
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=120), "wb")
    _pyplot().close(fig)
    return out


def load_fields(path: str | Path) -> dict[str, Any]:
    """The contents of a ``receptive_fields.npz`` as a dict of numpy arrays and strings (0-d
    string arrays become ``str``); ``label`` defaults to the name of its folder."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        row = {k: (str(z[k]) if z[k].dtype.kind == "U" and z[k].ndim == 0 else z[k]) for k in z.files}
    row.setdefault("label", path.parent.name)
    return row


def init_row(source: str | Path | Mapping[str, Any]) -> dict[str, Any] | None:
    """The fields of a run's **initial** net, from its ``receptive_fields.npz`` (a path, or
    the dict :func:`load_fields` made of it), as a row for :func:`draw_fields` (labelled "at
    init." and the run folder), or ``None`` for a file written before the baseline was saved."""
    row = load_fields(source) if isinstance(source, (str, Path)) else source
    if "init_fields" not in row:
        return None
    return {"fields": row["init_fields"], "orientedness": row["init_orientedness"],
            "centre_surround_index": row["init_centre_surround_index"],
            **{k: row[k] for k in ("channels", "layer", "method") if k in row},
            "label": f"at init.\n{row['label']}"}


def _rows(source) -> list[dict[str, Any]]:
    if isinstance(source, (str, Path)):
        return [load_fields(source)]
    if isinstance(source, Mapping) and "fields" in source:
        return [dict(source)]
    if isinstance(source, Mapping):  # label -> npz path or dict
        return [{**_rows(v)[0], "label": str(k)} for k, v in source.items()]
    return [r for item in source for r in _rows(item)]


def draw_fields(source, out_png: str | Path, *, max_channels: int = 16) -> Path:
    """Draw a grid of receptive fields into ``out_png``.

    Args:
        source: a ``receptive_fields.npz`` path, a dict with its keys (``fields``
            ``(channels, H, W)``; optional ``orientedness``, ``centre_surround_index``,
            ``channels``, ``layer``, ``method``, ``label``), a mapping ``label -> path or dict``,
            or a list of these. One row each. Scores missing from a row are computed from its
            fields (:mod:`raftorch.analysis.scores`).
        max_channels: the first this many channels of each row are drawn.
    """
    from raftorch.analysis.scores import centre_surround_index, orientedness

    rows = _rows(source)
    if not rows:
        raise ValueError("draw_fields needs at least one row of fields")
    plt = _pyplot()
    ncols = max(min(len(r["fields"]), max_channels) for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.25 * ncols + 0.9, 1.45 * len(rows) + 0.3),
                             squeeze=False)
    for i, row in enumerate(rows):
        fields = np.asarray(row["fields"], dtype=np.float64)
        o = np.asarray(row["orientedness"]) if "orientedness" in row else orientedness(fields).numpy()
        c = (np.asarray(row["centre_surround_index"]) if "centre_surround_index" in row
             else centre_surround_index(fields).numpy())
        chans = np.asarray(row.get("channels", np.arange(len(fields))))
        for j in range(ncols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= min(len(fields), max_channels):
                ax.axis("off")
                continue
            m = float(np.abs(fields[j]).max()) or 1.0
            ax.imshow(fields[j], cmap="gray", vmin=-m, vmax=m, interpolation="nearest")
            ax.set_title(f"#{int(chans[j])} O {o[j]:.2f} C {c[j]:.2f}", fontsize=6.5)
        label = "\n".join(textwrap.fill(part, 24) for part in str(row.get("label", f"row {i + 1}")).split("\n"))
        layer = row.get("layer")
        axes[i, 0].set_ylabel(label + (f"\n{layer}" if layer else ""), fontsize=6.5)
    method = {str(r.get("method")) for r in rows if r.get("method") is not None}
    fig.suptitle("receptive fields" + (f" ({', '.join(sorted(method))})" if method else "")
                 + ": O orientedness, C centre-surround index", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title
    return _save(fig, out_png)


def _load_points(points) -> list[dict[str, Any]]:
    if isinstance(points, (str, Path)):
        points = json.loads(Path(points).read_text())
    if isinstance(points, Mapping):
        points = points.get("points", [])
    return [dict(p) for p in points]


def _mean_std(p: Mapping[str, Any]) -> tuple[float, float] | None:
    values = [float(v) for v in p.get("values", []) if v is not None and math.isfinite(float(v))]
    if values:
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
    if p.get("mean") is not None:
        return float(p["mean"]), float(p.get("std") or 0.0)
    return None


def draw_orientedness_vs_rank(points, out_png: str | Path, *, ylabel: str = "orientedness",
                              xlabel: str = "feedback rank r", title: str | None = None) -> Path:
    """Mean ± std over seeds of a score against the rank (log x).

    Args:
        points: a list of dicts, or the path of a JSON file holding that list (or
            ``{"points": [...]}``). Each: ``series`` (name), ``rank`` (a number, or ``null``
            for a series without a rank: BP, the dRAF bottleneck model), and either
            ``values`` (one score per seed, e.g. each run's mean orientedness: the mean and
            sample std are taken here) or ``mean`` and ``std``.
        ylabel, xlabel, title: axis labels and title.

    Series with ranks are error-bar curves; a series without a rank is a dashed horizontal
    line at its mean with a ±std band, labelled with its name (dashed, then dotted, then
    dash-dotted).
    """
    pts = _load_points(points)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.9))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    series = list(dict.fromkeys(str(p.get("series", "")) for p in pts))
    ranked = [s for s in series if any(p.get("rank") is not None and str(p.get("series", "")) == s for p in pts)]
    ranks = [float(p["rank"]) for p in pts if p.get("rank") is not None]
    lo, hi = (min(ranks), max(ranks)) if ranks else (1.0, 2.0)
    if hi <= lo:
        hi = lo * 2
    n_lines = 0
    for i, s in enumerate(series):
        color = colors[i % len(colors)]
        mine = [p for p in pts if str(p.get("series", "")) == s]
        if s in ranked:
            xy = sorted((float(p["rank"]), *st) for p in mine if p.get("rank") is not None
                        for st in [_mean_std(p)] if st)
            if xy:
                x, m, sd = zip(*xy)
                ax.errorbar(x, m, yerr=sd, marker="o", ms=4, capsize=3, color=color, label=s)
            continue
        st = next((st for p in mine for st in [_mean_std(p)] if st), None)
        if st is None:
            continue
        m, sd = st
        ax.axhline(m, ls=_LINESTYLES[n_lines % len(_LINESTYLES)], color=color, lw=1.4, label=s)
        n_lines += 1
        if sd:
            ax.axhspan(m - sd, m + sd, color=color, alpha=0.12, lw=0)
    ax.set_xscale("log")
    ax.set_xlim(lo / 1.3, hi * 1.3)
    if ranks:
        ticks = sorted(set(ranks))
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    if series:
        ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out_png)
