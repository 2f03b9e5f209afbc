"""Training-step time of full-rank learned feedback on the quick VGG: RAF at full rank against
Kolen-Pollack (``kp``, the other learned full-rank feedback) and plain-PyTorch BP.

Every variant is timed on the same batches, interleaved round by round in one process (as
``bench_step.py``), and its median step (forward, cross-entropy, backward, fused Adam) is
divided by KP's and by BP's. ``RAF, factored`` is RAF at full rank with the kernel ``P^T Q``
path switched off (``z = P g`` then its transposed convolution, Oja from ``z``), to show what
:func:`raftorch.functional._combine_kernel` buys.

    python benchmarks/bench_conv_feedback.py                  # 16 x 16 batch 64 (quick fig3e) and 28 x 28 batch 128
    python benchmarks/bench_conv_feedback.py --rounds 15 --threads 1

The goal it checks: a full-rank RAF step costs at most 1.10x a KP step. Beside the measured
ratio it prints the arithmetic floor of that ratio (:func:`floor`): the multiply-adds any
implementation of full-rank RAF needs on top of KP's, over KP's (the rule-independent work,
BatchNorm, pooling and the optimizer, then dilutes it in a measured step).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from contextlib import contextmanager

import torch

import raftorch
import raftorch.functional as RF
from raftorch.models import build_model

from bench_step import make_step  # noqa: E402  (benchmarks/ is the script dir)

SETTINGS = {"16px-b64": ((1, 16, 16), 64), "28px-b128": ((1, 28, 28), 128)}


@contextmanager
def factored():
    real = RF._combine_kernel
    RF._combine_kernel = lambda *args: False
    try:
        yield
    finally:
        RF._combine_kernel = real


def floor(model, x) -> float:
    """The least multiply-adds of a full-rank RAF step over a KP step, from the layers' shapes
    (:func:`raftorch.cost.step_macs`: forward, input and weight gradients). Per layer with ``M``
    rows, ``n_in`` inputs, ``n_out = r`` outputs, RAF adds to KP's products ``grad_Q = P grad_W``
    (``r n_out n_in``, a convolution; a Linear forms it from ``z``: ``M n_in r``), the error's
    way through ``P`` (the kernel ``P^T Q``, ``r n_out n_in``, or ``z = P g``, ``M n_out r``: the
    cheaper), Oja's statistics ``z^T e`` or the Gram matrix (``M r n_out``) and its ``r x r``
    products (``3 r^3``); KP's ``grad_B`` is ``grad_W`` itself."""
    from raftorch.cost import step_macs

    kp, costs, _ = step_macs(raftorch.convert(model, "kp"), x)
    extra = 0
    for c in costs:
        m, n_in, r = c.rows, c.n_in, c.n_out
        conv = c.rows != x.shape[0]  # a convolution: rows are pixels
        grad_q = r * r * n_in if conv else m * n_in * r
        extra += grad_q + min(r * r * n_in, m * r * r) + m * r * r + 3 * r ** 3
    return (kp + extra) / kp


def bench(shape, batch, rounds, steps):
    torch.manual_seed(0)
    bp = build_model("vgg", shape, 10, width_mult=0.25)
    models = {"BP": bp, "KP": raftorch.convert(bp, "kp"), "RAF, full rank": raftorch.convert(bp, "raf", "full"),
              "RAF, factored": raftorch.convert(bp, "raf", "full")}
    batches = [(torch.randn(batch, *shape), torch.randint(0, 10, (batch,))) for _ in range(4)]
    fns = {k: make_step(m, batches) for k, m in models.items()}

    def call(name):
        if name == "RAF, factored":
            with factored():
                fns[name]()
        else:
            fns[name]()

    for name in fns:
        for _ in range(2):
            call(name)
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for name in fns:
            t0 = time.perf_counter()
            for _ in range(steps):
                call(name)
            times[name].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    from raftorch.experiments.suite import cpu_name
    print(f"`python benchmarks/bench_conv_feedback.py --rounds {args.rounds} --steps {args.steps} --threads "
          f"{args.threads}`, {datetime.date.today()}: quick VGG (width 1/4), {cpu_name()} "
          f"({os.cpu_count()} cores), torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of "
          f"{args.rounds} rounds x {args.steps} steps, interleaved\n")
    print("| input, batch | BP (ms) | KP (ms) | RAF full rank (ms) | RAF / KP | RAF / BP | RAF factored / KP | "
          "RAF / KP floor (multiply-adds) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.settings.split(","):
        shape, batch = SETTINGS[name]
        med = bench(shape, batch, args.rounds, args.steps)
        torch.manual_seed(0)
        floors = {name: floor(build_model("vgg", shape, 10, width_mult=0.25), torch.randn(batch, *shape))}
        ms = {k: 1000 * v for k, v in med.items()}
        print(f"| {name} | {ms['BP']:.1f} | {ms['KP']:.1f} | {ms['RAF, full rank']:.1f} | "
              f"{med['RAF, full rank'] / med['KP']:.3f} | {med['RAF, full rank'] / med['BP']:.3f} | "
              f"{med['RAF, factored'] / med['KP']:.3f} | {floors[name]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
