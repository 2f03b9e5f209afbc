"""Replacing a model's weight layers one by one: the layer-wise part of :func:`raftorch.convert`.

:func:`convert_layers` swaps every ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and
``nn.MultiheadAttention`` of a model for its raftorch twin (:func:`feedback_twin`), and
:func:`plain_twin` gives a raftorch layer's plain ``torch.nn`` twin back; both keep the layer's
own ``Parameter`` objects. The direct rules (:mod:`raftorch.direct`) and the control
``frozen`` (:mod:`raftorch.control`) build on this module, and :mod:`raftorch.convert`
dispatches between the three. Also here: what a conversion did (:class:`ConversionReport`)
and which weight layers a model has (:func:`weight_layer_names`).
"""
from __future__ import annotations

import copy
import fnmatch
import warnings
from dataclasses import dataclass, field

from torch import nn

from raftorch.attention import MultiheadAttention
from raftorch.layers import Conv1d, Conv2d, Linear
from raftorch.rules import get_rule

__all__ = ["RaftorchConversionWarning", "ConversionReport", "convert_layers", "check_model", "is_attention",
           "is_weight_layer", "attention_around", "weight_layer_names", "set_module", "layer_arguments",
           "feedback_twin", "plain_twin"]

# Modules with weights that convert() cannot reach, and why.
_UNSUPPORTED = {
    nn.Conv3d: "Conv3d is not supported yet (Linear, Conv1d, Conv2d and MultiheadAttention are)",
    nn.ConvTranspose1d: "transposed convolutions are not supported",
    nn.ConvTranspose2d: "transposed convolutions are not supported",
    nn.ConvTranspose3d: "transposed convolutions are not supported",
    nn.RNNBase: "recurrent layers (RNN, LSTM, GRU) are not supported (their weights are used "
                "inside a fused kernel)",
    nn.Embedding: "Embedding is a lookup, not a layer that sends an error down; it learns by "
                  "its exact gradient (a tied output Linear is converted)",
    nn.EmbeddingBag: "EmbeddingBag is a lookup; it learns by its exact gradient",
    nn.Bilinear: "Bilinear is not supported",
}

WEIGHT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)  # what convert() swaps
# the raftorch twin and the torch.nn twin of each kind of weight layer (layer_arguments' kind)
_FEEDBACK_CLASSES = {"Linear": Linear, "Conv1d": Conv1d, "Conv2d": Conv2d}
_PLAIN_CLASSES = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d}


class RaftorchConversionWarning(UserWarning):
    """convert() left some weight layers on exact backpropagation."""


@dataclass
class ConversionReport:
    """What :func:`raftorch.convert` did: ``converted`` (name, type, rank) and ``skipped``
    (name, type, reason) modules; ``adjusted`` (name, asked, used, why): layers whose global
    rank was changed to fit them (a grouped convolution's rank rounded to a multiple of its
    groups); ``direct`` (target, rule, rank): the direct-feedback paths of ``dfa``/``draf``
    (their targets are listed in ``converted`` with the rank of their direct path).
    ``shared`` (name, first name): modules reached under a second name (weight sharing),
    converted once and kept shared. For the control ``frozen`` (no layer converted):
    ``output`` (name, type) of the output layer, ``learning`` the names of the parameters that
    learn (its weight and bias), ``frozen`` the names of those frozen at initialisation."""

    converted: list[tuple[str, str, int | None]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    adjusted: list[tuple[str, object, int, str]] = field(default_factory=list)
    direct: list[tuple[str, str, int | None]] = field(default_factory=list)
    shared: list[tuple[str, str]] = field(default_factory=list)
    output: tuple[str, str] | None = None
    learning: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if self.output is not None:  # the control "frozen"
            name, kind = self.output
            lines = [f"frozen: only the output layer {name or '<root>'} ({kind}) learns",
                     f"learning {len(self.learning)} parameter(s):"]
            lines += [f"  {n}" for n in self.learning]
            lines.append(f"{len(self.frozen)} parameter(s) frozen at initialisation:")
            lines += [f"  {n}" for n in self.frozen]
            return "\n".join(lines)
        lines = [f"converted {len(self.converted)} layer(s)"]
        lines += [f"  {n or '<root>'} ({t}), rank={r}" for n, t, r in self.converted]
        if self.direct:
            lines.append(f"direct feedback into {len(self.direct)} target(s):")
            lines += [f"  {n} ({rule} path), rank={r}" for n, rule, r in self.direct]
        if self.adjusted:
            lines.append(f"rank adjusted for {len(self.adjusted)} layer(s):")
            lines += [f"  {n or '<root>'}: rank {a!r} -> {u} ({why})" for n, a, u, why in self.adjusted]
        if self.shared:
            lines.append(f"{len(self.shared)} shared module(s), converted once and kept shared:")
            lines += [f"  {n} is {first}" for n, first in self.shared]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} module(s), left on exact backprop:")
            lines += [f"  {n or '<root>'} ({t}): {why}" for n, t, why in self.skipped]
        return "\n".join(lines)


