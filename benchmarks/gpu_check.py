"""One short correctness and speed check of raftorch on a GPU (under 5 minutes on one GPU).

    python benchmarks/gpu_check.py                            # on a machine with a GPU (cuda)
    python benchmarks/gpu_check.py --models paper,vgg --rounds 9
    python benchmarks/gpu_check.py --device cpu --quick       # smoke test, well under a minute

Part 1, checks: :func:`raftorch.training.devicecheck.run_checks` (in the package, so that
``raftorch reproduce --smoke`` runs them too; its docstring lists them): (i) rule ``bp`` is
autograd, (ii) RAF with exact feedback ``Q P = W^T`` sends BP's gradients, (iii) the low-rank
backward on the device equals its definitions computed on the CPU in float64, (iv) the C++ fast
path (CPU only) equals the Python path. Each is printed as PASS / FAIL with its largest absolute
error against the tolerance (TF32 off while they run).

Part 2, timing: the training step (forward, cross-entropy, backward, Adam with
``fused=True``) of RAF against the plain PyTorch BP model, in float32 (PyTorch's default TF32
settings, printed in the header) and under ``torch.autocast(device, dtype=torch.bfloat16)``,
all four variants of a model interleaved round by round in one process, median over rounds,
timed with CUDA events (``time.perf_counter`` on CPU). Models: (a) ``paper`` and (b) ``deep``,
the MLPs of ``bench_step.py`` (batch 256, r = 10); (c) ``vgg``, ``vgg-block4``, (d) ``vit32``,
``vit128``, (e) ``retina`` and the quick ``vgg-quick``, ``vit-quick`` of ``bench_models.py``
(its ``build()``). On CUDA the peak allocated memory of one step of each variant, measured with
that variant alone on the device (parameters, gradients, Adam state, activations, workspace).
``--quick``: tiny layers in the checks; in the timing batches of 8, one round of one step
(on the CPU, one thread: a smoke test, not a measurement). ``--models none``: the checks only.

The exit status is non-zero if a check fails or a model fails to run. Nothing in CI assumes a
GPU: ``tests/test_gpu_check.py`` runs this script on the CPU with ``--quick``.
"""
from __future__ import annotations

import argparse
import copy
import gc
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_step, bench_models

import raftorch  # noqa: E402
from raftorch.training.devicecheck import run_checks  # noqa: E402
from bench_models import MODELS as NETS, build  # noqa: E402
from bench_step import MODELS as MLPS, make_step, mlp  # noqa: E402

LABELS = {"paper": "(a) paper MLP", "deep": "(b) deep MLP", "vgg": "(c) VGG",
          "vgg-block4": "(c) VGG, block 4 RAF",
          "vit32": "(d) ViT, batch 32", "vit128": "(d) ViT, batch 128", "retina": "(e) retina-VVS",
          "vgg-quick": "quick VGG", "vit-quick": "quick ViT"}
ALL_MODELS = list(MLPS) + list(NETS)
QUICK_MODELS = ["paper", "vgg-quick", "vit-quick"]


# --------------------------------------------------------------------------- timing


def models_for(name, quick):
    """(BP model, RAF model, batches), all on the CPU."""
    if name in MLPS:
        n_in, hidden, n_out = MLPS[name]
        torch.manual_seed(0)
        bp = mlp(n_in, hidden, n_out)
        raf = raftorch.convert(bp, "raf", 10)
        batches = [(torch.randn(256, n_in), torch.randint(0, n_out, (256,))) for _ in range(4)]
    else:
        bp, raf, batches = build(name)
    if quick:
        batches = [(x[:8], y[:8]) for x, y in batches]
    return bp, raf, batches


def elapsed(device):
    """``start()`` returns a function giving the seconds since the start, synchronised."""
    if device.type == "cuda":
        def start():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()

            def stop():
                b.record()
                b.synchronize()
                return a.elapsed_time(b) / 1000
            return stop
    else:
        def start():
            t0 = time.perf_counter()
            return lambda: time.perf_counter() - t0
    return start


