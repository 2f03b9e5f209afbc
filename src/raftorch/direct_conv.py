r"""Convolutional direct feedback: a ``dfa`` / ``draf`` path from a convolutional source into an
earlier convolutional target whose feedback is itself convolutional (per pixel) and low-rank.

A dense :class:`raftorch.direct_dense.DirectPath` between two feature maps is a
``(C_t H_t W_t) x (C_s H_s W_s)`` matrix (for the paper's retina, 32768 x 32768). Here the
feedback acts on **channels**, the same map at every pixel, as a layer-wise RAF convolution's
``P`` does (see docs/rules.md, sections "Convolutions" and "Direct RAF: draf"), with one fixed linear
resampling between the two grids. :class:`ConvDirectPath` gives the equations;
:class:`raftorch.direct.DirectFeedback` builds these paths (``path="auto"``: wherever the
source's output and the target's activity are both ``(N, C, H, W)`` maps) and calls
:func:`conv_direct_backward` from its backward.
"""
from __future__ import annotations

import torch
from torch import Tensor

from raftorch.direct_dense import DirectPath
from raftorch.functional import LossScale, OjaOptions, clamp_error, conv_oja_grad, cross_sum
from raftorch.rules import Rule, check_rank

__all__ = ["ConvDirectPath", "area_matrix", "pool_to", "unpool_to", "conv_direct_backward"]


def area_matrix(n_out: int, n_in: int, *, dtype=None, device=None) -> Tensor:
    """The ``(n_out, n_in)`` matrix of 1-d area resampling, PyTorch's adaptive average
    pooling: output ``i`` is the mean of inputs ``floor(i n_in / n_out) <= j <
    ceil((i + 1) n_in / n_out)``. Averages blocks when ``n_out < n_in``, repeats inputs when
    ``n_out`` is a multiple of ``n_in``, the identity when they are equal."""
    i = torch.arange(n_out, dtype=torch.float64)
    start = torch.floor(i * n_in / n_out)
    end = torch.ceil((i + 1) * n_in / n_out)
    j = torch.arange(n_in, dtype=torch.float64)
    inside = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
    return (inside / (end - start)[:, None]).to(dtype=dtype, device=device)


def pool_to(h: Tensor, size: tuple[int, int]) -> Tensor:
    """``D(h)``: ``h`` ``(..., H_t, W_t)`` area-resampled to ``size = (H_s, W_s)``
    (``F.adaptive_avg_pool2d``): ``D_H h D_W^T``, with ``D_H = area_matrix(H_s, H_t)``."""
    if tuple(h.shape[-2:]) == tuple(size):
        return h
    dh = area_matrix(size[0], h.shape[-2], dtype=h.dtype, device=h.device)
    dw = area_matrix(size[1], h.shape[-1], dtype=h.dtype, device=h.device)
    return dh @ h @ dw.t()


def unpool_to(z: Tensor, size: tuple[int, int]) -> Tensor:
    """``R(z) = D^T(z)``: the transpose of :func:`pool_to` from ``size = (H_t, W_t)``, taking
    ``z`` ``(..., H_s, W_s)`` back to ``(..., H_t, W_t)``: ``D_H^T z D_W``. For a source
    ``k`` times smaller it repeats each value over its ``k x k`` block divided by ``k^2`` (the
    backward of ``k x k`` average pooling); the identity for equal sizes."""
    if tuple(z.shape[-2:]) == tuple(size):
        return z
    dh = area_matrix(z.shape[-2], size[0], dtype=z.dtype, device=z.device)
    dw = area_matrix(z.shape[-1], size[1], dtype=z.dtype, device=z.device)
    return dh.t() @ z @ dw


