"""Device checks: raftorch's layers on a device against their definitions, in float64 on the CPU.

:func:`run_checks` runs every check on ``device`` (TF32 off for matmuls and cuDNN while they
run, so float32 is float32) and prints each as ``PASS`` / ``FAIL`` with its largest absolute
error against the tolerance:

* (i) rule ``bp``: ``raftorch.convert`` of an ``nn.Linear`` / ``nn.Conv2d`` gives the same
  forward output and input, weight and bias gradients as plain autograd, on the device;
* (ii) RAF with exact feedback ``Q P = W^T`` (``Q``, ``P`` frozen; Linear: rank ``n_out``,
  ``P = I``, ``Q = W^T``; Conv2d: rank ``C_out``, ``P = I``, ``Q = W``) sends exactly BP's
  input gradient (and the same weight and bias gradients);
* (iii) the low-rank backward on the device (conv: ``grad_input``, ``grad_W``, ``grad_b``,
  ``grad_Q``, ``grad_P``; several geometries, channels_last, ``W`` frozen; and the Linear
  layer's) equals its definitions computed on the CPU in float64: ``z = P g`` per pixel,
  ``grad_input`` and ``grad_Q`` the input and weight gradients of ``conv(x, Q)`` for output
  gradient ``z``, Oja's rule by hand (on a CPU one case also runs with
  ``raftorch.functional.HOST_SCALARS = False``, the branch a GPU takes);
* (iv) the C++ fast path (``raftorch.extension``) is CPU only: on CUDA the check says so (and that
  the layer runs the Python path there); on CPU it compares the C++ path with the Python path.

``quick=True``: tiny layers (a CPU smoke test). Used by ``benchmarks/gpu_check.py`` (part 1 of
its report) and by ``raftorch reproduce --smoke`` (:mod:`raftorch.experiments.smoke`); a
failed check is returned in :attr:`Checks.failed`, never raised.

Example::

    checks = run_checks(torch.device("cuda"), quick=False)
    print(checks.summary())          # "27/27 PASS"
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import raftorch
from raftorch import extension
from raftorch import functional as RF

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


class Checks:
    """The results of the checks, printed one line each as they come: ``(name, status, detail)``
    with status ``PASS``, ``FAIL``, ``SKIP`` or ``N/A``."""

    def __init__(self):
        self.results = []  # (name, status, detail)

    def report(self, name, status, detail=""):
        """Record one check's ``(name, status, detail)`` and print it as a line."""
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
        """``N/M PASS`` over the checks that passed or failed (``SKIP``, ``N/A`` not counted), with the number
        of FAILs if any."""
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
    """The ``(key, got, want, tol)`` entries :meth:`Checks.run` takes, for ``keys`` of two result dicts (a
    key one lacks gives ``None``)."""
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
    """The low-rank Linear backward from its definitions, on the CPU in float64: input, weight, bias, ``Q``
    and ``P`` (Oja) gradients for output gradient ``g``."""
    x = x.detach().to("cpu", torch.float64).reshape(-1, lin.in_features)
    g = g.to("cpu", torch.float64).reshape(-1, lin.out_features)
    P, Q = lin.P.detach().to("cpu", torch.float64), lin.Q.detach().to("cpu", torch.float64)
    z = g @ P.t()
    o = lin.oja
    return {"input": z @ Q.t(), "weight": g.t() @ x, "bias": g.sum(0), "Q": x.t() @ z,
            "P": hand_oja(P, g, o.center, o.scale, o.ddof, o.reduce)}


def run_checks(device: torch.device, quick: bool = False) -> Checks:
    """Every check (module docstring) on ``device``; ``quick``: tiny layers."""
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
        checks.report("(iv) C++ fast path (raftorch.extension)", "N/A",
                      f"CPU only, not applicable on {device.type}; the layer's backward here is {name}"
                      + (" (the Python path)" if python else " (expected LinearLowRankFeedbackBackward)"))
    elif extension.get() is None:
        checks.report("(iv) C++ fast path (raftorch.extension)", "SKIP",
                      "not built here (RAFTORCH_EXTENSION=0 or no compiler)")
    else:
        for shape, label in [((4 * rows, n_in), "batch"), ((tokens, rows, n_in), "tokens")]:
            def ext_path(shape=shape):
                torch.manual_seed(0)
                lin = raftorch.Linear(n_in, n_out, rule="raf", rank=r)
                x = torch.randn(*shape)
                w = torch.randn(*shape[:-1], n_out)
                got = grads(lin, x, w)
                with extension.disabled():
                    want = grads(lin, x, w)
                return compare(got, want, ("output", "input", "weight", "bias", "Q", "P"), (1e-5, 1e-5))
            checks.run(f"(iv) C++ fast path = Python path (CPU), raf Linear, {label}", ext_path)
