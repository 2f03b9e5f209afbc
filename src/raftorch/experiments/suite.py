"""One panel end to end (run, aggregate, claims, figure), the whole suite, and its report.

``reproduce`` runs the points of the panels that are not done (one queue for all of them, so
no core waits at the end of a panel), then always rebuilds each panel's
``summary.csv`` / ``points.csv``, ``claims.json`` and ``figure.png`` / ``.pdf`` from the
saved run folders (``redraw=True``: only that). ``write_report`` gathers every panel's
claims and figure into ``results/<profile>/REPORT.md``.
"""
from __future__ import annotations

import datetime
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from raftorch import checkpoint as ckpt
from raftorch.experiments.aggregate import analyze_finished, panel_dir, write_summary
from raftorch.experiments.claims import evaluate_claims
from raftorch.experiments.figures import draw_panel
from raftorch.experiments.runner import parallelism, plan, reuse_finished, run_tasks, select_shard, unique_todo
from raftorch.experiments.spec import Panel


@dataclass
class PanelResult:
    panel: Panel
    claims: list[dict]
    figures: list[Path]
    ran: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    parallel: str = ""  # "2 job(s) x 1 thread(s)" when points ran


def verdict(passed) -> str:
    return {True: "PASS", False: "FAIL", None: "NOT EVALUATED"}[passed]


def estimate(panel: Panel, points) -> float | None:
    """Seconds for ``points`` at the spec's cost per point (``None`` when it gives none)."""
    costs = [p.cost for p in points]
    return None if any(c is None for c in costs) else float(sum(costs))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def dry_run(panel: Panel, root: str | Path, shard=None, jobs: int | None = None) -> str:
    """The points (with their state) and the estimated cost, as text."""
    points = select_shard(panel.points(), shard)
    tasks = plan(panel, root, points)
    todo = [t for t in tasks if t.status != "done"]
    lines = [f"{panel.id} ({panel.profile}): {len(points)} points"
             + (f" in shard {shard[0]}/{shard[1]}" if shard else "")
             + f", {len(todo)} to run, {len(points) - len(todo)} done"]
    for t in tasks:
        lines.append(f"  {t.action:6s} {t.point.id}")
    est = estimate(panel, [t.point for t in todo])
    hw = panel.cost.get("hardware", "one worker")
    if est is not None:
        j = jobs or 1
        lines.append(f"estimated cost: {_duration(est)} ({est / 3600:.2f} h) on {hw}"
                     + (f", about {_duration(est / j)} wall time with {j} jobs" if j > 1 else ""))
    else:
        lines.append("estimated cost: unknown (the spec gives no cost)")
    return "\n".join(lines)


