"""``raftorch plot``: training curves of one or several runs, drawn from their saved
``metrics.jsonl`` only (never from a running process), one line per run and panel.

Panels (``--metrics``, default: every panel that some run logged, in this order):

=============  ==========================================================================
``loss``       train (solid), validation (dotted) and test (dashed) cross-entropy
``accuracy``   train, validation and test accuracy, same styles
``alignment``  angle between each layer's feedback matrix and ``W^T``, degrees (converted runs)
``error_alignment``
               angle between the error each layer receives and backprop's, degrees
               (``--track error_alignment``; 0 = backprop's error)
``subspace``   overlap of each layer's ``P`` with the top-``r`` principal subspace of the error
               it receives (``--track subspace``; 1 = aligned)
``error_dim``  participation ratio of each layer's backprop error (solid) and of the error it
               receives under its rule (dashed) (``--track subspace``)
=============  ==========================================================================

Any other key of the records can be named too: a number per epoch (``test_accuracy``,
``lr``) or a mapping of layer -> number (``error_dim_received``) gets a panel of its own.
Colour = run (the legend names the run folder and its rule and rank from ``config.yaml``);
in the per-layer panels the line style / marker says the layer (each panel's own legend).

Output: ``--out FILE`` (``.png``, ``.pdf`` or ``.svg``; written atomically); with one run the
default is ``RUN_DIR/curves.png``, with several runs ``--out`` is required (there is no one
folder they belong to).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raftorch.training import checkpoint as ckpt

__all__ = ["RunCurves", "load_run", "plot_curves", "PANELS", "add_arguments", "run"]

PANELS = ("loss", "accuracy", "alignment", "error_alignment", "subspace", "error_dim")
_SPLITS = (("train", "-"), ("val", ":"), ("test", "--"))
_LAYER_STYLES = [(ls, mk) for mk in ("", "o", "s", "^", "v", "D") for ls in ("-", "--", ":", "-.")]
_MARKERS = "osv^D<>pP*"
_TITLES = {"loss": "loss (cross-entropy)", "accuracy": "accuracy",
           "alignment": "alignment angle B vs W^T (degrees)",
           "error_alignment": "angle of the received error to backprop's (degrees)",
           "subspace": "subspace overlap of P (1 = aligned)",
           "error_dim": "error dimensionality (participation ratio)"}
_FORMATS = (".png", ".pdf", ".svg")


@dataclass
class RunCurves:
    """One run folder's records: ``name`` (the folder's name), ``label`` (name, rule, rank) and
    ``records`` (one mapping per epoch, from ``metrics.jsonl``)."""

    folder: Path
    name: str
    label: str
    records: list[dict[str, Any]] = field(default_factory=list)

    def series(self, key: str, sub: str | None = None) -> tuple[list[float], list[float]]:
        """``(epochs, values)`` of ``record[key]`` (or ``record[key][sub]``) where it is a
        finite number."""
        xs, ys = [], []
        for r in self.records:
            v = r.get(key)
            if sub is not None:
                v = v.get(sub) if isinstance(v, dict) else None
            if _number(v) and "epoch" in r:
                xs.append(r["epoch"])
                ys.append(float(v))
        return xs, ys

    def layers(self, key: str) -> list[str]:
        """The layer names of a per-layer mapping ``key``, in their order of first appearance."""
        return list(dict.fromkeys(k for r in self.records if isinstance(r.get(key), dict) for k in r[key]))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_run(folder: str | os.PathLike) -> RunCurves:
    """Read ``folder/metrics.jsonl`` (and ``config.yaml`` for the label); a ``ValueError``
    saying what is missing or broken otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"run folder {folder} does not exist" if not folder.exists()
                         else f"{folder} is not a folder (give a raftorch train run folder)")
    path = folder / ckpt.METRICS
    if not path.is_file():
        raise ValueError(f"{folder} has no {ckpt.METRICS}: not a raftorch train run folder, or no "
                         f"epoch has finished there yet")
    records = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} cannot be read ({exc})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path} line {i} is not valid JSON; the file is corrupt") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path} line {i} is not a record (a JSON object)")
        records.append(rec)
    if not records:
        raise ValueError(f"{path} is empty: no epoch has finished in {folder} yet")
    name = folder.resolve().name
    return RunCurves(folder, name, _label(folder, name), records)


def _label(folder: Path, name: str) -> str:
    from raftorch.training.config import load_config_file

    try:
        cfg = load_config_file(folder / ckpt.CONFIG)
    except ValueError:
        return name
    rule, rank = cfg.get("rule"), cfg.get("rank")
    if not rule:
        return name
    return f"{name} ({rule}" + (f", r={rank}" if rank not in (None, "") else "") + ")"


def _kind(runs: list[RunCurves], key: str) -> str | None:
    """``"panel"`` for a built-in panel, ``"layers"`` for a mapping, ``"scalar"`` for a number
    per epoch, ``None`` when no run logged it."""
    if key in ("loss", "accuracy"):
        return "panel" if any(r.series(f"{s}_{key}")[0] for r in runs for s, _ in _SPLITS) else None
    if key == "error_dim":
        return "panel" if any(r.layers(k) for r in runs for k in ("error_dim", "error_dim_received")) else None
    if any(r.layers(key) for r in runs):
        return "layers"
    if any(r.series(key)[0] for r in runs):
        return "scalar"
    return None


def _available(runs: list[RunCurves]) -> list[str]:
    keys = list(PANELS) + list(dict.fromkeys(k for r in runs for rec in r.records for k in rec))
    return [k for k in dict.fromkeys(keys) if k != "epoch" and _kind(runs, k)]