def peak_mb(model_cpu, batches, device, bf16, warmup):
    """Peak allocated memory of one step with only this variant (and the batches) on the device."""
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    model = copy.deepcopy(model_cpu).to(device)
    step = make_step(model, batches, device.type if bf16 else None)
    for _ in range(max(warmup, 1)):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del step, model
    gc.collect()
    return peak / 2**20


def time_model(name, device, rounds, steps, warmup, quick):
    bp_cpu, raf_cpu, batches = models_for(name, quick)
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    variants = [(m, dtype) for dtype in ("float32", "bf16") for m in ("BP", "RAF")]
    cpu_models = {"BP": bp_cpu, "RAF": raf_cpu}
    mem = {}
    if device.type == "cuda":
        for m, dtype in variants:
            mem[m, dtype] = peak_mb(cpu_models[m], batches, device, dtype == "bf16", warmup)
    fns = {(m, dtype): make_step(copy.deepcopy(cpu_models[m]).to(device), batches,
                                   device.type if dtype == "bf16" else None)
           for m, dtype in variants}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    start = elapsed(device)
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            stop = start()
            for _ in range(steps):
                fn()
            times[k].append(stop() / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for dtype in ("float32", "bf16"):
        bp, raf = med["BP", dtype], med["RAF", dtype]
        mems = f"{mem['BP', dtype]:.0f} / {mem['RAF', dtype]:.0f}" if mem else "-"
        rows.append(f"| {LABELS.get(name, name)} | {dtype} | {1000 * bp:.2f} | {1000 * raf:.2f} | "
                    f"{raf / bp:.3f} | {mems} |")
    del fns
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- main


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny shapes, one round of one step (CPU smoke test)")
    p.add_argument("--models", default=None,
                   help=f"comma list of {','.join(ALL_MODELS)}; 'none' for the checks only "
                        f"(default: all; with --quick: {','.join(QUICK_MODELS)})")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default 7; 1 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="steps per round (default 10; 1 with --quick)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False "
                "(use --device cpu --quick for a smoke test)")
    models = args.models or ",".join(QUICK_MODELS if args.quick else ALL_MODELS)
    models = [] if models == "none" else models.split(",")
    unknown = [m for m in models if m not in ALL_MODELS]
    if unknown:
        p.error(f"unknown models {unknown}; choose from {ALL_MODELS}")
    rounds = args.rounds or (1 if args.quick else 7)
    steps = args.steps or (1 if args.quick else 10)
    warmup = 1 if args.quick else 3
    torch.set_flush_denormal(True)
    if args.quick and device.type == "cpu":
        torch.set_num_threads(1)  # a smoke test, not a measurement: no thread hand-offs on a busy CPU

    print(f"## checks on {args.device} (TF32 off)\n", flush=True)
    checks = run_checks(device, args.quick)

    rows, errors = [], []
    for name in models:
        try:
            rows += time_model(name, device, rounds, steps, warmup, args.quick)
        except Exception as exc:
            errors.append(name)
            rows.append(f"| {LABELS.get(name, name)} | - | failed: {type(exc).__name__}: {exc} | | | |")
        print(f"timed {name}", file=sys.stderr, flush=True)

    tf32 = (f"matmul TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}, "
            f"cuDNN TF32 {'on' if torch.backends.cudnn.allow_tf32 else 'off'}")
    print(f"\ntorch {torch.__version__}, {device_name(device)}; checks: {checks.summary()}")
    if models:
        timer = "CUDA events" if device.type == "cuda" else "perf_counter"
        print(f"timing: median of {rounds} rounds x {steps} steps, interleaved, {timer}, fused Adam; "
              f"float32 with PyTorch's defaults ({tf32}); bf16 = torch.autocast(bfloat16)"
              + ("; --quick: batches of 8" if args.quick else "") + "\n")
        print("| model | dtype | BP ms | RAF ms | RAF/BP | peak MB BP / RAF |")
        print("|---|---|---|---|---|---|")
        print("\n".join(rows))
    failed = bool(checks.failed or errors)
    if failed:
        print(f"\nfailed: {len(checks.failed)} check(s)"
              + (f", models {errors} did not run" if errors else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
