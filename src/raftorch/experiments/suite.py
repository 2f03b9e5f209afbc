"""One panel end to end (run, aggregate, claims, figure), the whole suite, and its report.

``reproduce`` runs the points of the panels that are not done (one queue for all of them, so
no core waits at the end of a panel), then always rebuilds each panel's
``summary.csv`` / ``points.csv``, ``claims.json`` and ``figure.png`` / ``.pdf`` from the
saved run folders (``redraw=True``: only that). ``write_report`` gathers every panel's
claims and figure into ``results/<profile>/REPORT.md``.

**Seeds until decided** (``decide=True``): after the spec's seeds, rounds of extra seeds go to
exactly the points that undecided claims need, until every claim is decided or its points
reach the cap. In each round an undecided claim whose observed spread says ``m`` seeds per
point would decide it (``seeds_needed``, :func:`raftorch.experiments.stats.seeds_to_decide`)
asks for ``min(m, 2 n)`` seeds on its points (``n``: the seeds its points have; at least
``n + 1``, at most the cap); one whose estimate is beyond the cap, or whose mean sits on its
line, asks for ``2 n`` (an estimate from two or three seeds is itself noisy, so it is not a
reason to stop early). The number grows at most twofold per round, so a claim stops soon
after it is decided. The new seeds are the next whole numbers after the spec's, the same for
every point of a panel, so the points stay paired.
Stopping when decided inflates the error rate a little over the nominal 2.5% per one-sided
decision (optional stopping); with caps of a few seeds and at most twofold rounds it stays
modest.
"""
from __future__ import annotations

import datetime
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from raftorch.training import checkpoint as ckpt
from raftorch.experiments.aggregate import analyze_finished, find_extra_seeds, panel_dir, write_summary
from raftorch.experiments.claims import NOT_EVALUATED, UNDECIDED, VERDICTS, evaluate_claims, signed
from raftorch.experiments.figures import draw_panel
from raftorch.experiments.study import STUDY_FILES, study_lines, write_study
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
    rounds: int = 0  # --decide rounds that added seeds


def verdict(claim: dict) -> str:
    """The claim's verdict as the report and the terminal show it (``HOLDS``, ``FAILS``, ...)."""
    return claim["verdict"].upper()


def count_verdicts(claims: list[dict]) -> dict[str, int]:
    """How many of ``claims`` have each verdict: ``{verdict: count}`` over every one of
    :data:`~raftorch.experiments.claims.VERDICTS`."""
    return {v: sum(c["verdict"] == v for c in claims) for v in VERDICTS}


def summary_line(claims: list[dict]) -> str:
    """``"12 hold, 3 fail, 5 undecided, 0 not evaluated (of 20 claims)"``."""
    n = count_verdicts(claims)
    return (f"{n['holds']} hold, {n['fails']} fail, {n['undecided']} undecided, "
            f"{n['not evaluated']} not evaluated (of {len(claims)} claims)")


def estimate(panel: Panel, points) -> float | None:
    """Seconds for ``points`` at the spec's cost per point (``None`` when it gives none)."""
    costs = [p.cost for p in points]
    return None if any(c is None for c in costs) else float(sum(costs))


def duration(seconds: float | None) -> str:
    """Seconds as a short human reading: "45 s", "12.5 min", "3.4 h"; "?" for unknown."""
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def settings_lines(panel: Panel) -> list[str]:
    """The training settings the dry run lists: those every point shares (the seed aside), then
    what each series sets on top; a theory panel's keyword arguments."""
    def show(d: dict) -> str:
        return ", ".join(f"{k}={v}" for k, v in d.items())

    if panel.kind == "theory":
        return [f"  settings: {show(panel.theory)}"]
    configs = [p.config for p in panel.points()]
    shared = {k: v for k, v in configs[0].items() if k != "seed" and all(c.get(k, object()) == v for c in configs)}
    lines = [f"  settings of every point: {show(shared)}"]
    lines += [f"  series {s.name!r}: {show(s.set)}" for s in panel.series if s.set]
    return lines


