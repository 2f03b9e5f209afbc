"""One short correctness and speed check of raftorch on a GPU (under 5 minutes on one GPU).

    python benchmarks/gpu_check.py                            # on a machine with a GPU (cuda)
    python benchmarks/gpu_check.py --models paper,vgg --rounds 9
    python benchmarks/gpu_check.py --device cpu --quick       # smoke test, well under a minute

Part 1, checks (TF32 off for matmuls and cuDNN while they run, so float32 is float32), each
printed as PASS / FAIL with its largest absolute error against the tolerance:

* (i) rule ``bp``: ``raftorch.convert`` of an ``nn.Linear`` / ``nn.Conv2d`` gives the same
  forward output and input, weight and bias gradients as plain autograd, on the device;
* (ii) RAF with exact feedback ``Q P = W^T`` (``Q``, ``P`` frozen; Linear: rank ``n_out``,
  ``P = I``, ``Q = W^T``; Conv2d: rank ``C_out``, ``P = I``, ``Q = W``) sends exactly BP's
  input gradient (and the same weight and bias gradients);
* (iii) the low-rank backward on the device (conv: ``grad_input``, ``grad_W``, ``grad_b``,
  ``grad_Q``, ``grad_P``; several geometries, channels_last, ``W`` frozen; and the Linear
  layer's) equals its definitions computed on the CPU in float64: ``z = P g`` per pixel,
  ``grad_input`` and ``grad_Q`` the input and weight gradients of ``conv(x, Q)`` for output
  gradient ``z``, Oja's rule by hand (on ``--device cpu`` one case also runs with
  ``raftorch.functional.HOST_SCALARS = False``, the branch a GPU takes);
* (iv) the C++ fast path (``raftorch._ext``) is CPU only: on CUDA the check says so (and that
  the layer runs the Python path there); on CPU it compares the C++ path with the Python path.

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
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_step, bench_models

import raftorch  # noqa: E402
from raftorch import _ext  # noqa: E402
from raftorch import functional as RF  # noqa: E402
from bench_models import MODELS as NETS, build  # noqa: E402
from bench_step import MODELS as MLPS, make_step, mlp  # noqa: E402

LABELS = {"paper": "(a) paper MLP", "deep": "(b) deep MLP", "vgg": "(c) VGG",
          "vgg-block4": "(c) VGG, block 4 RAF",
          "vit32": "(d) ViT, batch 32", "vit128": "(d) ViT, batch 128", "retina": "(e) retina-VVS",
          "vgg-quick": "quick VGG", "vit-quick": "quick ViT"}
ALL_MODELS = list(MLPS) + list(NETS)
QUICK_MODELS = ["paper", "vgg-quick", "vit-quick"]

# Tolerances: |got - want| <= ATOL * max|want| + RTOL * |want| elementwise (float32 sums round
# relative to the size of the summed terms, not of each entry).
SAME = (2e-5, 1e-5)   # (i): the same computation (cuDNN may pick another algorithm per call)
EXACT = (1e-4, 1e-4)  # (ii): BP's input gradient by another route (P = I, flipped forward conv)
DEF64 = (1e-4, 1e-4)  # (iii): float32 on the device against float64 definitions on the CPU

CONV_GEOMETRIES = {
    "s1 p1": dict(stride=1, padding=1, dilation=1, groups=1),
    "s2 p0": dict(stride=2, padding=0, dilation=1, groups=1),
    "s(2,1) p(1,2) d(1,2)": dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=1),
    "s1 p1 g2": dict(stride=1, padding=1, dilation=1, groups=2),
    "s1 p3 (fallback)": dict(stride=1, padding=3, dilation=1, groups=1),
}


# --------------------------------------------------------------------------- checks


class Checks:
    def __init__(self):
        self.results = []  # (name, status, detail)

    def report(self, name, status, detail=""):
        self.results.append((name, status, detail))
        print(f"{status:4s}  {name}{'  ' + detail if detail else ''}", flush=True)

    def run(self, name, fn):
        """``fn()`` returns ``[(tensor name, got, want, (atol, rtol))]``; PASS if all are close."""
        try:
            pairs = fn()
        except Exception as exc:  # a crash on the device is a failed check, not the end of the run
            self.report(name, "FAIL", f"raised {type(exc).__name__}: {exc}")
            return
        worst, used, bad = (-1.0, "", 0.0), 0.0, []
        for key, got, want, (atol, rtol) in pairs:
            if got is None or want is None or tuple(got.shape) != tuple(want.shape):
                bad.append(f"{key}: {'missing' if got is None or want is None else 'shape'}")
                continue
            got = got.detach().to("cpu", torch.float64)
            want = want.detach().to("cpu", torch.float64)
            if not got.numel():
                continue
            err = (got - want).abs()
            scale = want.abs().max().item()
            limit = atol * max(scale, 1e-30) + rtol * want.abs()
            if not torch.isfinite(got).all() or (err > limit).any():
                bad.append(key)
            used = max(used, (err / limit).max().item())
            if err.max().item() > worst[0]:
                worst = (err.max().item(), key, scale)
        if worst[0] > 0:
            detail = (f"max abs err {worst[0]:.2e} ({worst[1]}, max |ref| {worst[2]:.1e}; "
                      f"{used:.2g} of tolerance)")
        else:
            detail = "max abs err 0 (all equal)"
        if bad:
            detail += "; not close: " + ", ".join(bad)
        self.report(name, "FAIL" if bad else "PASS", detail)

    @property
    def failed(self):
        return [n for n, s, _ in self.results if s == "FAIL"]

    def summary(self):
        counted = [s for _, s, _ in self.results if s in ("PASS", "FAIL")]
        text = f"{counted.count('PASS')}/{len(counted)} PASS"
        if self.failed:
            text += f", {len(self.failed)} FAIL (listed above)"
        return text


def grads(module, x, w):
    """Output and input/parameter gradients of the linear functional ``<module(x), w>``."""
    for p in module.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(w)
    out = {"output": y.detach(), "input": x.grad}
    out.update({n: p.grad for n, p in module.named_parameters() if p.grad is not None})
    return out


def compare(got, want, keys, tol):
    return [(k, got.get(k), want.get(k), tol) for k in keys]


def out_grad(module, x):
    """A fixed random output gradient (drawn on the CPU, so the same on every device)."""
    with torch.no_grad():
        shape = module(x).shape
    return torch.randn(shape).to(x.device)


def hand_oja(P, e, center, scale, ddof, reduce):
    """Oja's update of ``P`` from the rows of the signal ``e``, formed explicitly (float64):
    ``-(z^T e - z^T z P)`` with ``z = e P^T`` on the centred, scaled signal."""
    rows = e.shape[0]
    if center:
        e = e - e.mean(0)
    var = e.pow(2).sum(0) / (rows - ddof)
    e = e / {"maxstd": var.max().sqrt(), "rms": var.mean().sqrt(), "std": var.sqrt(), "none": 1.0}[scale]
    z = e @ P.t()
    grad = -(z.t() @ e - z.t() @ z @ P)
    return grad / rows if reduce == "mean" else grad


def conv_definitions(conv, x, g):
    """The low-rank conv backward from its definitions, on the CPU in float64."""
    geo = dict(stride=conv.geometry.stride, padding=conv.geometry.padding,
               dilation=conv.geometry.dilation, groups=conv.groups)
    x, g = x.detach().to("cpu", torch.float64), g.to("cpu", torch.float64)
    W = conv.weight.detach().to("cpu", torch.float64).requires_grad_()
    b = conv.bias.detach().to("cpu", torch.float64).requires_grad_()
    Q = conv.Q.detach().to("cpu", torch.float64).requires_grad_()
    P = conv.P.detach().to("cpu", torch.float64)
    F.conv2d(x, W, b, **geo).backward(g)
    z = torch.einsum("ko,nohw->nkhw", P, g)  # P applied to the error at every pixel
    xv = x.clone().requires_grad_()
    F.conv2d(xv, Q, None, **geo).backward(z)  # the virtual convolution x -> conv(x, Q)
    e = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])  # pixels are rows
    o = conv.oja
    return {"input": xv.grad, "weight": W.grad, "bias": b.grad, "Q": Q.grad,
            "P": hand_oja(P, e, o.center, o.scale, o.ddof, o.reduce)}


def linear_definitions(lin, x, g):
    x = x.detach().to("cpu", torch.float64).reshape(-1, lin.in_features)
    g = g.to("cpu", torch.float64).reshape(-1, lin.out_features)
    P, Q = lin.P.detach().to("cpu", torch.float64), lin.Q.detach().to("cpu", torch.float64)
    z = g @ P.t()
    o = lin.oja
    return {"input": z @ Q.t(), "weight": g.t() @ x, "bias": g.sum(0), "Q": x.t() @ z,
            "P": hand_oja(P, g, o.center, o.scale, o.ddof, o.reduce)}


def run_checks(device, quick):
    checks = Checks()
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        _checks(checks, device, quick)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    return checks


def _checks(checks, device, quick):
    n_in, n_out, rows, tokens = (12, 9, 5, 3) if quick else (384, 256, 64, 16)
    c_in, c_out, n, hw = (4, 8, 2, (9, 8)) if quick else (16, 32, 8, (20, 18))
    r = 2 if quick else 8

    # (i) bp is autograd
    for shape, label in [((rows, n_in), "batch"), ((tokens, rows, n_in), "tokens")]:
        def bp_linear(shape=shape):
            torch.manual_seed(0)
            plain = nn.Linear(n_in, n_out).to(device)
            x = torch.randn(*shape).to(device)
            w = out_grad(plain, x)
            return compare(grads(raftorch.convert(plain, "bp"), x, w), grads(plain, x, w),
                           ("output", "input", "weight", "bias"), SAME)
        checks.run(f"(i) bp Linear = autograd, {label}", bp_linear)
    for label, geom in CONV_GEOMETRIES.items():
        def bp_conv(geom=geom):
            torch.manual_seed(0)
            plain = nn.Conv2d(c_in, c_out, 3, **geom).to(device)
            x = torch.randn(n, c_in, *hw).to(device)
            w = out_grad(plain, x)
            return compare(grads(raftorch.convert(plain, "bp"), x, w), grads(plain, x, w),
                           ("output", "input", "weight", "bias"), SAME)
        checks.run(f"(i) bp Conv2d = autograd, {label}", bp_conv)

    # (ii) RAF with Q P = W^T sends BP's input gradient
    def raf_exact_linear():
        torch.manual_seed(0)
        plain = nn.Linear(n_in, n_out).to(device)
        raf = raftorch.convert(plain, "raf", "full")
        assert raf.rank == n_out, raf.rank
        with torch.no_grad():
            raf.P.copy_(torch.eye(n_out))
            raf.Q.copy_(plain.weight.t())
        raf.Q.requires_grad_(False)
        raf.P.requires_grad_(False)
        x = torch.randn(tokens, rows, n_in).to(device)
        w = out_grad(plain, x)
        return compare(grads(raf, x, w), grads(plain, x, w), ("output", "input", "weight", "bias"), EXACT)
    checks.run("(ii) RAF Linear, Q P = W^T: BP's gradients", raf_exact_linear)
    for label, geom in CONV_GEOMETRIES.items():
        def raf_exact_conv(geom=geom):
            torch.manual_seed(0)
            plain = nn.Conv2d(c_in, c_out, 3, **geom).to(device)
            raf = raftorch.convert(plain, "raf", c_out)
            assert raf.rank == c_out, raf.rank
            with torch.no_grad():  # P = I: z = grad_output, and Q = W transposes it exactly
                raf.P.copy_(torch.eye(c_out))
                raf.Q.copy_(plain.weight)
            raf.Q.requires_grad_(False)
            raf.P.requires_grad_(False)
            x = torch.randn(n, c_in, *hw).to(device)
            w = out_grad(plain, x)
            return compare(grads(raf, x, w), grads(plain, x, w), ("output", "input", "weight", "bias"), EXACT)
        checks.run(f"(ii) RAF Conv2d, Q P = W^T: BP's gradients, {label}", raf_exact_conv)

    # (iii) the low-rank backward on the device against float64 definitions on the CPU
    conv_cases = [(label, geom, "contiguous", False, {}) for label, geom in CONV_GEOMETRIES.items()]
    if device.type == "cpu":  # the branch a GPU takes (no host reads of scalars), run on the CPU
        conv_cases += [("s1 p1", CONV_GEOMETRIES["s1 p1"], "contiguous", False, dict(host_scalars=False))]
    conv_cases += [("s1 p1", CONV_GEOMETRIES["s1 p1"], "channels_last", False, {}),
                   ("s2 p0", CONV_GEOMETRIES["s2 p0"], "channels_last", False, {}),
                   ("s1 p1", CONV_GEOMETRIES["s1 p1"], "contiguous", True, {}),
                   ("s1 p1 g2", CONV_GEOMETRIES["s1 p1 g2"], "contiguous", True, {}),
                   ("s1 p1", CONV_GEOMETRIES["s1 p1"], "contiguous", False, dict(oja_scale="rms")),
                   ("s1 p1", CONV_GEOMETRIES["s1 p1"], "contiguous", False,
                    dict(oja_scale="none", oja_center=False, oja_reduce="sum"))]
    for label, geom, layout, frozen, oja in conv_cases:
        def lowrank_conv(geom=geom, layout=layout, frozen=frozen, oja=oja):
            torch.manual_seed(0)
            oja = dict(oja)
            host = oja.pop("host_scalars", RF.HOST_SCALARS)
            conv = raftorch.Conv2d(c_in, c_out, 3, rule="raf", rank=r, **geom, **oja)
            x = torch.randn(n, c_in, *hw)
            with torch.no_grad():  # channels with different scales and a mean: centring matters
                g = torch.randn_like(conv(x)) * torch.linspace(0.5, 2.0, c_out)[:, None, None] + 0.2
            want = conv_definitions(conv, x, g)
            dev = copy.deepcopy(conv).to(device)
            dev.weight.requires_grad_(not frozen)
            xd, gd = x.to(device), g.to(device)
            if layout == "channels_last":
                xd, gd = xd.to(memory_format=torch.channels_last), gd.to(memory_format=torch.channels_last)
            xd.requires_grad_(True)
            saved, RF.HOST_SCALARS = RF.HOST_SCALARS, host
            try:
                dev(xd).backward(gd)
            finally:
                RF.HOST_SCALARS = saved
            got = {"input": xd.grad, "weight": dev.weight.grad, "bias": dev.bias.grad, "Q": dev.Q.grad,
                   "P": dev.P.grad}
            keys = ["input", "bias", "Q", "P"] + ([] if frozen else ["weight"])
            if frozen:
                assert dev.weight.grad is None, "a frozen weight got a gradient"
            return compare(got, want, keys, DEF64)
        extra = ", ".join([layout] + (["W frozen"] if frozen else [])
                          + [f"{k}={v}" if k != "host_scalars" else "HOST_SCALARS=False (the GPU's branch)"
                             for k, v in oja.items()])
        checks.run(f"(iii) low-rank Conv2d backward = float64 definitions, {label}, {extra}", lowrank_conv)
    for shape, frozen, label in [((rows, n_in), False, "batch"), ((tokens, rows, n_in), False, "tokens"),
                                 ((tokens, rows, n_in), True, "tokens, W frozen")]:
        def lowrank_linear(shape=shape, frozen=frozen):
            torch.manual_seed(0)
            lin = raftorch.Linear(n_in, n_out, rule="raf", rank=r)
            x = torch.randn(*shape)
            g = torch.randn(*shape[:-1], n_out) * torch.linspace(0.5, 2.0, n_out) + 0.2
            want = linear_definitions(lin, x, g)
            dev = copy.deepcopy(lin).to(device)
            dev.weight.requires_grad_(not frozen)
            xd = x.to(device).requires_grad_(True)
            dev(xd).backward(g.to(device))
            got = {"input": xd.grad.reshape(-1, n_in), "bias": dev.bias.grad, "Q": dev.Q.grad,
                   "P": dev.P.grad, "weight": dev.weight.grad}
            if frozen:
                assert dev.weight.grad is None, "a frozen weight got a gradient"
            return compare(got, want, ["input", "bias", "Q", "P"] + ([] if frozen else ["weight"]), DEF64)
        checks.run(f"(iii) low-rank Linear backward = float64 definitions, {label}", lowrank_linear)

    # (iv) the C++ fast path
    if device.type != "cpu":
        lin = raftorch.Linear(n_in, n_out, rule="raf", rank=r).to(device)
        name = lin(torch.randn(rows, n_in, device=device, requires_grad=True)).grad_fn.name()
        python = name == "LinearLowRankFeedbackBackward"
        checks.report("(iv) C++ fast path (raftorch._ext)", "N/A",
                      f"CPU only, not applicable on {device.type}; the layer's backward here is {name}"
                      + (" (the Python path)" if python else " (expected LinearLowRankFeedbackBackward)"))
    elif _ext.get() is None:
        checks.report("(iv) C++ fast path (raftorch._ext)", "SKIP",
                      "not built here (RAFTORCH_EXTENSION=0 or no compiler)")
    else:
        for shape, label in [((4 * rows, n_in), "batch"), ((tokens, rows, n_in), "tokens")]:
            def ext_path(shape=shape):
                torch.manual_seed(0)
                lin = raftorch.Linear(n_in, n_out, rule="raf", rank=r)
                x = torch.randn(*shape)
                w = torch.randn(*shape[:-1], n_out)
                got = grads(lin, x, w)
                with _ext.disabled():
                    want = grads(lin, x, w)
                return compare(got, want, ("output", "input", "weight", "bias", "Q", "P"), (1e-5, 1e-5))
            checks.run(f"(iv) C++ fast path = Python path (CPU), raf Linear, {label}", ext_path)


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
