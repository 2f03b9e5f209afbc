"""``raftorch theory``: run the Figure-2 set of the linear theory, print a table, save JSON + PNG."""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from raftorch.theory.experiments import DEFAULT_TASK, Figure2Config, format_table, run_figure2
from raftorch.theory.figure import draw_figure
from raftorch.theory.result import save_results


def _strengths(text: str) -> list[float] | int:
    try:
        if "," not in text and "." not in text:
            value = int(text)
            if value < 1:
                raise ValueError
            return value
        values = [float(v) for v in text.split(",") if v.strip()]
        if not values or not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError
        return values
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither comma-separated positive numbers (e.g. 8,6,4.5,3,2) nor a whole number "
            f"d >= 1 (d random strengths)"
        ) from None


def _path(text: str) -> Path:
    if not text.strip():  # Path("") would be the current folder
        raise argparse.ArgumentTypeError("is empty; give a path, or leave the flag out")
    return Path(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``raftorch theory``: ``--out``, ``--seed``, ``--method``, the task (``--strengths``, sizes,
    samples, noise), the ranks, the flow and SGD settings, ``--tol`` and ``--redraw``."""
    t = DEFAULT_TASK
    parser.add_argument("--out", type=_path, default=None,
                        help="folder for theory.json and figure2.png (default: print the table only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task and the initial weights (default 0)")
    parser.add_argument("--method", choices=("ode", "sim", "both"), default="both",
                        help="ode: solve_ivp on the flow; sim: SGD on the samples; both (default)")
    parser.add_argument("--strengths", type=_strengths, default=t["strengths"],
                        help="mode strengths of A, comma-separated, or an int d for random ones (default 8,6,4.5,3,2)")
    parser.add_argument("--n-in", type=int, default=t["n_in"])
    parser.add_argument("--n-hidden", type=int, default=t["n_hidden"])
    parser.add_argument("--n-out", type=int, default=t["n_out"])
    parser.add_argument("--samples", type=int, default=t["n_samples"], help="number of training samples")
    parser.add_argument("--noise", type=float, default=t["noise"], help="std of the target noise")
    parser.add_argument("--rank-low", type=int, default=3, help="feedback rank r < d (default 3)")
    parser.add_argument("--rank-high", type=int, default=None, help="feedback rank r >= d (default d)")
    parser.add_argument("--t-end", type=float, default=10.0, help="flow time t = steps x lr (default 10)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01)")
    parser.add_argument("--batch-size", type=int, default=None, help="SGD mini-batch size (default: full batch)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="lambda on Q for raf-q and raf (default 0)")
    parser.add_argument("--init-scale", type=float, default=1e-3, help="std of the initial W1, W2 entries")
    parser.add_argument("--tol", type=float, default=0.02, help="a mode is recovered within this relative error")
    parser.add_argument("--redraw", type=_path, default=None, metavar="JSON",
                        help="only redraw the figure from a saved theory.json (to --out, or next to the JSON)")


def check_arguments(args: argparse.Namespace) -> None:
    """One ``ValueError`` for a flag no later check catches before it breaks the work: a number
    that is infinite or NaN (``--t-end inf``), a ``--seed`` or ``--batch-size`` out of range,
    ``--tol`` <= 0 (an empty ``--out`` is argparse's error). The theory's own checks
    (:mod:`raftorch.theory.task`, ``ode``, ``simulate``) say what is wrong with a finite value."""
    for name in ("t_end", "lr", "noise", "weight_decay", "init_scale", "tol"):
        value = getattr(args, name)
        if not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if args.tol <= 0:
        raise ValueError(f"--tol is the relative error within which a mode counts as recovered and must be "
                         f"> 0, got {args.tol} (e.g. 0.02)")
    if args.seed < 0:
        raise ValueError(f"--seed must be a whole number >= 0, got {args.seed}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive whole number, got {args.batch_size} (or leave it "
                         f"out for full-batch SGD)")


def run(args: argparse.Namespace) -> int:
    """Run ``raftorch theory``: the Figure-2 runs, their table, and with ``--out`` ``theory.json`` and
    ``figure2.png`` (or only ``--redraw``). Exit status 0 done, 2 a bad flag or a JSON it cannot redraw from."""
    try:
        check_arguments(args)
    except ValueError as exc:
        print(f"raftorch theory: error: {exc}", file=sys.stderr)
        return 2
    if args.redraw is not None:
        png = (args.out or args.redraw.parent) / "figure2.png"
        try:
            print(f"wrote {draw_figure(args.redraw, png)}")
        except (OSError, ValueError, KeyError) as exc:
            print(f"raftorch theory: error: cannot redraw from {args.redraw}: {exc}", file=sys.stderr)
            return 2
        return 0
    task = {"n_in": args.n_in, "n_hidden": args.n_hidden, "n_out": args.n_out, "strengths": args.strengths,
            "n_samples": args.samples, "noise": args.noise}
    methods = ("ode", "sim") if args.method == "both" else (args.method,)
    config = Figure2Config(task=task, seed=args.seed, rank_low=args.rank_low, rank_high=args.rank_high,
                           methods=methods, t_end=args.t_end, lr=args.lr, batch_size=args.batch_size,
                           weight_decay=args.weight_decay, init_scale=args.init_scale)
    start = time.perf_counter()
    try:
        if args.out is not None:  # before the work, not after it
            from raftorch.training.runlock import check_writable

            check_writable(args.out)
        linear_task, results = run_figure2(config)
    except ValueError as exc:  # bad parameters: say what and how to fix, no traceback
        print(f"raftorch theory: error: {exc}", file=sys.stderr)
        return 2
    print(linear_task)
    print(format_table(results, args.tol))
    print(f"({len(results)} runs in {time.perf_counter() - start:.1f} s; t_end={args.t_end}, lr={args.lr})")
    if args.out is not None:
        meta = {"task": linear_task.config(), "panels": config.panels(),
                "config": {k: v for k, v in vars(config).items() if k != "task"}}
        path = save_results(args.out / "theory.json", results, meta)
        png = draw_figure(path, args.out / "figure2.png")
        print(f"wrote {path} and {png}")
    return 0
