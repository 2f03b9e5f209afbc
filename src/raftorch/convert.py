"""``convert()`` any ``nn.Module`` to a feedback rule, and ``describe()`` the result."""
from __future__ import annotations

import copy
import fnmatch
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from raftorch.layers import Conv1d, Conv2d, FeedbackLayer, Linear
from raftorch.rules import CONTROL_RULES, DIRECT_RULES, Rule, get_rule

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


class RaftorchConversionWarning(UserWarning):
    """convert() left some weight layers on exact backpropagation."""


@dataclass
class ConversionReport:
    """What :func:`convert` did: ``converted`` (name, type, rank) and ``skipped``
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


_WEIGHT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)


def _is_attention(module: nn.Module) -> bool:
    from raftorch.attention import MultiheadAttention

    return type(module) in (nn.MultiheadAttention, MultiheadAttention)


def _convertible(module: nn.Module) -> bool:
    return type(module) in (nn.Linear, nn.Conv1d, nn.Conv2d, Linear, Conv1d, Conv2d) or _is_attention(module)


def _convert_one(old: nn.Module, rule, rank, options) -> nn.Module:
    if _is_attention(old):
        from raftorch.attention import MultiheadAttention

        return MultiheadAttention.from_torch(old, rule=rule, rank=rank, **options)
    return _build(old, rule, rank, options)


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


def _build(old: nn.Module, rule, rank, options) -> nn.Module:
    """The raftorch twin of ``old``, holding ``old``'s own ``weight`` and ``bias``
    ``Parameter`` objects (not copies): the forward pass is unchanged bit for bit, a
    ``Parameter`` shared with another module (tied weights) stays shared, and with
    ``inplace=True`` an optimizer built on the old parameters still updates the new layer."""
    factory = {"device": old.weight.device, "dtype": old.weight.dtype}
    bias = old.bias is not None
    if isinstance(old, nn.Linear):
        new = Linear(old.in_features, old.out_features, bias, rule=rule, rank=rank, **factory, **options)
    else:
        new = (Conv1d if isinstance(old, nn.Conv1d) else Conv2d)(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                     old.dilation, old.groups, bias, old.padding_mode, rule=rule, rank=rank,
                     **factory, **options)
    new.weight = old.weight
    if bias:
        new.bias = old.bias
    new.train(old.training)
    return new


def convert(model: nn.Module, rule: str, rank=None, *, ranks: dict | None = None,
            include=None, exclude=(), inplace: bool = False, strict: bool = False,
            report: bool = False, source=None, targets=None, **options):
    """Replace every ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.MultiheadAttention``
    of ``model`` by its raftorch twin (:class:`raftorch.Linear`, :class:`raftorch.Conv1d`,
    :class:`raftorch.Conv2d`, :class:`raftorch.attention.MultiheadAttention`, whose q, k, v
    and output projections each get a feedback path; so ``nn.TransformerEncoderLayer`` and
    ``nn.Transformer`` convert).

    Args:
        model: any ``nn.Module`` (the root itself may be a Linear or Conv2d).
        rule: ``"bp"``, ``"fa"``, ``"kp"``, ``"fa-lowrank"``, ``"raf-q"`` or ``"raf"``; or the
            direct rules ``"dfa"``, ``"draf"`` (with ``source=``, ``targets=``); or the
            no-feedback control ``"frozen"``: every parameter but the output layer's weight and
            bias frozen at initialisation, no module replaced, and no rank, ranks, include,
            exclude, source, targets or layer options (a ``ValueError``). BatchNorm running
            statistics still update in train mode and dropout stays; see
            :func:`raftorch.control.convert_frozen`.
        rank: feedback rank for the low-rank rules (an int or ``"full"``), clamped per layer.
        ranks: ``{module name or glob pattern: rank}``, overriding ``rank`` per layer (the
            paper's Fig. 3a limits one layer at a time). The first matching entry wins. An
            ``nn.MultiheadAttention`` is one entry (its name): its rank applies to q, k, v and
            ``out_proj`` alike, each clamped to its own limit.
        include: names or glob patterns of the modules to convert (default: all). A module
            used in several places is matched (by ``ranks``, ``include``, ``exclude``) under
            the first of its names, in ``named_modules()`` order.
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

    The converted layers hold the original ``weight`` / ``bias`` ``Parameter`` objects, so the
    forward pass is unchanged bit for bit. Weight sharing is kept: a module used in several
    places (e.g. twice in a ``Sequential``) becomes one converted module used in all of them,
    and a ``Parameter`` shared by two modules (a tied embedding / output ``Linear``) stays one
    ``Parameter``. A global ``rank`` is clamped per layer (to ``min(in, out)``; for a grouped
    or depthwise convolution also rounded down to a multiple of ``groups``, at least
    ``groups``, listed in the report's ``adjusted``); an explicit ``ranks`` entry that does
    not fit a grouped convolution raises. Modules with weights that cannot be converted
    (``nn.Conv3d``, transposed convolutions, RNN / LSTM / GRU, ``nn.Embedding``,
    ``nn.Bilinear``) are reported with a :class:`RaftorchConversionWarning` (or a
    ``ValueError`` with ``strict=True``), never skipped silently; they learn by their exact
    gradient of the error that reaches them.

    Returns:
        the converted model, or ``(model, report)`` with ``report=True``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"convert needs the model to convert (an nn.Module), got "
                         f"{type(model).__name__} {model!r:.60}")
    name = rule.name if isinstance(rule, Rule) else rule.lower() if isinstance(rule, str) else None
    if name in CONTROL_RULES:
        from raftorch.control import check_frozen_arguments, convert_frozen

        check_frozen_arguments({"rank": rank, "ranks": ranks, "include": include, "exclude": exclude,
                                "source": source, "targets": targets, **options})
        return convert_frozen(model, inplace=inplace, report=report)
    if isinstance(rule, str) and rule.lower() in DIRECT_RULES:
        if ranks or include is not None or exclude or strict:
            raise ValueError(f"rule {rule!r} takes source= and targets=, not ranks/include/exclude/strict")
        from raftorch.direct import convert_direct  # direct builds on this module

        out = convert_direct(model, rule, rank, source="output" if source is None else source,
                             targets=targets, inplace=inplace, report=report, **options)
        if report:  # the targets learn from their direct path: report its rule and rank
            model, result = out
            paths = {p.target: p for p in model.direct_feedback.paths}
            result.direct = [(p.target, p.rule.name, p.rank) for p in paths.values()]
            result.converted = [(n, t, paths[n].rank if n in paths else r) for n, t, r in result.converted]
        return out
    if source is not None or targets is not None:
        raise ValueError(f"source= and targets= are for the direct rules 'dfa' and 'draf', "
                         f"not {rule!r}")
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
            if _is_attention(module):
                not_entered.add(name)  # its out_proj is converted with it
            continue
        for kind, why in _UNSUPPORTED.items():
            if isinstance(module, kind):
                skipped.append((name, type(module).__name__, why))
                not_entered.add(name)
                break
        else:
            if isinstance(module, _WEIGHT_TYPES):
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
            new = _convert_one(old, rule, layer_rank, options)
        except ValueError as exc:
            raise ValueError(f"cannot convert {name or 'the model'!r} ({type(old).__name__}): {exc}") from None
        for where in names_of[id(old)]:  # every place the module is used
            model = _set_module(model, where, new)
            if where != name:
                result.shared.append((where, name or "<root>"))
        result.converted.append((name, type(old).__name__, getattr(new, "rank", None)))

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
    (rule ``"bp*"``) or, for norm layers, with their local exact gradient; those whose own
    parameters all have ``requires_grad=False`` do not learn (rule ``"frozen"``, as every
    module but the output layer after ``convert(model, "frozen")``). Direct-feedback
    paths (``dfa``/``draf``) get one row each, naming their target, and each target is
    labelled by the direct rule and the rank of its path (its own error comes from that
    path, not from the layer above). An attention module gets a row (its rule and rank) and
    one row per q / k / v feedback path (shape: that projection's ``(E, n_in)`` slice)."""
    from raftorch.attention import MultiheadAttention, ProjectionFeedback
    from raftorch.direct import DirectPath  # direct builds on this module

    direct = model._modules.get("direct_feedback")
    fed = {}
    if direct is not None and hasattr(direct, "paths"):
        fed = {path.target: (i, path) for i, path in enumerate(direct.paths)}
    rows = []
    for name, m in model.named_modules():
        own = dict(m.named_parameters(recurse=False))
        if not own:
            continue
        w = own.get("weight", next(iter(own.values())))
        shape = _shape(w.shape)
        if isinstance(m, (FeedbackLayer, DirectPath, ProjectionFeedback)):
            rule, rank = m.rule.name, ("-" if m.rank is None else m.rank)
            fb = ", ".join(f"{k} {_shape(s)}{'' if k in m.rule.learns else ' (fixed)'}"
                           for k, s in m.feedback_shapes().items()) or "-"
            if isinstance(m, DirectPath):
                fb += f" (into {m.target!r} at {m.point!r})"
            if isinstance(m, ProjectionFeedback):
                shape = f"{m.n_out}x{m.n_in}"
                fb += f" ({m.part} projection)"
        elif isinstance(m, MultiheadAttention):
            rule, rank = m.rule.name, ("-" if m.rank is None else m.rank)
            fb = "q_feedback, k_feedback, v_feedback, out_proj"
        else:  # a plain module: exact gradient, unless frozen (the control "frozen")
            rule = "bp*" if any(p.requires_grad for p in own.values()) else "frozen"
            rank, fb = "-", "-"
        if name in fed:
            i, path = fed[name]
            rule, rank = path.rule.name, ("-" if path.rank is None else path.rank)
            down = m.rule.name if isinstance(m, FeedbackLayer) else "bp*"
            fb = f"error from direct_feedback.paths.{i}; sends it down by {down}"
        rows.append({"name": name or "<root>", "type": type(m).__name__, "rule": rule,
                     "rank": rank, "shape": shape, "feedback": fb})
    return Table(["name", "type", "rule", "rank", "shape", "feedback"], rows)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if name == "":
        return new
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
    return model


def _ancestors(name: str) -> list[str]:
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts))]