# --------------------------------------------------------------------------- what a model has


def check_model(model) -> None:
    """A ``ValueError`` unless ``model`` is an ``nn.Module`` (the model to convert)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"convert needs the model to convert (an nn.Module), got "
                         f"{type(model).__name__} {model!r:.60}")


def is_attention(module: nn.Module) -> bool:
    """True for an ``nn.MultiheadAttention`` or a :class:`raftorch.MultiheadAttention` itself
    (not another subclass)."""
    return type(module) in (nn.MultiheadAttention, MultiheadAttention)


def _convertible(module: nn.Module) -> bool:
    return type(module) in (nn.Linear, nn.Conv1d, nn.Conv2d, Linear, Conv1d, Conv2d) or is_attention(module)


def is_weight_layer(m: nn.Module) -> bool:
    """True for a ``Linear`` / ``Conv1d`` / ``Conv2d`` (``torch.nn`` or raftorch, subclasses included)."""
    return isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))


def attention_around(model: nn.Module, name: str) -> str | None:
    """The name of the ``nn.MultiheadAttention`` that ``name`` lies inside, if any: its
    projections run inside one attention call (PyTorch's never calls them as modules), so no
    error can be injected at their outputs."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        outer = ".".join(parts[:i])
        if isinstance(model.get_submodule(outer), nn.MultiheadAttention):
            return outer
    return None


def weight_layer_names(model: nn.Module) -> list[str]:
    """The weight layers that can be targets or the source, in ``named_modules()`` order (not
    the projections inside an attention module, which learn by their rule from the error
    reaching the attention); the last is the output layer (``source="output"``)."""
    return [n for n, m in model.named_modules() if is_weight_layer(m) and attention_around(model, n) is None]


def set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` in ``model``; returns the model (``new`` itself for ``name=""``)."""
    if name == "":
        return new
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
    return model


# --------------------------------------------------------------------------- one layer


def layer_arguments(layer: nn.Module) -> tuple[str, tuple, dict]:
    """``(kind, args, factory)`` of a ``Linear`` / ``Conv1d`` / ``Conv2d`` (``torch.nn`` or
    raftorch): ``kind`` its class name, ``args`` the positional arguments that build a layer
    of the same shape and geometry, ``factory`` its weight's ``device`` and ``dtype``."""
    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        return "Linear", (layer.in_features, layer.out_features, bias), factory
    kind = "Conv1d" if isinstance(layer, nn.Conv1d) else "Conv2d"
    return kind, (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation, layer.groups, bias, layer.padding_mode), factory


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` holding ``old``'s own ``weight`` and ``bias`` ``Parameter`` objects (not copies)
    and its training flag."""
    new.weight = old.weight
    if old.bias is not None:
        new.bias = old.bias
    new.train(old.training)
    return new


def feedback_twin(old: nn.Module, rule, rank, options: dict) -> nn.Module:
    """The raftorch twin of ``old`` (a convertible layer or attention module) with ``rule``,
    ``rank`` and the layer ``options``, holding ``old``'s own ``weight`` and ``bias``
    ``Parameter`` objects (not copies): the forward pass is unchanged bit for bit, a
    ``Parameter`` shared with another module (tied weights) stays shared, and with
    ``inplace=True`` an optimizer built on the old parameters still updates the new layer."""
    if is_attention(old):
        return MultiheadAttention.from_torch(old, rule=rule, rank=rank, **options)
    kind, args, factory = layer_arguments(old)
    return _adopt(_FEEDBACK_CLASSES[kind](*args, rule=rule, rank=rank, **factory, **options), old)


def plain_twin(layer: nn.Module) -> nn.Module:
    """The ``torch.nn`` twin of a raftorch layer or attention module, holding its own
    ``Parameter`` objects (tied weights stay tied); the inverse of :func:`feedback_twin`."""
    if is_attention(layer):
        return layer.to_torch()
    kind, args, factory = layer_arguments(layer)
    # skip_init: no random initialisation (it would draw from the global RNG); the parameters are reused
    return _adopt(nn.utils.skip_init(_PLAIN_CLASSES[kind], *args, **factory), layer)


def _matches(name: str, patterns) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _group_rank(old: nn.Module, rank) -> tuple[object, str | None]:
    """A global rank made to fit a grouped convolution: the error channels are split evenly
    between the ``g`` groups, so the rank (after clamping to the layer's limit
    ``min(C_out, C_in kH kW)``, itself a multiple of ``g``) is rounded down to a multiple of
    ``g``, and is at least ``g``. Returns ``(rank, why)``, ``why`` None when unchanged."""
    g = getattr(old, "groups", 1)
    if g == 1 or isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        return rank, None  # nothing to fit (or a bad rank: the layer raises its own error)
    clamped = min(rank, old.out_channels, old.weight[0].numel() * g)  # C_in * kernel size
    used = max(g, clamped // g * g)
    if used == clamped:
        return rank, None
    return used, f"groups={g}: the rank must be a multiple of {g}, at least {g}"


# --------------------------------------------------------------------------- a whole model


def convert_layers(model: nn.Module, rule, rank=None, *, ranks: dict | None = None, include=None,
                   exclude=(), inplace: bool = False, strict: bool = False, report: bool = False,
                   stacklevel: int = 2, **options):
    """:func:`raftorch.convert` for a layer-wise rule (``bp``, ``fa``, ``kp``, ``fa-lowrank``,
    ``raf-q``, ``raf``): every convertible module replaced by its :func:`feedback_twin`.
    Arguments and result as :func:`raftorch.convert`; ``stacklevel`` is the
    :class:`RaftorchConversionWarning`'s, counted from this function's caller (2: the caller)."""
    check_model(model)
    rule = get_rule(rule)
    ranks = dict(ranks or {})
    include = None if include is None else ([include] if isinstance(include, str) else list(include))
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    if not inplace:
        model = copy.deepcopy(model)

    # every name of every module: a module used in two places (weight sharing) has two names
    names_of: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(module), []).append(name)
    # not_entered: modules whose submodules are not visited (converted whole, or unsupported)
    candidates, skipped, not_entered = [], [], set()
    for name, module in model.named_modules():  # each module once, under its first name
        if any((p == "" and name != "") or name.startswith(p + ".") for p in not_entered):
            continue
        if _convertible(module):
            candidates.append(name)
            if is_attention(module):
                not_entered.add(name)  # its out_proj is converted with it
            continue
        for kind, why in _UNSUPPORTED.items():
            if isinstance(module, kind):
                skipped.append((name, type(module).__name__, why))
                not_entered.add(name)
                break
        else:
            if isinstance(module, WEIGHT_TYPES):
                skipped.append((name, type(module).__name__,
                                "a subclass of a supported layer with its own behaviour; convert it by hand"))

    for label, patterns in (("ranks", list(ranks)), ("include", include or []), ("exclude", exclude)):
        for p in patterns:
            if not any(_matches(n, [p]) for n in candidates):
                shown = ", ".join(repr(n) for n in candidates[:12]) + (" ..." if len(candidates) > 12 else "")
                raise ValueError(
                    f"{label} entry {p!r} matches no convertible module; "
                    f"the convertible modules are: {shown or '(none)'}"
                )

    result = ConversionReport(skipped=skipped)
    for name in candidates:
        if (include is not None and not _matches(name, include)) or _matches(name, exclude):
            continue
        explicit = next((r for p, r in ranks.items() if _matches(name, [p])), None)
        layer_rank = rank if explicit is None else explicit
        old = model.get_submodule(name)
        if explicit is None and rule.low_rank:  # a global rank bends to fit the layer
            layer_rank, why = _group_rank(old, rank)
            if why is not None:
                result.adjusted.append((name, rank, layer_rank, why))
        try:
            new = feedback_twin(old, rule, layer_rank, options)
        except ValueError as exc:
            raise ValueError(f"cannot convert {name or 'the model'!r} ({type(old).__name__}): {exc}") from None
        for where in names_of[id(old)]:  # every place the module is used
            model = set_module(model, where, new)
            if where != name:
                result.shared.append((where, name or "<root>"))
        result.converted.append((name, type(old).__name__, getattr(new, "rank", None)))

    if skipped:
        msg = "convert() left these modules on exact backprop:\n" + "\n".join(
            f"  {n} ({t}): {why}" for n, t, why in skipped)
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, RaftorchConversionWarning, stacklevel=stacklevel + 1)
    return (model, result) if report else model