def dry_run(panel: Panel, root: str | Path, shard=None, jobs: int | None = None) -> str:
    """The points (with their state) and the estimated cost, as text."""
    find_extra_seeds(root, panel)
    points = select_shard(panel.points(), shard)
    tasks = plan(panel, root, points)
    todo = [t for t in tasks if t.status != "done"]
    lines = [f"{panel.id} ({panel.profile}): {len(points)} points"
             + (f" in shard {shard[0]}/{shard[1]}" if shard else "")
             + f", {len(todo)} to run, {len(points) - len(todo)} done"]
    lines += settings_lines(panel)
    for t in tasks:
        lines.append(f"  {t.action:6s} {t.point.id}")
    est = estimate(panel, [t.point for t in todo])
    hw = panel.cost.get("hardware", "one worker")
    if est is not None:
        j = jobs or 1
        lines.append(f"estimated cost: {duration(est)} ({est / 3600:.2f} h) on {hw}"
                     + (f", about {duration(est / j)} wall time with {j} jobs" if j > 1 else ""))
    else:
        lines.append("estimated cost: unknown (the spec gives no cost)")
    return "\n".join(lines)


def reproduce(panels: list[Panel], root: str | Path = "results", *, jobs: int | None = None,
              threads: int | None = None, shard=None, redraw: bool = False, device: str | None = None,
              retry_failed: bool = False, data_dir: str | None = None, progress: bool = True,
              decide: bool = False, max_seeds: int | None = None, echo=print) -> list[PanelResult]:
    """Run what is missing of ``panels`` (unless ``redraw``) in one queue, then per panel
    aggregate, decide the claims and draw the figure from the saved runs; with ``decide``, then
    add seeds round by round (module docstring) up to ``max_seeds`` per point (default: each
    spec's ``max_seeds``)."""
    if decide and redraw:
        raise ValueError("--decide trains extra seeds and --redraw trains nothing; use one of them")
    if max_seeds is not None:
        if isinstance(max_seeds, bool) or not isinstance(max_seeds, int) or max_seeds < 1:
            raise ValueError(f"--max-seeds must be a positive whole number, got {max_seeds!r}")
        small = [p.id for p in panels if max_seeds < len(p.seeds)]
        if small:
            raise ValueError(f"--max-seeds {max_seeds} is below the seeds the spec of {', '.join(small)} "
                             f"already runs ({max(len(p.seeds) for p in panels)}); give at least that many")
    start = time.perf_counter()
    for p in panels:
        find_extra_seeds(root, p)
    ran: dict[Path, list] = {p.path: [] for p in panels}
    parallel = _run_missing(panels, root, ran, jobs=jobs, threads=threads, shard=shard, redraw=redraw,
                            device=device, retry_failed=retry_failed, data_dir=data_dir, progress=progress,
                            echo=echo)
    evaluated = {p.path: _evaluate(p, root) for p in panels}
    round_no = 0
    while decide:
        wanted = {p.path: _seeds_wanted(p, evaluated[p.path][1], max_seeds or p.max_seeds) for p in panels}
        if not any(wanted.values()):
            break
        round_no += 1
        for p in panels:
            for key, seeds in wanted[p.path].items():
                p.extra_seeds[key] = sorted(set(p.extra_seeds.get(key, [])) | set(seeds))
        n_new = sum(len(v) for w in wanted.values() for v in w.values())
        echo(f"--decide round {round_no}: {n_new} more run(s) for the undecided claims of "
             f"{', '.join(p.id for p in panels if wanted[p.path])}")
        parallel = _run_missing(panels, root, ran, jobs=jobs, threads=threads, shard=shard, redraw=False,
                                device=device, retry_failed=retry_failed, data_dir=data_dir,
                                progress=progress, echo=echo) or parallel
        evaluated = {p.path: _evaluate(p, root) if wanted[p.path] else evaluated[p.path] for p in panels}
    results = []
    for panel in panels:
        rows, claims = evaluated[panel.path]
        folder = panel_dir(root, panel)
        figures = draw_panel(panel, rows, folder) + write_study(root, panel, panel.points())
        echo(f"== {panel.id} ({panel.profile}): {panel.title}")
        for c in claims:
            echo(f"  {verdict(c):13s} {c['claim']}: {c['measured']}")
        failed = sorted({r["point"] for r in rows if r.get("status") == "failed"})
        results.append(PanelResult(panel, claims, figures, len(ran[panel.path]), failed,
                                   time.perf_counter() - start, parallel, round_no))
    return results