class ConvDirectPath(DirectPath):
    r"""The feedback from a convolutional source to one convolutional target, per pixel.

    ``draf``: ``Q`` ``(C_t, r)`` and ``P`` ``(r, C_s)``, both learned (``dfa``: a fixed
    ``B`` ``(C_t, C_s)``, ``delta_t = B R(e_s)`` per pixel). Per sample ``n``, source pixel
    ``q`` (grid ``H_s x W_s``) and target pixel ``p`` (grid ``H_t x W_t``)::

        z[n, :, q]     = P e_s[n, :, q]                    (r)    a 1x1 convolution
        u              = R(z) = D^T(z)                     (N, r, H_t, W_t)
        delta_t[n,:,p] = Q u[n, :, p]                      (C_t)  delivered at the injection point
        grad_Q         = sum_{n, p} h_t[n, :, p] u[n, :, p]^T
                       = sum_{n, q} D(h_t)[n, :, q] z[n, :, q]^T          (C_t, r)
        grad_P         = oja_grad(P, E, E P^T)             E: the N H_s W_s source pixels as
                                                           rows, C_s features (Oja per pixel)

    ``D`` is area resampling from the target's grid to the source's (adaptive average
    pooling, :func:`pool_to`; the identity for equal sizes) and ``R = D^T`` its transpose
    (:func:`unpool_to`). So the feedback is ``B = Q D^T P`` (``P``, ``Q`` per pixel) and its
    transpose ``B^T = P^T D Q^T`` is the **virtual forward map** from the target's activity to
    the source: ``h_t -> y = D(Q^T h_t)`` to the ``r``-channel code on the source grid, then
    ``P^T``. ``grad_Q`` is the weight gradient of ``y = D(Q^T h_t)`` for the output error
    ``z`` (``d/dQ sum_{n,q} <z_q, y_q>``), i.e. ``d/dQ sum_n <h_t, B e_s>``, the
    Kolen-Pollack update ``dB = -eta h_t e_s^T`` restricted to ``B = Q D^T P``, as the dense
    path's ``grad_Q = h^T z``. Linear-network argument (tested): when the network maps
    ``h_t`` to the source by a 1x1 convolution ``W`` ``(C_s, C_t)`` after average pooling
    ``D`` (``D`` = identity for no pooling), ``grad_W = sum_{n,q} e_s D(h_t)^T``, so
    ``grad_Q = (P grad_W)^T`` exactly: with one SGD learning rate and weight decay for ``Q``
    and ``W`` (and ``P`` still), ``Q - W^T P^T`` decays to 0. With full rank and
    orthonormal ``P``, ``Q P = W^T`` and ``delta_t = D^T(W^T e_s)`` **is** backprop's error.
    Through a stride-1 ``k x k`` convolution on the same grid, ``grad_Q`` is ``P`` times the
    gradient of the kernel's centre tap (tested), so ``Q P`` tracks that tap's transpose; the
    spatial spread of the transposed convolution is not represented. For a source ``k``
    times smaller (``k x k`` blocks), ``D^T`` spreads each value over its block divided by
    ``k^2``: the delivered error is the average pooling's backward, and ``Q`` learns any
    other scale.

    Oja: every source pixel is one row of the signal, with the :class:`OjaOptions` (``center``,
    ``scale``, ``reduce``, ``ddof``) and the loss-scale correction of the layer-wise
    convolution path (the same code, :func:`raftorch.functional.conv_oja_grad`); an empty batch
    gives zero updates.

    Rank: ``r`` counts channels of the low-dimensional error ``z``; it is clamped to ``C_s``,
    and ``rank="full"`` means ``r = C_s``: ``z`` carries the whole source error (the paper
    trains the retina "without restricting the backward pathway"). ``Q P`` has rank at most
    ``min(r, C_t)``; with ``r = C_s`` and orthonormal ``P`` it can be any ``C_t x C_s`` map.

    Parameters: ``C_s r + r C_t`` (``C_t C_s`` for ``dfa``), independent of the map sizes;
    any map sizes run (the resampling follows each batch's shapes). Initialisation as the
    dense paths, :func:`raftorch.layers.init_feedback_` with fan-in ``C_t`` (the virtual
    forward map's input channels): ``Q``, ``B`` uniform, ``P`` orthonormal rows.

    Shape: the target's activity ``(N, C_t, H_t, W_t)``, the source's output and error
    ``(N, C_s, H_s, W_s)``.
    """

    conv = True

    def __init__(self, target: str, point: str, rule: Rule, rank, c_target: int, c_source: int,
                 *, device=None, dtype=None):
        torch.nn.Module.__init__(self)
        self.c_target, self.c_source = int(c_target), int(c_source)
        if min(self.c_target, self.c_source) < 1:
            raise ValueError(f"target {target!r}: a direct path needs at least one target and one source "
                             f"channel, got {self.c_target} and {self.c_source}")
        self._make_feedback(target, point, rule, check_rank(rule, rank, self.c_source, layer=f"target {target!r}"),
                            (self.c_target, self.c_source), device, dtype)

    @torch.no_grad()
    def feedback_matrix(self) -> Tensor:
        """The per-pixel ``(C_t, C_s)`` map ``Q P`` (or ``B``); the path delivers
        ``D^T`` of it applied to every source pixel."""
        return super().feedback_matrix()

    def check_activity(self, h: Tensor, source: Tensor, source_name: str) -> None:
        """A ``RuntimeError`` unless ``h`` and ``source`` are ``(N, C, H, W)`` maps with this
        path's channels and one batch size."""
        if h.dim() != 4 or h.shape[1] != self.c_target or h.shape[0] != source.shape[0]:
            raise RuntimeError(
                f"target {self.target!r}: expected an activity map (N={source.shape[0]}, "
                f"C={self.c_target}, H, W), got {tuple(h.shape)}")
        if source.dim() != 4 or source.shape[1] != self.c_source:
            raise RuntimeError(f"source {source_name!r}: expected a map (N, C={self.c_source}, H, W), "
                               f"got {tuple(source.shape)}")

    def extra_repr(self) -> str:
        return super().extra_repr() + ", per pixel, resampling D^T (area)"


