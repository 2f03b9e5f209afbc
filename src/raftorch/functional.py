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

from raftorch import _ext

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


def oja_grad(P: Tensor, e: Tensor, z: Tensor, opts: OjaOptions, colsum: Tensor | None = None) -> Tensor:
    """``grad_P = -(z_n^T e_n - z_n^T z_n P)`` (divided by the rows for ``reduce="mean"``).

    ``e`` is the Oja signal ``(M, n_out)`` and ``z = e P^T`` ``(M, r)``, both uncentred
    (``z`` is fastest as a transposed view of a contiguous ``(r, M)`` tensor); ``colsum``, if
    given, is ``e.sum(0)`` (a layer's bias gradient, reused).

    Centring and the scalar scale ``s`` never touch the ``(M, n_out)`` signal: with
    ``z_n = (e - mean e) P^T / s``, the centred ``z_n`` is orthogonal to the constant column, so
    ``z_n^T e_n = z_n^T e / s = (z^T e - (z^T 1)(1^T e) / M) / s``: a rank-one correction of
    ``A = z^T e`` (``r x n_out``). Then ``z_n^T z_n = A P^T`` (as ``P P^T`` need not be the
    identity, this is exact only because ``z_n = e_n P^T``), so
    ``grad_P = ((A P^T) P - A) / s^2``. The only passes over the batch are ``z^T e`` and the
    per-feature sums of squares for ``s``.
    """
    rows = e.shape[0]
    zt = z.t()
    A = zt @ e
    need_sum = opts.center or opts.scale != "none"
    if need_sum and colsum is None:
        colsum = e.sum(0)
    if opts.center:
        A = torch.addr(A, zt.sum(1), colsum, alpha=-1.0 / rows)
    grad = torch.addmm(A, A @ P.t(), P, beta=-1.0)
    if opts.scale == "none":
        return grad.div_(rows) if opts.reduce == "mean" else grad
    # per-feature variances times the rows, from one fused pass (Tensor.var over dim 0 is ~15x
    # slower on CPU); the scale only sets P's step size, so the cancellation risk is harmless
    sq = (e * e).sum(0)
    var = torch.addcmul(sq, colsum, colsum, value=-1.0 / rows) if opts.center else sq
    s2 = var.max() if opts.scale == "maxstd" else var.mean()
    # a (numerically) constant signal carries no direction: no update rather than 0/0
    floor = sq.mean() * 1e-6
    reduce = rows if opts.reduce == "mean" else 1
    if e.device.type == "cpu":  # scalars are free to read on the CPU: skip the tensor ops
        s2, floor = s2.item(), floor.item() + 1e-30 * rows
        return grad.mul_(rows / (reduce * s2) if s2 > floor else 0.0)
    floor = floor + 1e-30 * rows
    return grad.mul_((s2 > floor) * rows / (reduce * torch.maximum(s2, floor)))


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
                     need_x: bool, need_Q: bool, need_P: bool, *, targets: TargetSlot | None = None,
                     need_w: bool = False, need_b: bool = False):
    """The low-rank feedback path for rows ``g`` ``(M, n_out)`` arriving at activity ``x``
    ``(M, n_in)``: ``(g P^T Q^T, x^T z, Oja's grad_P, g^T x, sum_rows g)``, each ``None``
    unless asked for (the last two are a Linear layer's weight and bias gradients).

    Shared by the layer-wise rules and the direct ones (where ``g`` is the source error).
    With ``targets``, Oja runs on the fed targets instead of ``g``.

    The order is chosen for the CPU's caches: on 2 cores, a pass over a ``256 x 512`` ``g``
    costs ~45 us more once the big ``g^T x`` product has pushed it out of cache than while it
    is still there from the op that produced it. So every pass over ``g`` (bias gradient,
    ``z``, Oja's statistics) comes first, then ``g^T x``, then ``x^T z`` and last ``grad_x``,
    which the op below reads next.
    """
    grad_x = grad_Q = grad_P = grad_w = grad_b = None
    oja_on_g = need_P and targets is None
    if need_b or (oja_on_g and (oja.center or oja.scale != "none")):
        grad_b = g.sum(0)
    # z^T = P g^T, kept (r, M) contiguous: thin products are 2-6x faster on CPU this way
    zt = P @ g.t() if (need_x or need_Q or oja_on_g) else None
    if oja_on_g:
        grad_P = oja_grad(P, g, zt.t(), oja, grad_b)
    elif need_P:
        e = targets.take(g.shape[0], g.shape[1], g)
        grad_P = oja_grad(P, e, (P @ e.t()).t(), oja)
    if need_w:
        grad_w = g.t() @ x
    if need_Q:  # x^T z
        grad_Q = (zt @ x).t()
    if need_x:
        grad_x = zt.t() @ Q.t()
    return grad_x, grad_Q, grad_P, grad_w, grad_b if need_b else None


_SCALE_CODES = {"none": 0, "maxstd": 1, "rms": 2}


def linear_lowrank(x: Tensor, weight: Tensor, bias: Tensor | None, Q: Tensor, P: Tensor,
                   oja: OjaOptions | None, targets: TargetSlot | None = None) -> Tensor:
    """``y = x W^T + b`` with the low-rank feedback backward: the C++ fast path
    (:mod:`raftorch._ext`) for CPU tensors outside autocast with Oja on the error, otherwise
    :class:`LinearLowRankFeedback`. Both compute the same thing (tested equal)."""
    if x.device.type == "cpu" and (oja is None or oja.source == "error") \
            and not torch.is_autocast_enabled("cpu"):
        ext = _ext.get()
        if ext is not None:
            if oja is None:  # P does not learn: the Oja settings are never read
                return ext.lowrank_linear(x, weight, bias, Q, P, False, 0, True)
            return ext.lowrank_linear(x, weight, bias, Q, P, oja.center, _SCALE_CODES[oja.scale],
                                      oja.reduce == "mean")
    return LinearLowRankFeedback.apply(x, weight, bias, Q, P, oja, targets)


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
        targets = ctx.targets if need_P and ctx.oja.source == "target" else None
        grad_x, grad_Q, grad_P, grad_w, grad_b = lowrank_feedback(
            g2, x2, Q, P, ctx.oja, need_x, need_Q, need_P, targets=targets,
            need_w=need_w, need_b=need_b)
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
