"""``convert()`` any ``nn.Module`` to a feedback rule, and ``describe()`` the result."""
from __future__ import annotations

import copy
import fnmatch
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from raftorch.layers import Conv2d, FeedbackLayer, Linear
from raftorch.rules import DIRECT_RULES, get_rule

# Modules with weights that convert() cannot reach, and why.
_UNSUPPORTED = {
    nn.MultiheadAttention: (
        "nn.MultiheadAttention calls F.multi_head_attention_forward on its weights directly "
        "(its Linear submodules are never called); build attention from nn.Linear maps "
        "(as raftorch.models' ViT does) so q, k, v and the output projection convert"
    ),
    nn.Conv1d: "Conv1d is not supported yet (Linear and Conv2d are)",
    nn.Conv3d: "Conv3d is not supported yet (Linear and Conv2d are)",
    nn.ConvTranspose1d: "transposed convolutions are not supported",
    nn.ConvTranspose2d: "transposed convolutions are not supported",
    nn.ConvTranspose3d: "transposed convolutions are not supported",
    nn.RNNBase: "recurrent layers are not supported (their weights are used inside a fused kernel)",
    nn.Bilinear: "Bilinear is not supported",
}


class RaftorchConversionWarning(UserWarning):
    """convert() left some weight layers on exact backpropagation."""


@dataclass
class ConversionReport:
    """What :func:`convert` did: ``converted`` (name, type, rank) and ``skipped``
    (name, type, reason) modules."""

    converted: list[tuple[str, str, int | None]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} layer(s)"]
        lines += [f"  {n or '<root>'} ({t}), rank={r}" for n, t, r in self.converted]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} module(s), left on exact backprop:")
            lines += [f"  {n or '<root>'} ({t}): {why}" for n, t, why in self.skipped]
        return "\n".join(lines)


def _convertible(module: nn.Module) -> bool:
    return type(module) in (nn.Linear, nn.Conv2d, Linear, Conv2d)


def _matches(name: str, patterns) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _build(old: nn.Module, rule, rank, options) -> nn.Module:
    factory = {"device": old.weight.device, "dtype": old.weight.dtype}
    bias = old.bias is not None
    if isinstance(old, nn.Linear):
        new = Linear(old.in_features, old.out_features, bias, rule=rule, rank=rank, **factory, **options)
    else:
        new = Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                     old.dilation, old.groups, bias, old.padding_mode, rule=rule, rank=rank,
                     **factory, **options)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.weight.requires_grad_(old.weight.requires_grad)
        if bias:
            new.bias.copy_(old.bias)
            new.bias.requires_grad_(old.bias.requires_grad)
    new.train(old.training)
    return new


def convert(model: nn.Module, rule: str, rank=None, *, ranks: dict | None = None,
            include=None, exclude=(), inplace: bool = False, strict: bool = False,
            report: bool = False, source=None, targets=None, **options):
    """Replace every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` by its raftorch twin.

    Args:
        model: any ``nn.Module`` (the root itself may be a Linear or Conv2d).
        rule: ``"bp"``, ``"fa"``, ``"kp"``, ``"fa-lowrank"``, ``"raf-q"`` or ``"raf"``; or the
            direct rules ``"dfa"``, ``"draf"`` (with ``source=``, ``targets=``).
        rank: feedback rank for the low-rank rules (an int or ``"full"``), clamped per layer.
        ranks: ``{module name or glob pattern: rank}``, overriding ``rank`` per layer (the
            paper's Fig. 3a limits one layer at a time). The first matching entry wins.
        include: names or glob patterns of the modules to convert (default: all).
        exclude: names or glob patterns of modules to leave as they are.
        inplace: modify ``model`` itself instead of a deep copy.
        strict: raise instead of warning when a weight layer cannot be converted.
        report: also return a :class:`ConversionReport`.
        **options: layer options (Oja options for ``raf``), see :class:`raftorch.Linear`.
        source, targets: for the direct rules ``"dfa"`` and ``"draf"`` only: the module whose
            output error is broadcast (``"output"`` by default, ``"penultimate"`` or a module
            name) and the modules fed directly (default: every weight layer before the
            source). See :func:`raftorch.direct.convert_direct` (which also takes
            ``rest_rule``, ``rest_rank`` and ``example_input``) and
            :class:`raftorch.DirectFeedback`.

    Weights and biases are copied, so the forward pass is unchanged bit for bit. Modules with
    weights that cannot be converted (``nn.MultiheadAttention``, RNNs, Conv1d, ...) are
    reported with a :class:`RaftorchConversionWarning` (or a ``ValueError`` with
    ``strict=True``), never skipped silently.

    Returns:
        the converted model, or ``(model, report)`` with ``report=True``.
    """
    if isinstance(rule, str) and rule.lower() in DIRECT_RULES:
        if ranks or include is not None or exclude or strict:
            raise ValueError(f"rule {rule!r} takes source= and targets=, not ranks/include/exclude/strict")
        from raftorch.direct import convert_direct  # direct builds on this module

        return convert_direct(model, rule, rank, source="output" if source is None else source,
                              targets=targets, inplace=inplace, report=report, **options)
    if source is not None or targets is not None:
        raise ValueError(f"source= and targets= are for the direct rules 'dfa' and 'draf', "
                         f"not {rule!r}")
    rule = get_rule(rule)
    ranks = dict(ranks or {})
    include = None if include is None else ([include] if isinstance(include, str) else list(include))
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    if not inplace:
        model = copy.deepcopy(model)

    candidates, skipped, inside_unsupported = [], [], set()
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside_unsupported):
            continue
        if _convertible(module):
            candidates.append(name)
            continue
        for kind, why in _UNSUPPORTED.items():
            if isinstance(module, kind):
                skipped.append((name, type(module).__name__, why))
                inside_unsupported.add(name)
                break
        else:
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                skipped.append((name, type(module).__name__,
                                "a subclass of Linear/Conv2d with its own behaviour; convert it by hand"))

    for label, patterns in (("ranks", list(ranks)), ("include", include or []), ("exclude", exclude)):
        for p in patterns:
            if not any(_matches(n, [p]) for n in candidates):
                shown = ", ".join(repr(n) for n in candidates[:12]) + (" ..." if len(candidates) > 12 else "")
                raise ValueError(
                    f"{label} entry {p!r} matches no convertible module; "
                    f"the Linear/Conv2d modules are: {shown or '(none)'}"
                )

    result = ConversionReport(skipped=skipped)
    for name in candidates:
        if (include is not None and not _matches(name, include)) or _matches(name, exclude):
            continue
        layer_rank = next((r for p, r in ranks.items() if _matches(name, [p])), rank)
        old = model.get_submodule(name)
        try:
            new = _build(old, rule, layer_rank, options)
        except ValueError as exc:
            raise ValueError(f"cannot convert {name or 'the model'!r} ({type(old).__name__}): {exc}") from None
        if name == "":
            model = new
        else:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
        result.converted.append((name, type(old).__name__, new.rank))

    if skipped:
        msg = "convert() left these modules on exact backprop:\n" + "\n".join(
            f"  {n} ({t}): {why}" for n, t, why in skipped)
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, RaftorchConversionWarning, stacklevel=2)
    return (model, result) if report else model