def reproduce(panels: list[Panel], root: str | Path = "results", *, jobs: int | None = None,
              threads: int | None = None, shard=None, redraw: bool = False, device: str | None = None,
              retry_failed: bool = False, data_dir: str | None = None, progress: bool = True,
              echo=print) -> list[PanelResult]:
    """Run what is missing of ``panels`` (unless ``redraw``) in one queue, then per panel
    aggregate, check the claims and draw the figure from the saved runs."""
    start = time.perf_counter()
    ran: dict[str, list] = {p.path: [] for p in panels}
    parallel = ""
    tasks = [t for p in panels for t in plan(p, root, select_shard(p.points(), shard))]
    reused = reuse_finished(root, tasks)  # copies saved results: also part of a redraw
    if reused:
        echo(f"{len(reused)} point(s) taken from identical finished runs of other panels")
    if not redraw:
        skipped = [t for t in tasks if t.status == "failed" and not retry_failed]
        if skipped:
            echo(f"{len(skipped)} point(s) failed before and are not run again (--retry-failed runs them): "
                 f"{', '.join(t.panel.id + ' ' + t.point.id for t in skipped[:5])}")
        todo = unique_todo(tasks, retry_failed)
        n_resume = sum(t.status == "partial" for t in todo)
        if todo:
            echo(f"{len(todo)} of {len(tasks)} points to run" + (f" ({n_resume} to resume)" if n_resume else ""))
        # points grouped by their panel's preferred threads (one group when --jobs / --threads is given)
        groups: dict[int, list] = {}
        for t in todo:
            groups.setdefault(1 if (jobs or threads) else t.panel.threads_per_point, []).append(t)
        used = []
        for preferred, group in sorted(groups.items()):
            j, th = parallelism(jobs, threads, len(group), device, preferred)
            used.append(f"{j} job(s) x {th} thread(s)")
            echo(f"{len(group)} point(s) ({', '.join(dict.fromkeys(t.panel.id for t in group))}): {used[-1]}")
            for t, res in run_tasks(group, jobs=j, threads=th, device=device, data_dir=data_dir,
                                    progress=progress):
                ran[t.panel.path].append((t.point.id, res["status"]))
        parallel = "; ".join(dict.fromkeys(used))
        if todo:
            reuse_finished(root, [t for t in tasks if t.status == "missing"])  # same settings as a point just run
    results = []
    for panel in panels:
        folder = panel_dir(root, panel)
        folder.mkdir(parents=True, exist_ok=True)
        analyze_finished(root, panel, panel.points())
        _, rows = write_summary(root, panel, panel.points())
        claims = evaluate_claims(panel.claims, rows)
        ckpt.write_json(folder / "claims.json", claims)
        figures = draw_panel(panel, rows, folder)
        echo(f"== {panel.id} ({panel.profile}): {panel.title}")
        for c in claims:
            echo(f"  {verdict(c['passed']):13s} {c['claim']}: {c['measured']}")
        failed = sorted({r["point"] for r in rows if r.get("status") == "failed"})
        results.append(PanelResult(panel, claims, figures, len(ran[panel.path]), failed,
                                   time.perf_counter() - start, parallel))
    return results


def write_report(profile: str, results: list[PanelResult], root: str | Path, *, wall_seconds: float,
                 jobs_threads: str = "", redraw: bool = False) -> Path:
    """``results/<profile>/REPORT.md``: one table of every claim, then every figure."""
    import torch

    from raftorch import __version__
    from raftorch.train import usable_cores

    folder = Path(root) / profile
    n_pass = sum(c["passed"] is True for r in results for c in r.claims)
    n_all = sum(len(r.claims) for r in results)
    lines = [f"# raftorch reproduce: {profile} profile", "",
             f"{n_pass} of {n_all} claims pass. Made {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} "
             f"by raftorch {__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
             f"{usable_cores()} usable cores{', ' + jobs_threads if jobs_threads else ''}; "
             + ("redrawn from the saved runs (no training). " if redraw else
                f"this command took {_duration(wall_seconds)}. ")
             + "Accuracies are final-epoch test accuracies in percent, mean ± std over seeds "
             "(n = seeds); figures are drawn from each panel's summary.csv.", "",
             "| panel | claim | measured | paper | verdict |", "|---|---|---|---|---|"]
    for r in results:
        for c in r.claims:
            cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            lines.append(f"| {r.panel.id} | {cell(c['claim'])} | {cell(c['measured'])} | {cell(c['paper'])} | "
                         f"**{verdict(c['passed'])}** |")
        if not r.claims:
            lines.append(f"| {r.panel.id} | (no claims) | | | |")
    lines.append("")
    for r in results:
        lines += [f"## {r.panel.id}: {r.panel.title} ({r.panel.paper})", "", r.panel.claim, ""]
        if r.panel.notes:
            lines += [f"*Settings:* {r.panel.notes}", ""]
        if r.failed:
            lines += [f"Failed points: {', '.join(r.failed)}", ""]
        png = folder / r.panel.id / "figure.png"
        if png.exists():
            lines += [f"![{r.panel.id}]({r.panel.id}/figure.png)", ""]
    path = folder / "REPORT.md"
    ckpt.write_text(path, "\n".join(lines) + "\n")
    return path
