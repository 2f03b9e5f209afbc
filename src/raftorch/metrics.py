"""Measurements of how a feedback path relates to backprop's."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn


def angle_degrees(a: Tensor, b: Tensor) -> float:
    """Angle between two tensors seen as flat vectors, in degrees (0 = same direction)."""
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    denom = a.norm() * b.norm()
    if denom == 0:
        return float("nan")
    cos = torch.clamp(a @ b / denom, -1.0, 1.0)
    return math.degrees(math.acos(cos.item()))


def _direct_targets(model: nn.Module) -> set[str]:
    direct = model._modules.get("direct_feedback")
    return {p.target for p in getattr(direct, "paths", ())} if direct is not None else set()


def alignment_angles(model: nn.Module) -> dict[str, float]:
    """Per layer-wise feedback path, the angle in degrees between its feedback matrix ``B``
    and the weight's transpose ``W^T``, both flattened (as BioTorch and the Kolen-Pollack
    literature measure it). 0 for bp; about 90 for random feedback.

    Entries: every raftorch ``Linear`` / ``Conv1d`` / ``Conv2d``, and ``"<attn>.q"``,
    ``"<attn>.k"``, ``"<attn>.v"`` for the input projections of a
    :class:`raftorch.MultiheadAttention` (its ``out_proj`` is a raftorch ``Linear``). The
    targets of ``dfa``/``draf`` are left out: the error they learn from comes from their
    direct path, whose ``B_l`` (to the source) has no ``W^T`` of the same shape to compare
    with; their own layer's feedback matrix does not carry it. Measure them (and any layer)
    with :func:`error_alignment`."""
    from raftorch.attention import MultiheadAttention

    skip = _direct_targets(model)
    out = {}
    for name, m in model.named_modules():
        if name in skip:
            continue
        if hasattr(m, "feedback_matrix") and hasattr(m, "weight_transpose") and hasattr(m, "rule"):
            out[name or "<root>"] = angle_degrees(m.feedback_matrix(), m.weight_transpose())
        elif isinstance(m, MultiheadAttention):
            for part, fb, weight in m.projection_feedback():
                out[f"{name}.{part}" if name else part] = angle_degrees(fb.feedback_matrix(weight), weight.t())
    return out


def error_alignment(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable | None = None
                    ) -> dict[str, float]:
    r"""Per weight layer, the angle in degrees between the error its output **receives**
    under ``model``'s own rule and the **true backprop error** at the same point, on one
    batch ``(x, y)``:

    ``angle_l = arccos(<delta_l, delta_l^bp> / (|delta_l| |delta_l^bp|))``, both
    ``dLoss/d(output of l)`` over the whole batch, flattened (0: the rule sends backprop's
    error; about 90: unrelated). ``delta_l`` is captured with a hook on the layer's output
    (:func:`raftorch.analysis.subspace.capture_errors`), ``delta_l^bp`` the same on
    :func:`raftorch.convert.plain_copy` of the model (plain layers, direct feedback
    detached), so for a ``dfa``/``draf`` target it compares ``f'(a_l) (B_l e_s)`` with
    backprop's error. Useful for every rule (the output layer is 0 by construction).

    Layers: every ``Linear`` / ``Conv1d`` / ``Conv2d`` (raftorch or plain) outside the
    direct-feedback object, including an attention module's ``out_proj`` (named by its path);
    a layer whose error does not exist under either rule is left out. ``loss_fn(output, y)``
    defaults to the mean cross-entropy. One forward / backward pass each, in eval mode;
    nothing of the model changes (parameters, ``.grad``, buffers, flags, RNG, fed targets).
    """
    from raftorch.analysis.subspace import capture_errors
    from raftorch.attention import MultiheadAttention
    from raftorch.convert import _set_module, plain_copy

    names = [n for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
             and n != "direct_feedback" and not n.startswith("direct_feedback.")]
    received = capture_errors(model, x, y, loss_fn, names)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):  # building the bp twin must not move the RNG
        reference = plain_copy(model)
        # a plain nn.MultiheadAttention never calls out_proj; its bp twin does (same numbers)
        for n, m in list(reference.named_modules()):
            if type(m) is nn.MultiheadAttention and isinstance(model.get_submodule(n), MultiheadAttention):
                reference = _set_module(reference, n, MultiheadAttention.from_torch(m, rule="bp"))
    bp = capture_errors(reference, x, y, loss_fn, names)
    return {n or "<root>": angle_degrees(received[n], bp[n]) for n in names if n in received and n in bp}
