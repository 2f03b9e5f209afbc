"""The no-feedback control ``frozen``: the same net, every hidden layer frozen at its
initialisation, only the output layer learning.

With no error reaching the hidden layers, the trained net is a linear head (the output layer)
fitted to the random features its initial hidden layers compute. A feedback rule has learned
something only where it beats this control: a feedback path that sends a poor error down can
leave the hidden layers worse than not training them at all.

``raftorch.convert(model, "frozen")`` (:func:`convert_frozen`) changes no module; it sets
``requires_grad=False`` on every parameter of the model except the output layer's weight and
bias (weights, biases, norm affine parameters, embeddings, class tokens, position embeddings,
feedback parameters of an already converted model). So:

* the forward pass is unchanged bit for bit;
* an optimizer built on ``model.parameters()`` (Adam, weight decay included) never changes a
  frozen parameter: it gets no ``.grad``, and PyTorch's optimizers skip parameters whose
  ``.grad`` is ``None``; ``raftorch train`` builds its optimizer on the parameters that
  require grad only;
* autograd stops at the output layer: nothing below it is differentiated (no backward cost);
* buffers are not parameters: BatchNorm's running mean and variance still update in train
  mode (as in any forward pass in train mode; they are not learned by gradient), and dropout
  stays active in train mode. ``model.eval()`` behaves as for any other rule.

The output layer is the last weight layer (``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``, a
raftorch layer included) in ``named_modules()`` order, outside any ``nn.MultiheadAttention``:
the same layer whose error the direct rules broadcast with ``source="output"``
(:func:`raftorch.replace.weight_layer_names`, one definition for both). A parameter
shared with it (a tied embedding) is the same ``Parameter`` and so learns with it; the report
lists every name it has.
"""
from __future__ import annotations

import copy

from torch import nn

from raftorch.replace import ConversionReport, weight_layer_names

__all__ = ["convert_frozen", "output_layer", "check_frozen_arguments"]

# the settings of a feedback path, which frozen has none of
_NOT_FOR_FROZEN = ("rank", "ranks", "include", "exclude", "source", "targets")


def output_layer(model: nn.Module) -> str:
    """The name of ``model``'s output layer: its last ``Linear`` / ``Conv1d`` / ``Conv2d`` in
    ``named_modules()`` order, not inside an attention module (``""`` if the model itself is
    that layer). The same layer as the direct rules' ``source="output"``."""
    names = weight_layer_names(model)
    if not names:
        raise ValueError("rule 'frozen' trains the output layer, the model's last Linear / Conv1d / "
                         "Conv2d, and the model has none")
    return names[-1]


def check_frozen_arguments(given: dict) -> None:
    """One ``ValueError`` naming every feedback setting in ``given`` (setting name -> value,
    ``None`` / empty meaning not given): ``frozen`` has no feedback path to set."""
    bad = [k for k, v in given.items() if v is not None and not (isinstance(v, (dict, list, tuple)) and not v)]
    if bad:
        shown = ", ".join(f"{k}={given[k]!r}" for k in bad)
        raise ValueError(
            f"rule 'frozen' takes no {', '.join(_NOT_FOR_FROZEN)} or layer options: it has no "
            f"feedback path (the hidden layers are frozen at initialisation and only the output "
            f"layer learns, by its exact gradient); got {shown}"
        )


def convert_frozen(model: nn.Module, *, inplace: bool = False, report: bool = False):
    """``raftorch.convert(model, "frozen")``: a deep copy of ``model`` (``model`` itself with
    ``inplace=True``) in which only the output layer's ``weight`` and ``bias`` require grad.

    Every other parameter gets ``requires_grad=False``: hidden weights and biases, BatchNorm /
    LayerNorm affine parameters, embeddings, class tokens, position embeddings. No module is
    replaced, so the forward pass is unchanged bit for bit. BatchNorm running statistics are
    buffers, not parameters: they still update in train mode, and dropout stays active in train
    mode (see the module docstring).

    Returns the model, or ``(model, report)`` with ``report=True``: a
    :class:`raftorch.ConversionReport` whose ``output`` names the output layer, ``learning``
    the parameter names that learn and ``frozen`` those frozen (every name of a shared
    parameter), and ``converted`` is empty (no layer is swapped).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    name = output_layer(model)
    layer = model.get_submodule(name)
    learn = {id(p) for p in (layer.weight, getattr(layer, "bias", None)) if isinstance(p, nn.Parameter)}
    learning, frozen = [], []
    for pname, p in model.named_parameters(remove_duplicate=False):
        keep = id(p) in learn
        p.requires_grad_(keep)
        (learning if keep else frozen).append(pname)
    if not report:
        return model
    result = ConversionReport(output=(name, type(layer).__name__), learning=learning, frozen=frozen)
    return model, result

