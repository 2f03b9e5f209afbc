"""Training-step time of RAF against plain-PyTorch BP for the paper's convolutional and
transformer models, beside each model's arithmetic limit and memory.

Same discipline as ``bench_step.py``: both variants (the plain PyTorch model as BP, and its
RAF conversion) are timed interleaved, round by round, in one process, on the same batches;
the median step (forward, cross-entropy, backward, fused Adam) of RAF is divided by BP's. The
limit is ``raftorch.cost.step_macs`` of the RAF model over the BP model's (multiply-adds per
layer from the shapes; attention products counted, norms and activations not).

    python benchmarks/bench_models.py                       # (c) (d) (e) and the quick models
    python benchmarks/bench_models.py --models vgg-block4,retina --rounds 9 --threads 2

Models: (c) ``vgg`` the paper's VGG (Table C1, 32x32x3, batch 64) every conv and linear at
r = 10, ``vgg-block4`` only block 4 at r = 10; (d) ``vit32`` / ``vit128`` the paper's ViT
(patch 4, dim 384, 7 blocks, 4 heads, mlp ratio 2) every linear at r = 10, batch 32 / 128;
(e) ``retina`` the retina-VVS net (32 channels, 9x9, grayscale 32x32, batch 64) every layer
at r = 4; ``vgg-quick``, ``vit-quick``: the quick profile's VGG (width 1/4, 28x28x1, batch 128)
and ViT (dim 64, 2 blocks), r = 10.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import raftorch
from raftorch.cost import step_macs
from raftorch.models import build_model

from bench_step import make_step, saved_bytes, state_bytes  # noqa: E402  (benchmarks/ is the script dir)

# name -> (model, input shape, batch, model options, rank, ranks)
MODELS = {
    "vgg": ("vgg", (3, 32, 32), 64, {}, 10, None),
    "vgg-block4": ("vgg", (3, 32, 32), 64, {}, None, {"features.block4.*": 10}),
    "vit32": ("vit", (3, 32, 32), 32, {}, 10, None),
    "vit128": ("vit", (3, 32, 32), 128, {}, 10, None),
    "retina": ("retina", (1, 32, 32), 64, {}, 4, None),
    "vgg-quick": ("vgg", (1, 28, 28), 128, {"width_mult": 0.25}, 10, None),
    "vit-quick": ("vit", (1, 28, 28), 128, {"dim": 64, "depth": 2}, 10, None),
    # the README per-model table's retina (8 channels: r = 10 is full rank in its convolutions)
    "retina-quick": ("retina", (1, 28, 28), 128, {"channels": 8, "bottleneck": 8, "fc": 128}, 10, None),
}


def build(name):
    model, shape, batch, options, rank, ranks = MODELS[name]
    torch.manual_seed(0)
    bp = build_model(model, shape, 10, **options)
    if ranks:
        raf = raftorch.convert(bp, "bp")
        raftorch.convert(raf, "raf", include=list(ranks), ranks=ranks, rank="full", inplace=True)
    else:
        raf = raftorch.convert(bp, "raf", rank)
    batches = [(torch.randn(batch, *shape), torch.randint(0, 10, (batch,))) for _ in range(4)]
    return bp, raf, batches


def bench(name, rounds, steps):
    bp, raf, batches = build(name)
    x, y = batches[0]
    limit = step_macs(raf, x)[0] / step_macs(bp, x)[0]
    fns = {"BP": make_step(bp, batches), "RAF": make_step(raf, batches)}
    for fn in fns.values():
        for _ in range(2):
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[k].append((time.perf_counter() - t0) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {k: (saved_bytes(m, x, y) + state_bytes(m)) / 2**20 for k, m in (("BP", bp), ("RAF", raf))}
    return med, limit, mem


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} rounds "
          f"x {args.steps} steps, interleaved\n")
    print("| model | BP step (ms) | RAF step (ms) | RAF / BP | arithmetic limit | memory BP / RAF (MB) |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        med, limit, mem = bench(name, args.rounds, args.steps)
        print(f"| {name} | {1000 * med['BP']:.0f} | {1000 * med['RAF']:.0f} | {med['RAF'] / med['BP']:.3f} | "
              f"{limit:.3f} | {mem['BP']:.0f} / {mem['RAF']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