def conv_direct_backward(e: Tensor, h: Tensor | None, shape: torch.Size, params: tuple[Tensor, ...],
                         low_rank: bool, oja: OjaOptions | None, need_h: bool, need_q: bool,
                         need_p: bool, *, scale: LossScale | None = None, clamp: float | None = None):
    """The equations of :class:`ConvDirectPath` for one batch: ``(delta_t, grad_Q, grad_P)``
    (``dfa``: ``(delta_t,)``), each ``None`` unless asked for.

    ``e`` ``(N, C_s, H_s, W_s)`` the source error, ``h`` ``(N, C_t, H_t, W_t)`` the target's
    activity (needed for ``grad_Q`` only), ``shape`` the activity's shape, ``params``
    ``(Q, P)`` or ``(B,)``. Computed in the parameters' dtype, ``delta_t`` returned in ``e``'s.
    """
    n, c_s, hs, ws = e.shape
    size_t = (shape[2], shape[3])
    if not low_rank:
        (B,) = params
        if not need_h:
            return (None,)
        be = B @ e.to(B.dtype).reshape(n, c_s, hs * ws)  # (N, C_t, H_s W_s)
        delta = unpool_to(be.view(n, B.shape[0], hs, ws), size_t)
        return (clamp_error(delta.to(e.dtype).contiguous(), clamp),)
    Q, P = params
    out_dtype = e.dtype
    e = e.to(P.dtype)
    e3 = e.reshape(n, c_s, hs * ws)  # explicit widths: an empty batch cannot infer a -1
    z3 = P @ e3  # (N, r, H_s W_s)
    z = z3.view(n, P.shape[0], hs, ws)
    delta = grad_q = grad_p = None
    if need_h or need_q:
        u = unpool_to(z, size_t)  # (N, r, H_t, W_t)
        u3 = u.reshape(n, u.shape[1], size_t[0] * size_t[1])
        if need_q:
            h3 = h.to(P.dtype).reshape(n, shape[1], size_t[0] * size_t[1])
            grad_q = cross_sum(h3, u3)  # sum_{n,p} h u^T, (C_t, r)
        if need_h:
            delta = clamp_error((Q @ u3).view(n, Q.shape[0], *size_t).to(out_dtype), clamp)
    if need_p:
        grad_p = conv_oja_grad(P, e, z, e3, z3, None, oja, scale)
    return delta, grad_q, grad_p