def _run_missing(panels: list[Panel], root, ran: dict, *, jobs, threads, shard, redraw, device, retry_failed,
                 data_dir, progress, echo) -> str:
    """Train every point of ``panels`` that is not done (one queue); returns the parallelism."""
    tasks = [t for p in panels for t in plan(p, root, select_shard(p.points(), shard))]
    reused = reuse_finished(root, tasks)  # copies saved results: also part of a redraw
    if reused:
        echo(f"{len(reused)} point(s) taken from identical finished runs of other panels")
    if redraw:
        return ""
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
        group.sort(key=lambda t: -(t.point.cost or 0))  # longest first: no core idles at the end on a long point
        j, th = parallelism(jobs, threads, len(group), device, preferred)
        used.append(f"{j} job(s) x {th} thread(s)")
        echo(f"{len(group)} point(s) ({', '.join(dict.fromkeys(t.panel.id for t in group))}): {used[-1]}")
        for t, res in run_tasks(group, jobs=j, threads=th, device=device, data_dir=data_dir, progress=progress):
            ran[t.panel.path].append((t.point.id, res["status"]))
    if todo:
        reuse_finished(root, [t for t in tasks if t.status == "missing"])  # same settings as a point just run
    return "; ".join(dict.fromkeys(used))


def _evaluate(panel: Panel, root) -> tuple[list[dict], list[dict]]:
    """Aggregate the panel's saved runs and decide its claims; writes ``summary.csv``,
    ``points.csv`` and ``claims.json``; returns (rows, claims)."""
    folder = panel_dir(root, panel)
    folder.mkdir(parents=True, exist_ok=True)
    analyze_finished(root, panel, panel.points())
    _, rows = write_summary(root, panel, panel.points())
    claims = evaluate_claims(panel.claims, rows)
    ckpt.write_json(folder / "claims.json", claims)
    return rows, claims


def _seeds_wanted(panel: Panel, claims: list[dict], cap: int) -> dict[tuple, list[int]]:
    """The extra seeds this round gives each point (key -> new seeds): see the module docstring."""
    by_prefix = {}
    for p in panel.points():
        by_prefix.setdefault(p.stem, (p.key, []))[1].append(p.seed)
    target: dict[str, int] = {}
    for c in claims:
        if c["verdict"] != UNDECIDED or not any(q in by_prefix for q in c["points"]):
            continue
        need = c.get("seeds_needed")
        have = max(len(by_prefix[q][1]) for q in c["points"] if q in by_prefix)
        want = min(cap, max(have + 1, 2 * have if need is None or need > cap else min(need, 2 * have)))
        for q in c["points"]:
            if q in by_prefix:
                target[q] = max(target.get(q, 0), want)
    out = {}
    for q, n in target.items():
        key, seeds = by_prefix[q]
        new, candidate = [], max(panel.seeds) + 1
        while len(seeds) + len(new) < n:
            if candidate not in seeds:
                new.append(candidate)
            candidate += 1
        if new:
            out[key] = new
    return out


def _cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _number(v) -> str:
    return "–" if v is None else signed(v)


def claim_row(panel_id: str, c: dict) -> str:
    """One row of the report's claims table."""
    if c["verdict"] == NOT_EVALUATED or c["type"] == "min_x_grows":
        ours = c["measured"]
    else:
        interval = (f"[{_number(c['lo'])}, {_number(c['hi'])}]" if c.get("lo") is not None else "no interval")
        what = "weakest step " if c["type"] == "ordered" else ""
        ours = f"{what}{_number(c['estimate'])} {interval}"
    need = ""
    if c["verdict"] == UNDECIDED:
        n = c.get("seeds_needed")
        need = (" (the mean sits on the line)" if n is None else
                f" (~{n} seeds would decide it)" if n < 1000 else " (would need > 1000 seeds)")
    line = "–" if c.get("line") is None else _number(c["line"])
    return (f"| {panel_id} | {_cell(c['claim'])} | {_cell(c['paper']) or '–'} | {_cell(ours)} | {line} | "
            f"{c.get('n') or '–'} | **{c['verdict']}**{need} |")


