r"""Loss scaling and gradient accumulation: ``raftorch.loss_scale(model, factor)``.

Every gradient of a network is linear in its loss, except Oja's update of ``P``: with
``oja_scale="maxstd"``, ``"rms"`` or ``"std"`` it is invariant to the loss's scale, with
``"none"`` quadratic in it, and with ``oja_source="target"`` independent of it. Training loops
that multiply the loss by a factor ``c`` and undo it on the gradients would therefore
mis-scale ``P``'s step:

* ``torch.amp.GradScaler`` backpropagates ``s * loss`` and ``unscale_`` divides every
  gradient by ``s``: ``c = s`` (``scaler.get_scale()``); without the correction ``P.grad``
  ends ``1/s`` times too small.
* accumulating ``k`` micro-batches of ``loss / k`` sums ``k`` gradients: ``c = 1/k``; without
  the correction ``P``'s step is ``k`` times too large relative to ``W``'s.

Tell the layers: ::

    with raftorch.loss_scale(model, c):
        (c * loss).backward()

Inside the block every raftorch layer whose ``P`` learns and every direct-feedback path of
``model`` writes ``c G(e / c)`` into ``P.grad``, where ``G`` is Oja's update
(:func:`raftorch.functional.oja_grad`) and ``e`` the Oja signal that arrived (the error of
the scaled loss, ``c`` times the unscaled one; targets are not scaled): ``c G(e)`` for the
scale-invariant scales and targets, ``G(e) / c`` for ``oja_scale="none"`` on the error
(:class:`raftorch.functional.LossScale`). Then ``P.grad`` is ``c`` times the unscaled
loss's, exactly like ``W.grad``, and whatever the loop does to undo ``c`` gives ``P`` the same
step as an unscaled loss:

* GradScaler: ``with loss_scale(model, scaler.get_scale()): scaler.scale(loss).backward()``;
  after ``scaler.unscale_`` / ``scaler.step`` ``P.grad`` is the unscaled one.
* accumulation of ``k`` micro-batches: ``with loss_scale(model, 1 / k): (loss_i / k).backward()``
  gives ``P.grad = mean_i G_i``, as ``W.grad = mean_i grad_W,i``.
* both: ``loss_scale(model, s / k)`` around ``scaler.scale(loss_i / k).backward()``.

Blocks nest by multiplying their factors; leaving a block restores the previous factor.
The factor is read when each layer's backward runs, so ``backward`` must run inside the block.

DistributedDataParallel: ``raftorch.sync_oja(model)`` (``raftorch train`` calls it when it runs
on several processes) makes every layer and direct path all-reduce Oja's statistics (mean,
variances, rows) over the process group in each backward, so the weights after a few steps
with ``w`` processes equal one process's with the same global batch, for ``raf`` and ``draf``
as for the other rules (:class:`raftorch.functional.LossScale` gives the formula). Every
process must then run every backward (as DDP requires anyway).
"""
from __future__ import annotations

import math
from contextlib import contextmanager

from torch import Tensor, nn

from raftorch.functional import LossScale

__all__ = ["loss_scale", "sync_oja"]


def _holders(model: nn.Module) -> list[LossScale]:
    out, seen = [], set()
    for m in model.modules():
        for h in (getattr(m, "scale_slot", None), getattr(getattr(m, "plan", None), "scale", None)):
            if isinstance(h, LossScale) and id(h) not in seen:
                seen.add(id(h))
                out.append(h)
    return out


@contextmanager
def loss_scale(model: nn.Module, factor):
    """Inside this block, the backward of ``model``'s raftorch layers and direct paths treats
    the loss as multiplied by ``factor`` (a positive finite number, or a one-element tensor
    such as ``scaler.get_scale()``'s): see the module docstring for the formula."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"loss_scale needs the model (an nn.Module), got {type(model).__name__}")
    if isinstance(factor, Tensor):
        if factor.numel() != 1:
            raise ValueError(f"loss_scale factor must be one number, got a tensor of shape {tuple(factor.shape)}")
        factor = factor.item()
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) \
            or factor <= 0:
        raise ValueError(f"loss_scale factor must be a positive finite number, got {factor!r}")
    holders = _holders(model)
    before = [h.value for h in holders]
    try:
        for h, v in zip(holders, before):
            h.tensor.fill_(v * float(factor))
        yield
    finally:
        for h, v in zip(holders, before):
            h.tensor.fill_(v)


def sync_oja(model: nn.Module, enable: bool = True, group=None) -> None:
    """All-reduce the Oja statistics of ``model``'s layers and direct paths over ``group``
    (default: the whole default process group) in every backward (``enable=False``: stop).
    Needs an initialised ``torch.distributed``; the C++ fast path is bypassed while on."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"sync_oja needs the model (an nn.Module), got {type(model).__name__}")
    if enable:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("sync_oja needs torch.distributed initialised (init_process_group) first")
        group = dist.group.WORLD if group is None else group
    for h in _holders(model):
        h.group = group if enable else None
