"""Measurements of how a feedback path relates to backprop's, and the errors a model's layers
receive (:func:`capture_errors`)."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raftorch.attention import MultiheadAttention
from raftorch.convert import feedback_layers, plain_copy
from raftorch.replace import is_weight_layer, set_module


def angle_degrees(a: Tensor, b: Tensor) -> float:
    """Angle between two tensors seen as flat vectors, in degrees (0 = same direction)."""
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    denom = a.norm() * b.norm()
    if denom == 0:
        return float("nan")
    cos = torch.clamp(a @ b / denom, -1.0, 1.0)
    return math.degrees(math.acos(cos.item()))


def _direct_targets(model: nn.Module) -> set[str]:
    direct = getattr(model, "direct_feedback", None)
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
    (:func:`capture_errors`), ``delta_l^bp`` the same on
    :func:`raftorch.convert.plain_copy` of the model (plain layers, direct feedback
    detached), so for a ``dfa``/``draf`` target it compares ``f'(a_l) (B_l e_s)`` with
    backprop's error. Useful for every rule (the output layer is 0 by construction).

    Layers: every ``Linear`` / ``Conv1d`` / ``Conv2d`` (raftorch or plain) outside the
    direct-feedback object, including an attention module's ``out_proj`` (named by its path);
    a layer whose error does not exist under either rule is left out. ``loss_fn(output, y)``
    defaults to the mean cross-entropy. One forward / backward pass each, in eval mode;
    nothing of the model changes (parameters, ``.grad``, buffers, flags, RNG, fed targets).
    """
    names = [n for n, m in model.named_modules()
             if is_weight_layer(m)
             and n != "direct_feedback" and not n.startswith("direct_feedback.")]
    received = capture_errors(model, x, y, loss_fn, names)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):  # building the bp twin must not move the RNG
        reference = plain_copy(model)
        # a plain nn.MultiheadAttention never calls out_proj; its bp twin does (same numbers)
        for n, m in list(reference.named_modules()):
            if type(m) is nn.MultiheadAttention and isinstance(model.get_submodule(n), MultiheadAttention):
                reference = set_module(reference, n, MultiheadAttention.from_torch(m, rule="bp"))
    bp = capture_errors(reference, x, y, loss_fn, names)
    return {n or "<root>": angle_degrees(received[n], bp[n]) for n in names if n in received and n in bp}


# --------------------------------------------------------------------------- the errors layers receive


def _in_direct(name: str) -> bool:
    return name == "direct_feedback" or name.startswith("direct_feedback.")


def error_layer_names(model: nn.Module) -> list[str]:
    """Every ``Linear`` / ``Conv2d`` (raftorch or plain) of ``model`` outside a direct-feedback
    object, in ``named_modules()`` order: the layers :func:`capture_errors` reads by default."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and not _in_direct(n)]


class _Capture:
    """Forward hooks (run before any other hook of the module) that keep each named module's
    output and hand on a clone, so an in-place op after the module (``ReLU(inplace=True)``)
    or another hook cannot change the tensor whose gradient is asked for."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.outputs: dict[str, list[Tensor]] = {n: [] for n in names}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n), prepend=True)
                        for n in names]

    def _hook(self, name):
        def hook(module, args, output):
            if isinstance(output, Tensor) and output.requires_grad:
                self.outputs[name].append(output)
                return output.clone()
            return None
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _grads_at(model: nn.Module, names: list[str], x: Tensor, y: Tensor, loss_fn) -> dict[str, Tensor]:
    """``dLoss/d(output)`` of each named module for one forward pass of ``model`` on ``x``,
    by ``torch.autograd.grad`` (nothing is accumulated into any ``.grad``); samples of a
    module called several times are concatenated along dim 0."""
    cap = _Capture(model, names)
    try:
        with torch.enable_grad():
            loss = loss_fn(model(x), y)
    finally:
        cap.remove()
    flat = [(n, t) for n in names for t in cap.outputs[n]]
    if not flat:
        return {}
    grads = torch.autograd.grad(loss, [t for _, t in flat], allow_unused=True)
    out: dict[str, list[Tensor]] = {}
    for (n, _), g in zip(flat, grads):
        if g is not None:
            out.setdefault(n, []).append(g.detach())
    return {n: gs[0] if len(gs) == 1 else torch.cat(gs) for n, gs in out.items()}


class _Frozen:
    """Eval mode, the targets fed to ``oja_source="target"`` layers and a forked RNG for one
    measurement; every module's training flag, every target slot and the RNG state are put
    back afterwards."""

    def __init__(self, model: nn.Module, y: Tensor):
        self.model, self.y = model, y

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.slots = [layer.target_slot for _, layer in feedback_layers(self.model)
                      if getattr(layer, "target_slot", None) is not None]
        self.saved = [s.value for s in self.slots]
        devices = sorted({p.device.index or 0 for p in self.model.parameters() if p.device.type == "cuda"})
        self.rng = torch.random.fork_rng(devices=devices)
        self.rng.__enter__()
        self.model.eval()
        for s in self.slots:
            s.value = self.y.detach()
        return self

    def __exit__(self, *exc):
        for s, v in zip(self.slots, self.saved):
            s.value = v
        for m, t in self.flags:
            m.training = t
        return self.rng.__exit__(*exc)


def capture_errors(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable | None = None,
                   names: list[str] | None = None) -> dict[str, Tensor]:
    """The error each named module's output receives (``dLoss/d output``) under ``model``'s
    own learning rule, for one forward / backward pass on ``(x, y)`` in eval mode.

    ``names`` default: :func:`error_layer_names`, every ``Linear`` / ``Conv2d`` (raftorch or
    plain) outside a direct-feedback object. For a raftorch layer this is the ``grad_output``
    its backward gets (``delta_{l+1}``); under ``dfa``/``draf`` a target layer's output
    receives the direct path's ``B_l e_s`` after the exact backward of the modules up to its
    injection point. ``loss_fn(output, y)`` defaults to the mean cross-entropy. Outputs whose
    gradient does not exist (nothing above them learns) are left out.

    Nothing of the model changes: parameters, ``.grad`` (``torch.autograd.grad`` is used),
    buffers (eval mode: BatchNorm uses and keeps its running statistics, dropout is off),
    training flags, the RNG state and the targets fed to ``oja_source="target"`` layers
    (``y`` is fed for this pass and the previous value put back).
    """
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    if names is None:
        names = error_layer_names(model)
    with _Frozen(model, y):
        return _grads_at(model, list(names), x, y, loss_fn)