CLAIMS_HEADER = ["| panel | claim | paper | ours: difference [95% interval] | line | n | verdict |",
                 "|---|---|---|---|---|---|---|"]


def claims_table(results: list[PanelResult], source: str) -> list[str]:
    """The report's table of the claims whose ``source`` is ``source`` (paper / ours)."""
    lines = list(CLAIMS_HEADER)
    for r in results:
        lines += [claim_row(r.panel.id, c) for c in r.claims if c.get("source", "paper") == source]
    return lines if len(lines) > 2 else []


PANEL_SUMMARY_HEADER = ["| panel | paper | what it varies | claims | hold | fail | undecided | not evaluated |",
                        "|---|---|---|---|---|---|---|---|"]


def panel_summary_table(results: list[PanelResult]) -> list[str]:
    """The report's "Summary by panel" table: per panel its claims (the paper's and ours
    together) counted by verdict. The README carries this table as it is written here."""
    lines = list(PANEL_SUMMARY_HEADER)
    for r in results:
        n = count_verdicts(r.claims)
        lines.append(f"| {r.panel.id} | {_cell(r.panel.paper)} | {_cell(r.panel.title)} | {len(r.claims)} | "
                     f"{n['holds']} | {n['fails']} | {n['undecided']} | {n['not evaluated']} |")
    return lines