def _choose(runs: list[RunCurves], metrics: list[str] | None) -> list[str]:
    if not metrics:
        return [k for k in PANELS if _kind(runs, k)] or ["loss"]
    missing = [m for m in metrics if _kind(runs, m) is None]
    if missing:
        hint = " (train with --track subspace to log them)" if set(missing) & {"subspace", "error_dim"} else ""
        raise ValueError(f"no run logged {', '.join(map(repr, missing))}{hint}; available: "
                         f"{', '.join(_available(runs))}")
    return list(dict.fromkeys(metrics))


def plot_curves(run_dirs: list[str | os.PathLike], out: str | os.PathLike | None = None,
                metrics: list[str] | None = None, *, dpi: int = 110) -> Path:
    """Draw the panels ``metrics`` (default: every :data:`PANELS` entry some run logged) for the
    runs in ``run_dirs`` into one figure written to ``out`` (default ``RUN_DIR/curves.png`` for
    a single run; required for several). Returns the written path."""
    if not run_dirs:
        raise ValueError("give at least one run folder")
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    for r in runs:  # two folders of the same name: tell them apart by their path
        if names.count(r.name) > 1:
            r.label = r.label.replace(r.name, str(r.folder), 1)
    if out is None:
        if len(runs) > 1:
            raise ValueError("several runs need --out FILE.png (there is no single run folder to "
                             "write into)")
        out = runs[0].folder / "curves.png"
    out = Path(out)
    if out.suffix.lower() not in _FORMATS:
        raise ValueError(f"--out {out}: the file name must end in {', '.join(_FORMATS)}")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / 'curves.png'}")
    panels = _choose(runs, metrics)
    fig = _draw(runs, panels)
    _save(fig, out, dpi)
    return out


def _draw(runs: list[RunCurves], panels: list[str]):
    from matplotlib.figure import Figure  # no pyplot: no global backend or open-figure state
    from matplotlib.ticker import MaxNLocator

    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.6 * cols, 3.4 * rows + 0.5 + 0.22 * len(runs)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, key in zip(axes, panels):
        kind = _kind(runs, key)
        styles: dict[str, tuple[str, str]] = {}
        if kind == "panel" and key in ("loss", "accuracy"):
            for run, c in zip(runs, colors):
                for split, ls in _SPLITS:
                    xs, ys = run.series(f"{split}_{key}")
                    if xs:
                        ax.plot(xs, ys, color=c, ls=ls, marker="." if len(xs) < 3 else "", lw=1.4)
                        styles[split] = (ls, "")
        elif kind in ("panel", "layers"):
            # error_dim: the line style says backprop / received, the marker says the layer
            groups = (("error_dim", "-"), ("error_dim_received", "--")) if key == "error_dim" else ((key, None),)
            layers = list(dict.fromkeys(n for r in runs for g, _ in groups for n in r.layers(g)))
            drawn = set()
            for run, c in zip(runs, colors):
                for g, group_ls in groups:
                    for i, layer in enumerate(layers):
                        xs, ys = run.series(g, layer)
                        if not xs:
                            continue
                        if group_ls is None:
                            ls, mk = _LAYER_STYLES[i % len(_LAYER_STYLES)]
                            styles.setdefault(layer, (ls, mk))
                        else:
                            ls, mk = group_ls, _MARKERS[i % len(_MARKERS)]
                            styles.setdefault(layer, ("", mk))
                        drawn.add(g)
                        ax.plot(xs, ys, color=c, ls=ls, marker=mk or ("." if len(xs) < 2 else ""), ms=3.5, lw=1.2)
            if key == "error_dim":
                styles = {**({"backprop": ("-", "")} if "error_dim" in drawn else {}),
                          **({"received": ("--", "")} if "error_dim_received" in drawn else {}), **styles}
        else:
            for run, c in zip(runs, colors):
                xs, ys = run.series(key)
                if xs:
                    ax.plot(xs, ys, color=c, lw=1.4, marker="." if len(xs) < 3 else "")
        if key == "subspace":
            ax.set_ylim(-0.03, 1.03)
        ax.set_title(_TITLES.get(key, key), fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if styles:
            handles = [ax.plot([], [], color="0.3", ls=ls, marker=mk, ms=3.5)[0] for ls, mk in styles.values()]
            ax.legend(handles, list(styles), fontsize=7, loc="best", framealpha=0.8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles = [axes[0].plot([], [], color=c, lw=2.5)[0] for c in colors]
    fig.legend(handles, [r.label for r in runs], loc="outside lower center",
               ncols=min(len(runs), 3), fontsize=8, frameon=False)
    return fig


def _save(fig, out: Path, dpi: int) -> None:
    """Write to a temporary file beside ``out``, then rename it over ``out``."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=out.suffix)
    except OSError as exc:
        raise ValueError(f"cannot write {out} ({exc.strerror or exc}); choose another --out") from None
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, format=out.suffix.lower().lstrip("."))
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``raftorch plot``: the ``RUN_DIR`` folders, ``--out`` and ``--metrics``."""
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="raftorch train run folders")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="figure file (.png, .pdf, .svg); default RUN_DIR/curves.png for one run, "
                             "required for several")
    parser.add_argument("--metrics", metavar="LIST", default=None,
                        help=f"comma list of panels: {', '.join(PANELS)}, or any logged key "
                             "(test_accuracy, lr, error_dim_received, ...); default: every panel logged")


def run(args: argparse.Namespace) -> int:
    """Run ``raftorch plot``: draw the curves with :func:`plot_curves` and print the path written. Exit
    status 0 done, 2 a ``ValueError`` (an unreadable run folder, an unknown metric, a missing or bad ``--out``)."""
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    try:
        path = plot_curves(args.runs, args.out, metrics)
    except ValueError as exc:
        print(f"raftorch plot: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
