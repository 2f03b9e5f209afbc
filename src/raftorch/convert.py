"""``convert()`` any ``nn.Module`` to a feedback rule, and ``describe()`` the result."""
from __future__ import annotations

import copy

import torch
from torch import nn

from raftorch.attention import MultiheadAttention, ProjectionFeedback
from raftorch.control import check_frozen_arguments, convert_frozen
from raftorch.direct import DirectFeedback, convert_direct
from raftorch.direct_dense import DirectPath
from raftorch.layers import FeedbackLayer
# ConversionReport and RaftorchConversionWarning are defined in raftorch.replace, importable from here too
from raftorch.replace import ConversionReport, RaftorchConversionWarning  # noqa: F401
from raftorch.replace import check_model, convert_layers, is_attention, plain_twin, set_module
from raftorch.rules import CONTROL_RULES, DIRECT_RULES, Rule


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
    check_model(model)
    name = rule.name if isinstance(rule, Rule) else rule.lower() if isinstance(rule, str) else None
    if name in CONTROL_RULES:
        check_frozen_arguments({"rank": rank, "ranks": ranks, "include": include, "exclude": exclude,
                                "source": source, "targets": targets, **options})
        return convert_frozen(model, inplace=inplace, report=report)
    if isinstance(rule, str) and rule.lower() in DIRECT_RULES:
        if ranks or include is not None or exclude or strict:
            raise ValueError(f"rule {rule!r} takes source= and targets=, not ranks/include/exclude/strict")
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
    return convert_layers(model, rule, rank, ranks=ranks, include=include, exclude=exclude, inplace=inplace,
                          strict=strict, report=report, stacklevel=3, **options)


def feedback_layers(model: nn.Module):
    """``(name, layer)`` for every raftorch feedback layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FeedbackLayer)]


def feed_targets(model: nn.Module, targets: torch.Tensor) -> None:
    """Give the targets of this batch (class indices or ``(N, n_out)`` floats) to the layers
    that learn ``P`` on the targets (``oja_source="target"``); a no-op for the others.
    Call it every step before ``loss.backward()``."""
    for _, layer in feedback_layers(model):
        if layer.target_slot is not None:
            layer.target_slot.value = targets.detach()


class LayerTable:
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


def describe(model: nn.Module) -> LayerTable:
    """One row per module that owns weights: name, type, rule, rank, weight shape and
    feedback parameters. Layers that are not raftorch layers learn with exact backprop
    (rule ``"bp*"``) or, for norm layers, with their local exact gradient; those whose own
    parameters all have ``requires_grad=False`` do not learn (rule ``"frozen"``, as every
    module but the output layer after ``convert(model, "frozen")``). Direct-feedback
    paths (``dfa``/``draf``) get one row each, naming their target, and each target is
    labelled by the direct rule and the rank of its path (its own error comes from that
    path, not from the layer above). An attention module gets a row (its rule and rank) and
    one row per q / k / v feedback path (shape: that projection's ``(E, n_in)`` slice)."""
    direct = getattr(model, "direct_feedback", None)
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
    return LayerTable(["name", "type", "rule", "rank", "shape", "feedback"], rows)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts))]


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that learns by exact backprop: every raftorch ``Linear`` /
    ``Conv1d`` / ``Conv2d`` / ``MultiheadAttention`` replaced by its ``torch.nn`` module with
    the same weights and bias (so the forward pass is the same, bit for bit; a layer used in
    several places stays one module), and a direct-feedback object
    (``dfa``/``draf``) detached with its hooks. Other modules, buffers (BatchNorm statistics)
    and training flags are copied as they are; so are forward hooks a user registered (only the
    direct-feedback hooks are removed). ``model`` and the global RNG are not changed. Used to
    measure the true backprop error and the receptive fields of the forward map."""
    plain = copy.deepcopy(model)
    for df in [m for m in plain.modules() if isinstance(m, DirectFeedback)]:
        df.detach_from(plain)
    names_of: dict[int, list[str]] = {}
    for name, m in plain.named_modules(remove_duplicate=False):
        names_of.setdefault(id(m), []).append(name)
    done: set[int] = set()
    for name, m in list(plain.named_modules(remove_duplicate=False)):
        if id(m) in done or not (isinstance(m, FeedbackLayer) or is_attention(m) and hasattr(m, "to_torch")):
            continue
        if any(id(plain.get_submodule(a)) in done for a in _ancestors(name)):
            continue  # inside an attention module already made plain
        done.add(id(m))
        new = plain_twin(m)
        for where in names_of[id(m)]:  # a shared layer stays shared
            plain = set_module(plain, where, new)
    return plain
