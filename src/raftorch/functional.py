"""The arithmetic of every feedback path, as ``torch.autograd.Function``s.

Notation (row convention, a batch of ``M`` rows; token tensors ``(N, T, D)`` are flattened to
``M = N T`` rows, convolution error maps to ``M = N H W`` pixels):

* ``x``  the layer input ``h_l``, ``(M, n_in)``; ``g`` the error at its output
  ``delta_{l+1}`` (``grad_output``), ``(M, n_out)``; ``W`` the weight ``(n_out, n_in)``.
* Every path keeps the weight update exact: ``grad_W = g^T x``, ``grad_b = sum_rows g``.
* Only ``grad_input`` (the error sent down) changes, and the feedback parameters receive
  their *local* updates in ``.grad``, so any ``torch.optim`` optimizer, weight decay,
  gradient clipping, AMP and DDP all-reduce apply to them unchanged.

Full-rank path (rules ``bp``, ``fa``, ``kp``), ``B`` of shape ``(n_in, n_out)``::

    grad_input = g B^T                  (bp passes B = W^T, detached)
    grad_B     = x^T g = grad_W^T       (only if B learns: Kolen-Pollack, dB = -eta h delta^T)

Low-rank path (rules ``fa-lowrank``, ``raf-q``, ``raf``), ``Q (n_in, r)``, ``P (r, n_out)``::

    z          = g P^T                  (M, r)   the low-dimensional error
    grad_input = z Q^T                  (M, n_in)
    grad_Q     = x^T z = (P grad_W)^T   (only if Q learns: Kolen-Pollack-like, dQ = -eta h z^T)
    grad_P     = -(z_n^T e_n - (z_n^T z_n) P) / M        (only if P learns: Oja's subspace rule)

where ``e_n`` is the Oja signal (the error ``g`` or, on an output layer with
``oja_source="target"``, the targets), centred and scaled as :class:`OjaOptions` says, and
``z_n = e_n P^T``. Gradient *descent* on ``grad_P`` is Oja's ascent
``dP = eta (z e^T - z z^T P)``, whose averaged flow ``dP/dt = eta (P C - P C P^T P)`` drives the
rows of ``P`` to an orthonormal basis of the top-``r`` principal subspace of
``C = E[e e^T]``.

Convolutions: ``B`` (``fa``/``kp``) has the weight's shape and is used like the transpose of
the forward convolution; ``P`` ``(r, C_out)`` acts as a 1x1 convolution on the error map and
``Q`` ``(r, C_in / groups, kH, kW)`` is the kernel of a virtual convolution ``x -> z`` with the
forward geometry, whose exact transpose brings ``z`` back to the input
(``grad_input = conv_transpose(z, Q)``, ``grad_Q = conv_weight_grad(x, z)``). Every pixel is
one sample of Oja's covariance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

OJA_SCALES = ("maxstd", "rms", "none")
OJA_REDUCES = ("mean", "sum")
OJA_SOURCES = ("error", "target")


@dataclass(frozen=True)
class OjaOptions:
    """How the signal ``e`` that drives Oja's rule on ``P`` is prepared.

    Oja's update is quadratic in ``e``, so its scale sets the effective learning rate of ``P``.

    * ``source``: ``"error"`` (``e = grad_output``, the default, eq. 11 of the paper) or
      ``"target"`` (``e = the targets`` fed with :func:`raftorch.feed_targets`; the paper's
      appendix does this for the output layer).
    * ``center``: subtract the per-feature mean over the batch (default ``True``).
    * ``scale``: divide ``e`` by its largest per-feature standard deviation (``"maxstd"``, the
      default, as in the authors' code), by its root-mean-square (``"rms"``) or not at all
      (``"none"``; then the update scales with the loss's batch reduction).
    * ``reduce``: ``"mean"`` (default) or ``"sum"`` of the per-sample updates over the batch
      (the authors summed).
    """

    source: str = "error"
    center: bool = True
    scale: str = "maxstd"
    reduce: str = "mean"

    def __post_init__(self):
        for name, value, valid in (
            ("oja_source", self.source, OJA_SOURCES),
            ("oja_scale", self.scale, OJA_SCALES),
            ("oja_reduce", self.reduce, OJA_REDUCES),
        ):
            if value not in valid:
                raise ValueError(f"{name}={value!r} is not valid; choose one of {valid}")
        if not isinstance(self.center, bool):
            raise ValueError(f"oja_center must be True or False, got {self.center!r}")


class TargetSlot:
    """Holds the targets a layer with ``oja_source="target"`` uses in its next backward."""

    __slots__ = ("value", "owner")

    def __init__(self, owner: str = "layer"):
        self.value: Tensor | None = None
        self.owner = owner

    def take(self, rows: int, n_out: int, like: Tensor) -> Tensor:
        t = self.value
        if t is None:
            raise RuntimeError(
                f"{self.owner} learns P on the targets (oja_source='target') but no targets were "
                "given: call raftorch.feed_targets(model, targets) before loss.backward()"
            )
        self.value = None
        if t.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            t = F.one_hot(t.reshape(-1).long(), n_out)
        t = t.reshape(-1, n_out).to(like.dtype)
        if t.shape[0] != rows:
            raise RuntimeError(
                f"{self.owner}: {t.shape[0]} targets were fed for a batch of {rows} outputs"
            )
        return t


def oja_grad(P: Tensor, e: Tensor, z: Tensor, opts: OjaOptions) -> Tensor:
    """``grad_P = -(z_n^T e_n - z_n^T z_n P)`` (divided by the rows for ``reduce="mean"``).

    ``e`` is the Oja signal ``(M, n_out)`` and ``z = e P^T`` ``(M, r)``, both uncentred
    (``z`` is fastest as a transposed view of a contiguous ``(r, M)`` tensor).
    Centring and a scalar scale ``s`` are applied to ``z`` only, which is exact because
    ``z_n = (e - mean e) P^T / s`` and the centred ``z_n`` is orthogonal to the constant
    column: ``z_n^T e_n = z_n^T e / s``. With ``A = z_n^T e``, ``z_n^T z_n = A P^T``, so
    ``grad_P = (A P^T) P - A`` needs one product with the batch.
    """
    rows = e.shape[0]
    zt = z.t()
    if opts.center:
        zt = zt - zt.mean(1, keepdim=True)
    A = zt @ e
    grad = torch.addmm(A, A @ P.t(), P, beta=-1.0)
    if opts.reduce == "mean":
        grad.div_(rows)
    if opts.scale == "none":
        return grad
    # per-feature second moments from two fast reductions (Tensor.var over dim 0 is ~15x
    # slower on CPU); the scale only sets P's step size, so the cancellation risk is harmless
    ms = e.pow(2).mean(0)
    var = (ms - e.mean(0).pow(2)).clamp_min_(0) if opts.center else ms
    s2 = var.max() if opts.scale == "maxstd" else var.mean()
    # a (numerically) constant signal carries no direction: no update rather than 0/0
    floor = 1e-6 * ms.mean() + 1e-30
    return grad.mul_((s2 > floor) / torch.maximum(s2, floor))


# --------------------------------------------------------------------------- autocast


def _autocast(x: Tensor, *tensors):
    """Under autocast, cast the floating inputs to the autocast dtype (custom Functions are
    not autocast by PyTorch), so the forward (where autocast then has nothing left to cast)
    and the saved tensors share one dtype."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in (x, *tensors))


# --------------------------------------------------------------------------- Linear


class LinearFullFeedback(Function):
    """``y = x W^T + b``; backward sends ``g B^T`` down; ``grad_B = grad_W^T`` if B learns."""

    @staticmethod
    def forward(ctx, x, weight, bias, B):
        x, weight, bias, B = _autocast(x, weight, bias, B)
        ctx.save_for_backward(x, B)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, B = ctx.saved_tensors
        need_x, need_w, need_b, need_B = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        grad_x = grad_w = grad_b = grad_B = None
        if need_x:
            grad_x = (g2 @ B.t()).view(x.shape)
        if need_w or need_B:
            grad_w = g2.t() @ x.reshape(-1, x.shape[-1])
            if need_B:
                grad_B = grad_w.t()
        if need_b:
            grad_b = g2.sum(0)
        return grad_x, grad_w if need_w else None, grad_b, grad_B


def lowrank_feedback(g: Tensor, x: Tensor, Q: Tensor, P: Tensor, oja: OjaOptions | None,
                     need_x: bool, need_Q: bool, need_P: bool, *, targets: TargetSlot | None = None):
    """The low-rank feedback path for rows ``g`` ``(M, n_out)`` arriving at activity ``x``
    ``(M, n_in)``: ``(g P^T Q^T, x^T z, Oja's grad_P)``, each ``None`` unless asked for.

    Shared by the layer-wise rules and the direct ones (where ``g`` is the source error).
    With ``targets``, Oja runs on the fed targets instead of ``g``.
    """
    grad_x = grad_Q = grad_P = None
    # z^T = P g^T, kept (r, M) contiguous: thin products are 2-6x faster on CPU this way
    zt = P @ g.t() if (need_x or need_Q or (need_P and targets is None)) else None
    if need_x:
        grad_x = zt.t() @ Q.t()
    if need_Q:  # x^T z
        grad_Q = (zt @ x).t()
    if need_P:
        if targets is not None:
            e = targets.take(g.shape[0], g.shape[1], g)
            grad_P = oja_grad(P, e, (P @ e.t()).t(), oja)
        else:
            grad_P = oja_grad(P, g, zt.t(), oja)
    return grad_x, grad_Q, grad_P


class LinearLowRankFeedback(Function):
    """``y = x W^T + b``; backward sends ``(g P^T) Q^T`` down, ``grad_Q = x^T z``, Oja on P."""

    @staticmethod
    def forward(ctx, x, weight, bias, Q, P, oja: OjaOptions, targets: TargetSlot | None):
        x, weight, bias, Q, P = _autocast(x, weight, bias, Q, P)
        ctx.save_for_backward(x, Q, P)
        ctx.oja, ctx.targets = oja, targets
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, Q, P = ctx.saved_tensors
        need_x, need_w, need_b, need_Q, need_P = ctx.needs_input_grad[:5]
        g2 = g.reshape(-1, g.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_w = g2.t() @ x2 if need_w else None
        grad_b = g2.sum(0) if need_b else None
        targets = ctx.targets if need_P and ctx.oja.source == "target" else None
        grad_x, grad_Q, grad_P = lowrank_feedback(g2, x2, Q, P, ctx.oja, need_x, need_Q, need_P,
                                                  targets=targets)
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        return grad_x, grad_w, grad_b, grad_Q, grad_P, None, None


# --------------------------------------------------------------------------- Conv2d


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, padding (explicit ints), dilation and groups of a 2-d convolution."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def conv(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, g: Tensor, x: Tensor, weight: Tensor, mask, bias: bool = False):
        """Gradients of ``conv(x, weight)`` for output gradient ``g``:
        ``(grad_input, grad_weight, grad_bias)``, each computed only where ``mask`` says."""
        return torch.ops.aten.convolution_backward(
            g, x, weight, [weight.shape[0]] if bias else None,
            list(self.stride), list(self.padding), list(self.dilation),
            False, [0, 0], self.groups, [mask[0], mask[1], bias],
        )


class Conv2dFullFeedback(Function):
    """Convolution; backward sends ``conv_transpose(g, B)`` down; ``grad_B = grad_W`` if B learns."""

    @staticmethod
    def forward(ctx, x, weight, bias, B, geom: ConvGeometry):
        x, weight, bias, B = _autocast(x, weight, bias, B)
        ctx.save_for_backward(x, B)
        ctx.geom = geom
        return geom.conv(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, B = ctx.saved_tensors
        need_x, need_w, need_b, need_B = ctx.needs_input_grad[:4]
        grad_x, grad_w, grad_b = ctx.geom.backward(
            g, x, B, (need_x, need_w or need_B), bias=need_b
        )
        grad_B = grad_w.clone() if need_B else None
        return grad_x, grad_w if need_w else None, grad_b, grad_B, None


class Conv2dLowRankFeedback(Function):
    """Convolution; backward: ``z = P * g`` (1x1), ``grad_input = conv_transpose(z, Q)``,
    ``grad_Q = conv_weight_grad(x, z)``, Oja on ``P`` over batch and pixels."""

    @staticmethod
    def forward(ctx, x, weight, bias, Q, P, geom: ConvGeometry, oja: OjaOptions):
        x, weight, bias, Q, P = _autocast(x, weight, bias, Q, P)
        ctx.save_for_backward(x, weight, Q, P)
        ctx.geom, ctx.oja = geom, oja
        return geom.conv(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight, Q, P = ctx.saved_tensors
        need_x, need_w, need_b, need_Q, need_P = ctx.needs_input_grad[:5]
        geom = ctx.geom
        grad_x = grad_w = grad_b = grad_Q = grad_P = None
        if need_w or need_b:
            _, grad_w, grad_b = geom.backward(g, x, weight, (False, need_w), bias=need_b)
        if need_x or need_Q or need_P:
            z = F.conv2d(g, P[:, :, None, None])  # (N, r, H, W)
            if need_x or need_Q:
                grad_x, grad_Q, _ = geom.backward(z, x, Q, (need_x, need_Q))
            if need_P:
                # every pixel is a sample: rows = N*H*W, features = channels
                e = g.transpose(0, 1).reshape(g.shape[1], -1).t()
                zr = z.transpose(0, 1).reshape(z.shape[1], -1).t()
                grad_P = oja_grad(P, e, zr, ctx.oja)
        return grad_x, grad_w if need_w else None, grad_b, grad_Q, grad_P, None, None
