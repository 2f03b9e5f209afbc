"""Training-step time and memory of each rule against plain PyTorch backprop.

For each MLP, every variant (plain ``nn.Linear`` BP and raftorch's rules) is timed on the same
data, interleaved round by round in one process so that machine noise hits all alike; the
median step time of each is divided by plain BP's. A step is forward, cross-entropy,
backward and a fused Adam update, batch 256, r = 10.

    python benchmarks/bench_step.py                 # both MLPs, all rules
    python benchmarks/bench_step.py --rounds 10 --rules raf --models deep
    python benchmarks/bench_step.py --rules raf --python-path   # C++ fast path vs Python path

Memory: on CUDA the peak allocated memory of a step; on CPU the bytes saved for the backward
pass (activations) plus parameters, gradients and Adam state, which is where rules differ.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

import raftorch
from raftorch import extension

MODELS = {
    "paper": (3072, [512] * 4, 10),    # (a) the paper's MLP on CIFAR-10 inputs
    "deep": (1024, [1024] * 6, 10),    # (b) a deep square MLP
}
RULES = ["bp", "fa", "kp", "fa-lowrank", "raf-q", "raf"]


def mlp(n_in, hidden, n_out):
    layers, width = [], n_in
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, n_out))


def make_step(model, batches, bf16_device: str | None = None):
    """One training step per call, cycling through ``batches`` (random labels cannot be
    memorised, so gradients never shrink towards denormal numbers). With ``bf16_device``
    (``"cpu"``, ``"cuda"``) the forward and loss run under bf16 autocast on that device."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    i = 0

    def step():
        nonlocal i
        x, y = batches[i % len(batches)]
        i += 1
        with torch.autocast(bf16_device or "cpu", dtype=torch.bfloat16, enabled=bf16_device is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def state_bytes(model):
    """Parameters + gradients + Adam's two moments, for the trainable parameters."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size() * (4 if p.requires_grad else 1)
    return total


def saved_bytes(model, x, y):
    """Bytes the autograd graph keeps for the backward pass of one step (parameters, which
    the graph references but does not copy, are counted in :func:`state_bytes` instead)."""
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def peak_cuda(step):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def in_context(step, context):
    def run():
        with context():
            step()
    return run


def bench(name, rules, rounds, steps, batch, rank, device, python_path=False):
    n_in, hidden, n_out = MODELS[name]
    torch.manual_seed(0)
    base = mlp(n_in, hidden, n_out).to(device)
    batches = [(torch.randn(batch, n_in, device=device), torch.randint(0, n_out, (batch,), device=device))
               for _ in range(8)]
    x, y = batches[0]
    variants = {"nn.Linear (BP)": base}
    contexts = {}
    for rule in rules:
        variants[rule] = raftorch.convert(base, rule, rank if get_low_rank(rule) else None)
        if python_path and get_low_rank(rule):
            key = f"{rule} (Python path)"
            variants[key] = raftorch.convert(base, rule, rank)
            contexts[key] = extension.disabled
    steps_fn = {k: in_context(make_step(m, batches), contexts.get(k, nullcontext))
                for k, m in variants.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in steps_fn.values():  # warm-up (allocations, Adam state, kernel choice)
        for _ in range(3):
            fn()
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in steps_fn.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            times[k].append((time.perf_counter() - t0) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["nn.Linear (BP)"]
    fast = "on" if extension.get() is not None and device.type == "cpu" else "off"
    print(f"\n### ({name}) input {n_in}, hidden {'x'.join(map(str, hidden))}, {n_out} classes, "
          f"batch {batch}, r = {rank}, {device.type}, {torch.get_num_threads()} threads, "
          f"median of {rounds} rounds x {steps} steps, C++ fast path {fast}\n")
    mem_col = "peak memory (MB)" if device.type == "cuda" else "saved for backward + optimizer state (MB)"
    print(f"| variant | step (ms) | ratio to BP | {mem_col} |")
    print("|---|---|---|---|")
    for k, m in variants.items():
        if device.type == "cuda":
            mem = peak_cuda(steps_fn[k]) / 2**20
        else:
            with contexts.get(k, nullcontext)():
                mem = (saved_bytes(m, x, y) + state_bytes(m)) / 2**20
        print(f"| {k} | {1000 * med[k]:.2f} | {med[k] / ref:.3f} | {mem:.1f} |")
    return med


def get_low_rank(rule):
    return raftorch.get_rule(rule).low_rank


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="paper,deep")
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--python-path", action="store_true",
                   help="also time each low-rank rule on the Python path (C++ fast path off)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}")
    for name in args.models.split(","):
        bench(name, args.rules.split(","), args.rounds, args.steps, args.batch, args.rank, device,
              args.python_path)


if __name__ == "__main__":
    main()
