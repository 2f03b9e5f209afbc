"""Collect a panel's run folders into ``summary.csv`` (one row per run) and ``points.csv``
(mean ± std over seeds per point). Only saved files are read, so this also works for a sweep
whose shards ran on other machines, and for ``--redraw``.

``summary.csv`` columns: ``panel, point, series``, every grid variable, ``seed, status``
(``done``, ``failed``, ``partial`` (killed; resumable), ``missing``), ``test_accuracy`` and
``val_accuracy`` **in percent** (the final epoch's, never the best epoch), ``chance``
(100 / number of classes), ``test_loss, train_loss, epochs`` (finished), ``seconds``
(training time), ``threads, device, torch, error``; for a panel with ``analysis`` (receptive fields), ``orientedness`` and
``centre_surround_index``: the run's mean over the channels of the analysed layer
(``scores.json``, :func:`analyze_finished`), ``field_dimensionality`` (of the layer's
fields), and ``init_orientedness``, ``init_centre_surround_index``,
``init_field_dimensionality``: the same for the run's net at initialisation (the baseline; a
claim can use any of these as its ``metric``). Theory panels have one row per rule and method: ``rule, rank, method,
relative_error, recovered`` (modes within 2%) and ``plateau_distance`` (rules with a fixed ``P``:
the final product's distance from its closed-form plateau, :mod:`raftorch.theory.result`).

``points.csv`` has, per point, ``n``, the mean ± std of the metric, ``chance`` and, in a panel
with a no-feedback ``control`` series, ``gain_over_control`` with its 95% interval
(``gain_lo``, ``gain_hi``; paired by seed, :mod:`raftorch.experiments.stats`): the point's
accuracy minus the control's at the same values of the control's grid variables.
"""
from __future__ import annotations

import csv
import io
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from raftorch.training import checkpoint as ckpt
from raftorch.experiments import stats
from raftorch.experiments.stats import seed_values
from raftorch.experiments.spec import Panel, Point
from raftorch.training.summary import mean_std

ERROR = "error.json"
SCORES = "scores.json"
SCORES_OF_FIELDS = ["orientedness", "centre_surround_index"]  # per channel: a run's is their mean
LAYER_SCORES = ["field_dimensionality"]  # one number per run
# each score of the trained fields, then the same of the run's initial net (its baseline)
SCORE_COLUMNS = [*SCORES_OF_FIELDS, *LAYER_SCORES, *(f"init_{c}" for c in SCORES_OF_FIELDS + LAYER_SCORES)]
RUN_COLUMNS = ["seed", "status", "test_accuracy", "val_accuracy", "chance", "test_loss", "train_loss", "epochs",
               "seconds", "threads", "device", "torch", "error"]
THEORY_COLUMNS = ["seed", "status", "rule", "rank", "method", "relative_error", "recovered", "plateau_distance",
                  "seconds", "error"]


def panel_dir(root: str | Path, panel: Panel) -> Path:
    """The folder of ``panel``'s results: ``root/PROFILE/PANEL``."""
    return Path(root) / panel.profile / panel.id


def run_dir(root: str | Path, panel: Panel, point: Point) -> Path:
    """The run folder of one point: ``root/PROFILE/PANEL/runs/POINT``."""
    return panel_dir(root, panel) / "runs" / point.id


def find_extra_seeds(root: str | Path, panel: Panel) -> dict[tuple, list[int]]:
    """Set and return ``panel.extra_seeds``: for every point, the seeds beyond the spec's whose
    run folders exist under ``root`` (``<point>_s<seed>``, added by ``--decide``)."""
    runs = panel_dir(root, panel) / "runs"
    panel.extra_seeds = {}
    names = [d.name for d in runs.iterdir() if d.is_dir()] if runs.is_dir() else []
    if not names:
        return panel.extra_seeds
    for p in panel.points():
        if p.seed != panel.seeds[0]:
            continue
        pattern = re.compile(re.escape(p.stem) + r"_s(\d+)$")
        extra = sorted(int(m.group(1)) for m in map(pattern.match, names) if m and int(m.group(1)) not in panel.seeds)
        if extra:
            panel.extra_seeds[p.key] = extra
    return panel.extra_seeds


def chance(config: dict) -> float | str:
    """100 / the number of classes of a point's data (``""`` where it has none)."""
    from raftorch.training.data import dataset_shape

    try:
        return round(100.0 / dataset_shape(config["data"])[1], 4)
    except (KeyError, ValueError, TypeError):
        return ""