def _plain_layer(layer: nn.Module) -> nn.Module:
    if _is_attention(layer):
        return layer.to_torch()
    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    bias = layer.bias is not None
    # skip_init: no random initialisation (it would draw from the global RNG); the parameters are reused
    if isinstance(layer, nn.Linear):
        new = nn.utils.skip_init(nn.Linear, layer.in_features, layer.out_features, bias, **factory)
    else:
        new = nn.utils.skip_init(nn.Conv1d if isinstance(layer, nn.Conv1d) else nn.Conv2d, layer.in_channels, layer.out_channels, layer.kernel_size,
                                 layer.stride, layer.padding, layer.dilation, layer.groups, bias,
                                 layer.padding_mode, **factory)
    new.weight = layer.weight  # the copy's own Parameter objects: tied weights stay tied
    if bias:
        new.bias = layer.bias
    new.train(layer.training)
    return new


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that learns by exact backprop: every raftorch ``Linear`` /
    ``Conv1d`` / ``Conv2d`` / ``MultiheadAttention`` replaced by its ``torch.nn`` module with
    the same weights and bias (so the forward pass is the same, bit for bit; a layer used in
    several places stays one module), and a direct-feedback object
    (``dfa``/``draf``) detached with its hooks. Other modules, buffers (BatchNorm statistics)
    and training flags are copied as they are; so are forward hooks a user registered (only the
    direct-feedback hooks are removed). ``model`` and the global RNG are not changed. Used to
    measure the true backprop error and the receptive fields of the forward map."""
    from raftorch.direct import DirectFeedback  # direct builds on this module

    plain = copy.deepcopy(model)
    for df in [m for m in plain.modules() if isinstance(m, DirectFeedback)]:
        df.detach_from(plain)
    names_of: dict[int, list[str]] = {}
    for name, m in plain.named_modules(remove_duplicate=False):
        names_of.setdefault(id(m), []).append(name)
    done: set[int] = set()
    for name, m in list(plain.named_modules(remove_duplicate=False)):
        if id(m) in done or not (isinstance(m, FeedbackLayer) or _is_attention(m) and hasattr(m, "to_torch")):
            continue
        if any(id(plain.get_submodule(a)) in done for a in _ancestors(name)):
            continue  # inside an attention module already made plain
        done.add(id(m))
        new = _plain_layer(m)
        for where in names_of[id(m)]:  # a shared layer stays shared
            plain = _set_module(plain, where, new)
    return plain