def feedback_layers(model: nn.Module):
    """``(name, layer)`` for every raftorch feedback layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FeedbackLayer)]


def feed_targets(model: nn.Module, targets: torch.Tensor) -> None:
    """Give the targets of this batch (class indices or ``(N, n_out)`` floats) to the layers
    that learn ``P`` on the targets (``oja_source="target"``); a no-op for the others.
    Call it every step before ``loss.backward()``."""
    for _, layer in feedback_layers(model):
        if layer._targets is not None:
            layer._targets.value = targets.detach()


class Table:
    """Rows of a description; ``str(table)`` draws aligned columns."""

    def __init__(self, columns: list[str], rows: list[dict]):
        self.columns, self.rows = columns, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def __str__(self) -> str:
        cells = [self.columns] + [[str(r[c]) for c in self.columns] for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        fmt = lambda row: "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()  # noqa: E731
        return "\n".join([fmt(cells[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells[1:]])

    __repr__ = __str__


def _shape(t) -> str:
    return "x".join(str(s) for s in t)


def describe(model: nn.Module) -> Table:
    """One row per module that owns weights: name, type, rule, rank, weight shape and
    feedback parameters. Layers that are not raftorch layers learn with exact backprop
    (rule ``"bp*"``) or, for norm layers, with their local exact gradient. Direct-feedback
    paths (``dfa``/``draf``) get one row each, naming their target."""
    from raftorch.direct import DirectPath  # direct builds on this module

    rows = []
    for name, m in model.named_modules():
        own = dict(m.named_parameters(recurse=False))
        if not own:
            continue
        if isinstance(m, (FeedbackLayer, DirectPath)):
            rule, rank = m.rule.name, ("-" if m.rank is None else m.rank)
            fb = ", ".join(f"{k} {_shape(s)}{'' if k in m.rule.learns else ' (fixed)'}"
                           for k, s in m.feedback_shapes().items()) or "-"
            if isinstance(m, DirectPath):
                fb += f" (into {m.target!r} at {m.point!r})"
        else:
            rule, rank, fb = "bp*", "-", "-"
        w = own.get("weight", next(iter(own.values())))
        rows.append({"name": name or "<root>", "type": type(m).__name__, "rule": rule,
                     "rank": rank, "shape": _shape(w.shape), "feedback": fb})
    return Table(["name", "type", "rule", "rank", "shape", "feedback"], rows)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if name == "":
        return new
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
    return model


def _plain_layer(layer: nn.Module) -> nn.Module:
    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    bias = layer.bias is not None
    # skip_init: no random initialisation (it would draw from the global RNG), the weights are copied
    if isinstance(layer, nn.Linear):
        new = nn.utils.skip_init(nn.Linear, layer.in_features, layer.out_features, bias, **factory)
    else:
        new = nn.utils.skip_init(nn.Conv2d, layer.in_channels, layer.out_channels, layer.kernel_size,
                                 layer.stride, layer.padding, layer.dilation, layer.groups, bias,
                                 layer.padding_mode, **factory)
    with torch.no_grad():
        new.weight.copy_(layer.weight)
        new.weight.requires_grad_(layer.weight.requires_grad)
        if bias:
            new.bias.copy_(layer.bias)
            new.bias.requires_grad_(layer.bias.requires_grad)
    new.train(layer.training)
    return new


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that learns by exact backprop: every raftorch ``Linear`` /
    ``Conv2d`` replaced by ``torch.nn.Linear`` / ``torch.nn.Conv2d`` with the same weights and
    bias (so the forward pass is the same, bit for bit), and a direct-feedback object
    (``dfa``/``draf``) detached with its hooks. Other modules, buffers (BatchNorm statistics)
    and training flags are copied as they are; so are forward hooks a user registered (only the
    direct-feedback hooks are removed). ``model`` and the global RNG are not changed. Used to
    measure the true backprop error and the receptive fields of the forward map."""
    from raftorch.direct import DirectFeedback  # direct builds on this module

    plain = copy.deepcopy(model)
    for df in [m for m in plain.modules() if isinstance(m, DirectFeedback)]:
        df.detach_from(plain)
    for name, m in list(plain.named_modules()):
        if isinstance(m, FeedbackLayer):
            plain = _set_module(plain, name, _plain_layer(m))
    return plain
