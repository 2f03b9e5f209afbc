"""``raftorch reproduce``: the paper's panels by name.

    raftorch reproduce --list                              # panels, claims, run counts, cost
    raftorch reproduce fig3b --profile quick               # one panel on a CPU
    raftorch reproduce all --profile quick                 # every panel, results/quick/REPORT.md
    raftorch reproduce fig3a --profile paper --dry-run     # the run list and its estimated cost
    raftorch reproduce fig3a --profile paper --shard 3/40  # one slice of the sweep
    raftorch reproduce fig3a --profile paper --redraw      # figure + claims from saved results
    raftorch reproduce all --profile quick --decide        # add seeds until the claims are decided
    raftorch reproduce --spec my_panel.yaml                # a panel of your own
    raftorch reproduce all --profile paper --smoke         # first command on a new cluster: device
                                                           # checks, one short point per panel, a
                                                           # table of step times and projected
                                                           # device-hours (raftorch.experiments.smoke)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from raftorch.experiments import smoke
from raftorch.experiments.runner import StaleRun, parse_shard
from raftorch.experiments.spec import SpecError, available, load_panel, load_spec
from raftorch.experiments.suite import (duration, dry_run, estimate, export_results, reproduce, summary_line, verdict,
                                        write_report)
from raftorch.training.runlock import check_writable

PROG = "raftorch reproduce"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``raftorch reproduce``: the ``PANEL`` ids, ``--profile``, ``--list``, ``--spec``, the
    sweep's settings (``--results``, ``--jobs``, ``--shard``, ``--decide``, ...), ``--smoke`` and ``--export``."""
    p.add_argument("panels", nargs="*", metavar="PANEL",
                   help="panel ids (fig2, fig3a, ... as the paper labels them) or 'all'")
    p.add_argument("--profile", default="quick",
                   help="quick (minutes on a CPU, Fashion-MNIST), paper (the paper's settings, GPUs) or gap "
                        "(why RAF trails BP on the quick VGG and ViT: convergence and ablations, ~70 min on "
                        "2 CPU cores) (default quick)")
    p.add_argument("--list", action="store_true", help="list the panels of the profile: claims, runs, cost")
    p.add_argument("--spec", type=Path, metavar="YAML", action="append", help="run a panel spec file of your own (repeatable)")
    p.add_argument("--results", type=Path, default=Path("results"), metavar="DIR",
                   help="results root: runs go to DIR/PROFILE/PANEL/runs/POINT (default results)")
    p.add_argument("--jobs", type=int, default=None,
                   help="points run at once, each in its own process (default: one per idle core, one on a GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per job (default: the idle cores divided by --jobs, so 1 with the default jobs)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only the I-th of N deterministic slices of the points (for job arrays)")
    p.add_argument("--dry-run", action="store_true", help="print the points and the estimated cost, run nothing")
    p.add_argument("--redraw", action="store_true", help="only re-aggregate, re-check claims, redraw from saved runs")
    p.add_argument("--retry-failed", action="store_true", help="run points that failed before again")
    p.add_argument("--decide", action="store_true",
                   help="after the spec's seeds, add seeds round by round to the points that undecided "
                        "claims need, until each is decided or the cap is reached")
    p.add_argument("--max-seeds", type=int, default=None, metavar="N",
                   help="with --decide: at most N seeds per point (default: each spec's max_seeds, 8 unless it says)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder with the datasets for every run (else $RAFTORCH_DATA, else ~/.cache/raftorch)")
    p.add_argument("--device", default=None, help="device of every run: cpu, cuda, cuda:N (default: the spec's / auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (a line per finished point stays)")
    p.add_argument("--smoke", action="store_true",
                   help="first command on a new cluster: the device checks (raftorch.training.devicecheck), then each "
                        "panel's first point for a few optimizer steps with its real model, batch, optimizer and "
                        "rule (synthetic data of the dataset's shape where the dataset is missing, said per "
                        "panel), then a table of seconds per step and the projected device-hours of every "
                        "panel; writes no files; exit status 1 if a check or a point fails")
    p.add_argument("--smoke-steps", type=int, default=None, metavar="N",
                   help=f"with --smoke: timed optimizer steps per point, after {smoke.WARMUP} warm-up steps "
                        f"(default {smoke.DEFAULT_STEPS})")
    p.add_argument("--smoke-scale", choices=smoke.SCALES, default=None,
                   help="with --smoke: full (the spec's models and batches; default) or tiny (models shrunk, "
                        f"batches <= {smoke.TINY_BATCH}, images <= {smoke.TINY_IMAGE}x{smoke.TINY_IMAGE}: for a CPU "
                        "in CI; the times are not the paper's)")
    p.add_argument("--export", type=Path, default=None, metavar="DIR",
                   help="also copy the small result files (REPORT.md, each panel's summary.csv, points.csv, "
                        "claims.json and figures; no run folders) into DIR, e.g. docs/results/quick")


