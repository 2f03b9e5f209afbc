"""The quick profile's wall time in units of a reference run measured in the same call.

Machines differ several-fold (convolutions above all), so the quick profile's budget is stated
in units of one reference run: fig3b's BP point (seed 0) trained alone with one thread, its
training seconds. This script measures the reference, then runs

    raftorch reproduce all --profile quick --results DIR [--decide] [--max-seeds N]

in a subprocess, and prints the command's wall time and each panel's point-seconds (the sum
of its runs' training seconds, ``summary.csv``) in those units. It writes the numbers to
``DIR/quick/budget.json`` (``budget-decide.json`` with ``--decide``, which on a results
folder of the default run measures what ``--decide`` adds). The budget: ``reproduce all --profile quick`` (default seeds, no
``--decide``) within 180 units on an idle machine.

    python benchmarks/quick_budget.py --results results            # the default profile
    python benchmarks/quick_budget.py --results results --decide   # with --decide (its default cap)
    python benchmarks/quick_budget.py --reference-only             # the unit alone

Run it on an idle machine: another process on the cores changes every number.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_UNITS = 180


def reference_seconds() -> float:
    """Training seconds of fig3b's BP point, seed 0, alone with one thread."""
    from raftorch import extension
    from raftorch.experiments.spec import load_panel
    from raftorch.training.loop import train

    extension.warm()
    point = next(p for p in load_panel("fig3b", "quick").points() if p.id == "bp_s0")
    with tempfile.TemporaryDirectory() as folder:
        final = train(dict(point.config, out=folder, threads=1), progress=False)
    return float(final["seconds_total"])


def panel_seconds(root: Path) -> dict[str, float]:
    """Each panel's summed training seconds of its finished runs (``summary.csv``)."""
    out = {}
    for path in sorted((root / "quick").glob("*/summary.csv")):
        with open(path, newline="") as f:
            out[path.parent.name] = sum(float(r["seconds"]) for r in csv.DictReader(f)
                                        if r.get("status") == "done" and r.get("seconds"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--decide", action="store_true", help="run reproduce with --decide")
    p.add_argument("--max-seeds", type=int, default=None)
    p.add_argument("--reference-only", action="store_true", help="measure the unit and stop")
    args = p.parse_args(argv)
    import torch

    from raftorch.experiments.suite import cpu_name
    from raftorch.training.threads import usable_cores

    ref = reference_seconds()
    print(f"reference (fig3b BP seed 0, 1 thread): {ref:.1f} s of training = 1 unit", flush=True)
    if args.reference_only:
        return 0
    cmd = [sys.executable, "-m", "raftorch", "reproduce", "all", "--profile", "quick", "--results",
           str(args.results), "--no-progress"] + (["--decide"] if args.decide else []) + (
        ["--max-seeds", str(args.max_seeds)] if args.max_seeds else [])
    start = time.perf_counter()
    rc = subprocess.call(cmd)
    wall = time.perf_counter() - start
    panels = panel_seconds(args.results)
    record = {"command": " ".join(["raftorch"] + cmd[3:]), "returncode": rc, "reference_seconds": round(ref, 2),
              "wall_seconds": round(wall, 1), "wall_units": round(wall / ref, 1),
              "panel_point_seconds": {k: round(v, 1) for k, v in panels.items()},
              "panel_point_units": {k: round(v / ref, 1) for k, v in panels.items()},
              "budget_units": BUDGET_UNITS, "cpu": cpu_name(), "torch": torch.__version__,
              "cores": usable_cores(), "date": datetime.date.today().isoformat()}
    out = args.results / "quick" / ("budget-decide.json" if args.decide else "budget.json")
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{record['command']}: {wall:.0f} s wall = {wall / ref:.1f} units "
          f"(budget {BUDGET_UNITS} for the default seeds); {record['cpu']}, {record['cores']} cores, "
          f"torch {record['torch']}")
    for name, secs in panels.items():
        print(f"  {name:8s} {secs:7.0f} point-seconds = {secs / ref:6.1f} units")
    print(f"wrote {out}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