def control_lines(r: PanelResult, root: str | Path) -> list[str]:
    """What the no-feedback control shows in a panel: its accuracy, chance, and the points whose
    95% interval of the gain over the control lies below 0 (worse than no feedback)."""
    import csv

    path = panel_dir(root, r.panel) / "points.csv"
    if not r.panel.control or not path.exists():
        return []
    with open(path, newline="") as f:
        points = list(csv.DictReader(f))
    ctrl = [p for p in points if p["series"] == r.panel.control and p.get("test_accuracy_mean")]
    if not ctrl:
        return []
    out = []
    for p in ctrl:
        where = ", ".join(f"{v} = {p[v]}" for v in r.panel.variables if p.get(v))
        out.append(f"- No-feedback control{' (' + where + ')' if where else ''}: "
                   f"{float(p['test_accuracy_mean']):.2f} ± {float(p['test_accuracy_std'] or 0):.2f}% "
                   f"(n = {p['n']}), chance {float(p['chance']):.1f}%.")
    gains = []
    for p in points:
        if p["series"] == r.panel.control or p.get("gain_over_control") in (None, ""):
            continue
        where = ", ".join(f"{v} = {p[v]}" for v in r.panel.variables if p.get(v))
        name = f"{p['series']}{' (' + where + ')' if where else ''}"
        interval = (f" [{float(p['gain_lo']):+.2f}, {float(p['gain_hi']):+.2f}]" if p.get("gain_lo") not in (None, "")
                    else " (no interval)")
        gains.append(f"{name} {float(p['gain_over_control']):+.2f}{interval}")
        if p.get("gain_hi") not in (None, "") and float(p["gain_hi"]) < 0:
            out.append(f"- **Below the no-feedback control**: {name} {float(p['test_accuracy_mean']):.2f}%, "
                       f"gain {float(p['gain_over_control']):+.2f}{interval}: worse than not training the "
                       f"hidden layers at all.")
    if gains:
        out.append("- Gain over the control (points, 95% interval): " + "; ".join(gains) + ".")
    threads = sorted({t for claim in r.claims for t in claim.get("threads", [])})
    if len(threads) > 1:
        out.append(f"- The runs of this panel used {' and '.join(threads)} threads, whose float rounding differs; "
                   f"the verdicts rest on seed-to-seed intervals, far wider than that difference.")
    return out


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else the platform's processor."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_report(profile: str, results: list[PanelResult], root: str | Path, *, wall_seconds: float,
                 jobs_threads: str = "", redraw: bool = False) -> Path:
    """``results/<profile>/REPORT.md``: a summary line, the claims counted by verdict per panel,
    the paper's claims and ours as tables
    (the paper's number, ours with its 95% interval and n, the verdict), what the no-feedback
    controls show, then every figure."""
    import torch

    from raftorch import __version__
    from raftorch.training.threads import usable_cores

    folder = Path(root) / profile
    claims = [c for r in results for c in r.claims]
    rounds = max((r.rounds for r in results), default=0)
    lines = [f"# raftorch reproduce: {profile} profile", "",
             f"**{summary_line(claims)}.**", "",
             f"Made {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} by raftorch {__version__}, torch "
             f"{torch.__version__}, Python {platform.python_version()}, {cpu_name()}, "
             f"{usable_cores()} usable cores{', ' + jobs_threads if jobs_threads else ''}; "
             + ("redrawn from the saved runs (no training). " if redraw else
                f"this command took {duration(wall_seconds)}"
                + (f" with {rounds} --decide round(s). " if rounds else ". "))
             + "Accuracies are final-epoch test accuracies in percent. Each claim is decided on the 95% "
             "interval of the difference it is about (paired by seed where the points share seeds, "
             "else Welch; see raftorch.experiments.claims): **holds** when the whole interval is on the "
             "claim's side of its line, **fails** when it is on the other side, **undecided** when it "
             "crosses the line. `n` is the number of seeds (pairs).", ""]
    lines += ["## Summary by panel", "", *panel_summary_table(results), ""]
    paper = claims_table(results, "paper")
    ours = claims_table(results, "ours")
    if paper:
        lines += ["## The paper's claims", "", *paper, ""]
    if ours:
        lines += ["## Our own claims", "", "Claims of raftorch's, not the paper's (controls, field scores).", "",
                  *ours, ""]
    controls = [(r, control_lines(r, root)) for r in results]
    if any(c for _, c in controls):
        lines += ["## The no-feedback control", "",
                  "The same net and settings with the hidden layers frozen at their initialisation and only "
                  "the output layer learning (rule `frozen`): what feedback buys. `points.csv` of each panel "
                  "has every point's gain over it with its 95% interval.", ""]
        for r, c in controls:
            if c:
                lines += [f"**{r.panel.id}**", "", *c, ""]
    for r in results:
        lines += [f"## {r.panel.id}: {r.panel.title} ({r.panel.paper})", "", r.panel.claim, ""]
        if r.panel.notes:
            lines += [f"*Settings:* {r.panel.notes}", ""]
        if r.failed:
            lines += [f"Failed points: {', '.join(r.failed)}", ""]
        png = folder / r.panel.id / "figure.png"
        if png.exists():
            lines += [f"![{r.panel.id}]({r.panel.id}/figure.png)", ""]
        lines += study_lines(r.panel, folder / r.panel.id)
    path = folder / "REPORT.md"
    ckpt.write_text(path, "\n".join(lines) + "\n")
    return path


EXPORTED = ("summary.csv", "points.csv", "claims.json", "figure.png", "fields.png", "orientedness.png",
            "dimensionality.png", *STUDY_FILES)


def export_results(profile: str, results: list[PanelResult], root: str | Path, dest: str | Path) -> list[Path]:
    """Copy the small result files of ``results`` (per panel :data:`EXPORTED`; ``REPORT.md`` and
    the ``budget*.json`` of ``benchmarks/quick_budget.py`` where they exist) from ``root`` into ``dest`` (e.g.
    ``docs/results/quick``), laid out as under ``root/profile`` so the report's figure links
    work there too. Run folders (checkpoints) are never copied. Returns the files written."""
    source, dest = Path(root) / profile, Path(dest)
    written = []
    for name in ("REPORT.md", "budget.json", "budget-decide.json"):
        if (source / name).exists():
            written.append(dest / name)
    for r in results:
        written += [dest / r.panel.id / n for n in EXPORTED if (source / r.panel.id / n).exists()]
    for target in written:
        target.parent.mkdir(parents=True, exist_ok=True)
        data = (source / target.relative_to(dest)).read_bytes()
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
    return written