def run_status(folder: Path) -> str:
    """The ``status`` of a run folder: ``done`` (``final.json``), ``failed`` (``error.json``), ``partial``
    (a checkpoint only) or ``missing``."""
    if (folder / ckpt.FINAL).exists():
        return "done"
    if (folder / ERROR).exists():
        return "failed"
    if (folder / ckpt.CHECKPOINT).exists():
        return "partial"
    return "missing"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def collect(root: str | Path, panel: Panel, points: list[Point]) -> list[dict[str, Any]]:
    """One row per run (per result of a theory run) of ``points``, in point order."""
    rows = []
    for p in points:
        folder = run_dir(root, panel, p)
        status = run_status(folder)
        head = {"panel": panel.id, "point": p.id, "series": p.series, **{v: p.values.get(v, "") for v in panel.variables}}
        error = _read_json(folder / ERROR).get("error", "") if status == "failed" else ""
        if panel.kind == "theory":
            rows += _theory_rows(folder, head, p, status, error)
            continue
        row = {**head, "seed": p.seed, "status": status, "error": error, "chance": chance(p.config)}
        if status == "done":
            final = _read_json(folder / ckpt.FINAL)
            row.update(test_accuracy=round(100 * final["test_accuracy"], 4),
                       val_accuracy=round(100 * final["val_accuracy"], 4) if "val_accuracy" in final else "",
                       test_loss=round(final["test_loss"], 6), train_loss=round(final["train_loss"], 6),
                       epochs=final["epochs"], seconds=round(final["seconds_total"], 2),
                       threads=final.get("threads", ""), device=final.get("device", ""),
                       torch=final.get("torch", ""))
            if panel.analysis:
                scores = _read_json(folder / SCORES)
                # a run without a live field (null means) has no score: left out of the means
                for prefix, got in (("", scores), ("init_", scores.get("init") or {})):
                    row.update({prefix + c: round(got[f"{c}_mean"], 6) for c in SCORES_OF_FIELDS
                                if got.get(f"{c}_mean") is not None})
                    row.update({prefix + c: round(got[c], 6) for c in LAYER_SCORES if got.get(c) is not None})
        elif status == "partial":
            row["epochs"] = len((folder / ckpt.METRICS).read_text().splitlines()) if (folder / ckpt.METRICS).exists() else 0
        rows.append(row)
    return rows


def _theory_rows(folder: Path, head: dict, p: Point, status: str, error: str) -> list[dict]:
    if status != "done":
        return [{**head, "seed": p.seed, "status": status, "error": error}]
    from raftorch.theory.result import load_results

    final = _read_json(folder / ckpt.FINAL)
    _, results = load_results(folder / "theory.json")
    tol = float(p.config.get("tol", 0.02))
    return [{**head, "series": r.rule, "seed": p.seed, "status": "done", "rule": r.rule,
             "rank": "full" if r.rank is None else r.rank, "method": r.method,
             "relative_error": round(r.relative_error, 6), "recovered": len(r.recovered(tol)),
             "plateau_distance": "" if r.plateau_distance is None else round(r.plateau_distance, 6),
             "seconds": round(final.get("seconds_total", 0.0), 2), "error": ""} for r in results]


def analyze_finished(root: str | Path, panel: Panel, points: list[Point]) -> int:
    """Write ``scores.json`` / ``receptive_fields.npz`` (:func:`raftorch.analysis.analyze_run`,
    the panel's ``analysis`` settings) into every finished run of ``points`` that lacks them or
    has them for another layer / method; returns how many runs were analysed. A few seconds a
    run on the CPU; the analysis reads the saved checkpoint, so ``--redraw`` can do it too."""
    if not panel.analysis:
        return 0
    from raftorch.analysis import analyze_run

    layer, method = panel.analysis.get("layer"), panel.analysis.get("method", "gradient")
    done = 0
    for p in points:
        folder = run_dir(root, panel, p)
        if run_status(folder) != "done":
            continue
        have = _read_json(folder / SCORES)
        if (have and have.get("method") == method and (layer is None or have.get("layer") == layer)
                and "live_channels" in have  # older scores counted zero fields in the means
                and "field_dimensionality" in have.get("init", {})):  # no baseline, no dimensionality
            continue
        kw = {"steps": panel.analysis["steps"]} if "steps" in panel.analysis else {}
        try:
            analyze_run(folder, layer, method, figure=False, **kw)
        except ValueError as exc:  # one run's missing checkpoint must not sink the panel's report
            (folder / SCORES).unlink(missing_ok=True)
            print(f"raftorch reproduce: warning: no receptive fields for {folder}: {exc}; its scores "
                  f"are left out of the panel", file=sys.stderr)
            continue
        done += 1
    return done