def _error(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


def _panels(args) -> list:
    if args.spec:
        return [load_spec(path, args.profile) for path in args.spec]
    names = args.panels
    if not names:
        raise SpecError("name a panel (e.g. fig3b), 'all', or use --list to see them")
    if "all" in names:
        names = available(args.profile)
        if not names:
            load_panel("?", args.profile)  # raises the unknown-profile message
    return [load_panel(n, args.profile) for n in names]


def _list(profile: str) -> str:
    names = available(profile)
    if not names:
        load_panel("?", profile)  # raises the unknown-profile message
    panels = [load_panel(n, profile) for n in names]
    rows, costs = [], []
    for p in panels:
        pts = p.points()
        est = estimate(p, pts)
        costs.append(est)
        rows.append((p.id, p.paper, len(pts), len(p.seeds), len(p.claims),
                     f"{duration(est)} on {p.cost.get('hardware', '?')}" if est is not None else "?", p.title))
    head = ("panel", "paper", "runs", "seeds", "claims", "estimated cost", "title")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    if all(c is not None for c in costs):
        out.append(f"total: {sum(r[2] for r in rows)} runs, {duration(sum(costs))} of compute "
                   f"(an upper bound: a point identical in two panels runs once)")
    for p in panels:
        out.append(f"\n{p.id}: {p.claim}")
        out += [f"  - {c['text']}" for c in p.claims]
    return "\n".join(out)


SMOKE_EXCLUDES = ("dry_run", "redraw", "retry_failed", "decide", "max_seeds", "shard", "jobs", "export")


def _smoke(args: argparse.Namespace) -> int:
    """``--smoke`` (:mod:`raftorch.experiments.smoke`); its exit status."""
    given = [f"--{k.replace('_', '-')}" for k in SMOKE_EXCLUDES if getattr(args, k) not in (None, False)]
    if given:
        one = len(given) == 1
        raise ValueError(f"--smoke runs one short point per panel in this process and writes nothing, so "
                         f"{', '.join(given)} {'does' if one else 'do'} not apply; drop {'it' if one else 'them'}")
    panels = _panels(args)
    try:
        return smoke.smoke(panels, device=args.device,
                           steps=smoke.DEFAULT_STEPS if args.smoke_steps is None else args.smoke_steps,
                           scale=args.smoke_scale or "full", data_dir=args.data_dir, threads=args.threads)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; --smoke writes nothing, so there is nothing to resume", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    """Run ``raftorch reproduce``: ``--list``, ``--smoke``, ``--dry-run``, or the panels' runs, claims, figures
    and report. Exit status 0 done, 1 a failed ``--smoke``, 2 a bad spec or setting (or a stale run folder),
    130 interrupted."""
    try:
        shard = parse_shard(args.shard)
        if args.list:
            print(_list(args.profile))
            return 0
        if args.max_seeds is not None and not args.decide:
            raise ValueError("--max-seeds caps the seeds --decide adds; give --decide too")
        if args.smoke:
            return _smoke(args)
        if args.smoke_steps is not None or args.smoke_scale is not None:
            raise ValueError("--smoke-steps and --smoke-scale set the --smoke run; give --smoke too")
        panels = _panels(args)
        check_writable(args.results, "--results")  # before any work
        if args.export is not None:
            check_writable(args.export, "--export")
        if args.dry_run:
            for p in panels:
                print(dry_run(p, args.results, shard, args.jobs))
            return 0
        start = time.perf_counter()
        results = reproduce(panels, args.results, jobs=args.jobs, threads=args.threads, shard=shard,
                            redraw=args.redraw, device=args.device, retry_failed=args.retry_failed,
                            data_dir=args.data_dir, progress=not args.no_progress, decide=args.decide,
                            max_seeds=args.max_seeds)
        wall = time.perf_counter() - start
        if "all" in args.panels or len(results) > 1:
            report = write_report(args.profile, results, args.results, wall_seconds=wall,
                                  jobs_threads=results[0].parallel, redraw=args.redraw)
            print(f"wrote {report}")
        if args.export is not None:
            written = export_results(args.profile, results, args.results, args.export)
            print(f"exported {len(written)} file(s) to {args.export}")
        print(f"{summary_line([c for r in results for c in r.claims])} ({duration(wall)}); "
              f"results in {args.results / args.profile}")
        if shard:
            print(f"shard {shard[0]}/{shard[1]} done; when every shard has finished, "
                  f"`{PROG} ... --redraw` aggregates them all")
        return 0
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; finished points are kept and killed ones resume from their "
              f"last checkpoint: run the same command again to continue", file=sys.stderr)
        return 130
    except (SpecError, StaleRun, ValueError) as exc:
        return _error(str(exc))


__all__ = ["add_arguments", "run", "verdict"]