def columns(panel: Panel) -> list[str]:
    """The ``summary.csv`` columns of ``panel``: ``panel, point, series``, its grid variables, then the run
    columns (the theory ones for a theory panel; with the score columns for a panel with ``analysis``)."""
    run_cols = THEORY_COLUMNS if panel.kind == "theory" else RUN_COLUMNS
    if panel.analysis:
        run_cols = run_cols[:3] + SCORE_COLUMNS + run_cols[3:]
    return ["panel", "point", "series"] + [v for v in panel.variables if v not in run_cols] + run_cols


def to_csv(rows: list[dict], cols: list[str]) -> str:
    """``rows`` as CSV text with the columns ``cols`` and a header line (a value a row lacks is empty, keys
    not in ``cols`` are left out)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: r.get(c, "") for c in cols})
    return buf.getvalue()


def done_values(rows: list[dict], metric: str) -> list[float]:
    """``metric`` of the finished runs among ``rows`` (failed, partial and missing ones left out)."""
    return [float(r[metric]) for r in rows if r.get("status") == "done" and r.get(metric) not in (None, "")]


def point_stats(rows: list[dict], panel: Panel, metric: str = "test_accuracy") -> list[dict[str, Any]]:
    """Mean ± std (sample std over seeds) of ``metric`` per point (series + grid values)."""
    group_cols = list(dict.fromkeys(["series", *panel.variables, *(("rank", "method") if panel.kind == "theory" else ())]))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(c, "") for c in group_cols), []).append(r)
    out = []
    for key, members in groups.items():
        st, secs = mean_std(done_values(members, metric)), mean_std(done_values(members, "seconds"))
        out.append({**dict(zip(group_cols, key)), "runs": len(members), "n": st[2] if st else 0,
                    f"{metric}_mean": round(st[0], 4) if st else "",
                    f"{metric}_std": round(st[1], 4) if st else "",
                    "chance": members[0].get("chance", ""),
                    "seconds_mean": round(secs[0], 2) if secs else ""})
    return out


def _group_key(panel: Panel, series: str, values: dict) -> tuple[str, ...]:
    return (series, *(str(values.get(v, "")) for v in panel.variables))


def control_gains(rows: list[dict], panel: Panel, metric: str = "test_accuracy") -> dict[tuple, dict]:
    """Per point (:func:`_group_key`: series and grid values as text): its ``metric`` minus
    the no-feedback control's at the same values of the control's grid variables
    (:func:`raftorch.experiments.stats.difference`): ``{"gain_over_control", "gain_lo", "gain_hi", "control"}`` (the control's mean).
    Empty for a panel without ``control``."""
    if not panel.control or panel.kind != "train":
        return {}
    own = panel.series_named(panel.control).variables
    control_rows = [r for r in rows if r["series"] == panel.control]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(_group_key(panel, r["series"], r), []).append(r)
    out = {}
    for key, members in groups.items():
        mine = seed_values(members, metric)
        ctrl = seed_values([r for r in control_rows if all(str(r.get(v)) == str(members[0].get(v)) for v in own)], metric)
        if mine and ctrl:
            iv = stats.difference(mine, ctrl)
            out[key] = {"gain_over_control": round(iv.estimate, 4),
                        "gain_lo": round(iv.lo, 4) if iv.spread is not None else "",
                        "gain_hi": round(iv.hi, 4) if iv.spread is not None else "",
                        "control": round(statistics.fmean(ctrl.values()), 4)}
    return out


def write_summary(root: str | Path, panel: Panel, points: list[Point]) -> tuple[Path, list[dict]]:
    """Collect, then write ``summary.csv`` and ``points.csv`` atomically; returns the rows."""
    rows = collect(root, panel, points)
    folder = panel_dir(root, panel)
    ckpt.write_text(folder / "summary.csv", to_csv(rows, columns(panel)))
    metric = "relative_error" if panel.kind == "theory" else "test_accuracy"
    per_point = point_stats(rows, panel, metric)
    for score in SCORE_COLUMNS if panel.analysis else ():
        for st, more in zip(per_point, point_stats(rows, panel, score)):
            st.update({k: v for k, v in more.items() if k.startswith(score)})
    gains = control_gains(rows, panel)
    if gains:
        blank = dict.fromkeys(next(iter(gains.values())), "")
        for st in per_point:
            st.update(gains.get(_group_key(panel, st["series"], st), blank))
    if per_point:
        ckpt.write_text(folder / "points.csv", to_csv(per_point, list(per_point[0])))
    return folder / "summary.csv", rows
