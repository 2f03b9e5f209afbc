r"""Direct feedback (``dfa``, ``draf``): the error of one **source** layer sent straight to
earlier **target** layers, with no backprop through the layers in between.

Math (see docs/rules.md, sections "Direct feedback alignment: dfa" and "Direct RAF: draf"; row convention, a batch of ``N`` samples):

* ``e_s`` ``(N, d_s)``: the error at the source's output (``grad_output`` there), flattened
  per sample. ``"output"``: the model's output, i.e. ``dLoss/dlogits``. A module name: the
  error at that module's output (for a weight layer, its pre-activation ``delta``).
* ``h_l`` ``(N, n_l)``: the activity of target ``l`` at its **injection point** (below),
  flattened per sample; a convolutional target's error map has the target's own shape.
* ``dfa`` (Nokland 2016): ``delta_l = e_s B_l^T``, ``B_l`` ``(n_l, d_s)`` fixed random.
* ``draf``: ``B_l = Q_l P_l``, ``Q_l`` ``(n_l, r)``, ``P_l`` ``(r, d_s)``::

      z_l     = e_s P_l^T                   (N, r)   the low-dimensional error
      delta_l = z_l Q_l^T                   (N, n_l) delivered at the injection point
      grad_Q  = h_l^T z_l                   Kolen-Pollack-like: dQ = -eta h_l (P_l e_s)^T
      grad_P  = oja_grad(P_l, e_s, z_l)     Oja's subspace rule on the source error

  In a linear network the Kolen-Pollack-like rule makes ``B_l`` track the transposed map
  from ``h_l`` to the source, the matrix backprop would use; with ``r = d_s`` and
  ``B_l`` equal to it, ``delta_l`` *is* backprop's error (tested).

Convolutional paths (``path="auto"``, the default, wherever the source's output and the
target's activity are both ``(N, C, H, W)`` maps; ``path="conv"`` / ``"dense"`` to choose):
``P`` ``(r, C_s)`` and ``Q`` ``(C_t, r)`` act on channels at every pixel, with a fixed area
resampling between the two grids, instead of a dense ``(C_t H_t W_t) x (C_s H_s W_s)``
``B_l``; equations in :class:`raftorch.direct_conv.ConvDirectPath`.

Where the error lands (the injection point)
-------------------------------------------
DFA delivers ``B e`` to a hidden layer's units and multiplies by ``f'(a_l)``. Here the error
is written on the *output* of the injection module, so autograd's exact backward of the
modules between the weight layer and that point (nonlinearity, BatchNorm, dropout mask,
pooling) multiplies it by ``f'(a_l)`` on its way to the weight. Targets are named by
module:

* a ``Linear``/``Conv2d`` inside an ``nn.Sequential`` (the default targets): the error lands
  on the output of the run of activation / normalisation / dropout / pooling modules that
  follows it in that ``Sequential``, e.g. ``fc1 -> bn1 -> relu1 -> drop1`` injects at
  ``drop1``: ``delta_fc1 = BN'((B e) * mask * relu'(a))``. This is the paper's MLP setting
  (``h_l = ReLU(W_l h_{l-1})``, ``delta = (B e) * f'(a)``). With no such module after it, at
  the layer's own output (a linear unit, ``f' = 1``).
* any other module (an activation, a block, a custom layer): on that module's own output.
  Models that apply their nonlinearity functionally (``F.relu``) should name the modules
  whose output is the post-activation activity, or accept an error without ``f'``.

How no backprop happens in between
----------------------------------
Forward hooks (``register_forward_hook``) on each injection module keep ``h_l`` on the
:class:`DirectFeedback` object and hand the rest of the network ``h_l.detach()``: the layers
after a target never see an input that requires grad, so autograd builds no input-gradient
path through them (raftorch and plain PyTorch layers alike skip ``grad_input``; the weights
of those layers are never read in the backward pass, tested). A hook on the source wraps its
output in one ``torch.autograd.Function`` whose inputs are the source output and every
stashed ``h_l``; its backward passes ``e_s`` on to the source unchanged (the source and the
layers before it, down to the last injection point, learn from it by their own rule) and
returns ``delta_l`` for every ``h_l``, from where plain autograd carries it through ``f'`` to
the target's weight (exact ``grad_W = delta_l^T h_{l-1}``). The feedback weights receive their
local updates as ordinary ``.grad``\ s, so any optimizer, weight decay, clipping and DDP's
all-reduce apply. Layers after the source keep their ordinary error (their rule in
:func:`convert_direct`, ``bp`` by default). Non-target weight layers before a target learn
by ordinary backprop of that target's injected error.

Why hooks and an explicit object
--------------------------------
All per-forward state (the stashed ``h_l``) lives on the :class:`DirectFeedback` instance,
which is a visible submodule of the model (``model.direct_feedback``) holding the feedback
parameters; there is no module-level state, so two models (or a model and its
``deepcopy``) train side by side without interfering. The hooks are small objects bound to
their owner, so ``copy.deepcopy(model)`` rebinds them to the copy. Under ``torch.no_grad``
(or ``inference_mode``) the hooks do nothing and the forward pass is the plain model's.
One forward at a time per model instance (not thread-safe), as with BatchNorm statistics.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd import Function

from raftorch.control import check_frozen_arguments, convert_frozen
from raftorch.direct_conv import ConvDirectPath, conv_direct_backward
from raftorch.direct_dense import DirectPath
from raftorch.functional import LossScale, OjaOptions, lowrank_feedback, no_double_backward
from raftorch.layers import parse_options
from raftorch.replace import (attention_around, check_model, convert_layers, is_weight_layer,
                              weight_layer_names)
from raftorch.rules import CONTROL_RULES, DIRECT_RULES, Rule

# DirectPath (raftorch.direct_dense) and weight_layer_names (raftorch.replace) are importable from here too
__all__ = ["DirectFeedback", "DirectPath", "convert_direct", "injection_point"]

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU,
                nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish,
                nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink)
# shape-preserving modules that belong to a unit's activity
_ELEMENTWISE = _ACTIVATIONS + (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm,
                               nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.Dropout,
                               nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
          nn.AdaptiveMaxPool2d)
_PATH_FORMS = ("auto", "conv", "dense")  # DirectFeedback(path=...): per-pixel or flattened paths


def injection_point(model: nn.Module, target: str) -> str:
    """Name of the module on whose output the direct error for ``target`` lands (see the
    module docstring): for a weight layer inside an ``nn.Sequential``, the last module of the
    activation / norm / dropout / pooling run that follows it; otherwise ``target`` itself."""
    module = model.get_submodule(target)
    if not is_weight_layer(module) or not target:
        return target
    parent_name, _, child = target.rpartition(".")
    parent = model.get_submodule(parent_name)
    if not isinstance(parent, nn.Sequential):
        return target
    # a Sequential's children by name, a module used twice listed twice (named_children lists it
    # once; no public API lists them all)
    names = list(parent._modules)
    point = child
    for nxt in names[names.index(child) + 1:]:
        if not isinstance(parent._modules[nxt], _ELEMENTWISE + _POOLS):
            break
        point = nxt
    return f"{parent_name}.{point}" if parent_name else point


def _static_map(model: nn.Module, target: str, point: str) -> tuple | None:
    """``(C, None, None)``: ``point``'s output is a map with a ``Conv2d``'s ``C`` channels (the
    modules from ``target`` to ``point`` keep the channels), of a size known only at run time."""
    module = model.get_submodule(target)
    if not isinstance(module, nn.Conv2d):
        return None
    if point != target:
        parent = model.get_submodule(target.rpartition(".")[0])
        names = list(parent._modules)
        run = names[names.index(target.rpartition(".")[2]) + 1: names.index(point.rpartition(".")[2]) + 1]
        if not all(isinstance(parent._modules[n], _ELEMENTWISE + _POOLS) for n in run):
            return None
    return (module.out_channels, None, None)


def _shape_text(shape) -> str:
    inner = ", ".join("?" if d is None else str(d) for d in shape)
    return f"({inner},)" if len(shape) == 1 else f"({inner})"


def _static_size(model: nn.Module, target: str, point: str) -> int | None:
    """Per-sample size of ``point``'s output when it follows from a Linear's width alone."""
    module = model.get_submodule(target)
    if not isinstance(module, nn.Linear):
        return None
    if point != target:
        parent_name = target.rpartition(".")[0]
        parent = model.get_submodule(parent_name)
        names = list(parent._modules)
        run = names[names.index(target.rpartition(".")[2]) + 1: names.index(point.rpartition(".")[2]) + 1]
        if not all(isinstance(parent._modules[n], _ELEMENTWISE) for n in run):
            return None
    return module.out_features


class _DirectFeedbackFn(Function):
    """Identity on the source output; backward sends ``e_s`` on unchanged and ``B_l e_s`` to
    every stashed ``h_l``, with the local ``.grad`` of ``Q_l``, ``P_l``."""

    @staticmethod
    def forward(ctx, plan, source, *tensors):
        k = len(plan.paths)
        hs, params = tensors[:k], tensors[k:]
        ctx.plan, ctx.shapes = plan, [h.shape for h in hs]
        ctx.save_for_backward(*(hs if plan.learns_q else ()), *params)
        return source.clone()

    @staticmethod
    def backward(ctx, e):
        no_double_backward("direct feedback")
        plan, k = ctx.plan, len(ctx.plan.paths)
        saved = ctx.saved_tensors
        hs = saved[:k] if plan.learns_q else None
        params = saved[k:] if plan.learns_q else saved
        need = ctx.needs_input_grad[2:]
        need_h, need_p = need[:k], need[k:]
        rows = e.shape[0]
        grad_h, grad_p = [None] * k, [None] * len(params)
        for i, shape in enumerate(ctx.shapes):
            if plan.conv[i]:  # per-pixel path: raftorch.direct_conv
                j = 2 * i if plan.low_rank else i
                n = 2 if plan.low_rank else 1
                h = hs[i] if plan.learns_q and need_p[j] else None
                out = conv_direct_backward(
                    e, h, shape, params[j:j + n], plan.low_rank, plan.oja, need_h[i], need_p[j],
                    need_p[j + 1] if plan.low_rank else False, scale=plan.scale, clamp=plan.clamp)
                grad_h[i] = out[0]
                if plan.low_rank:
                    grad_p[j], grad_p[j + 1] = out[1], out[2]
            elif plan.low_rank:
                Q, P = params[2 * i], params[2 * i + 1]
                # explicit widths: an empty batch (rows = 0) cannot infer a -1
                e2 = e.reshape(rows, e.shape[1:].numel()).to(P.dtype)
                h = hs[i].reshape(rows, shape[1:].numel()).to(P.dtype) if need_p[2 * i] else None
                gh, grad_p[2 * i], grad_p[2 * i + 1], _, _ = lowrank_feedback(
                    e2, h, Q, P, plan.oja, need_h[i], need_p[2 * i], need_p[2 * i + 1],
                    scale=plan.scale, clamp=plan.clamp)
                if gh is not None:
                    grad_h[i] = gh.view(shape).to(e.dtype)
            else:
                B = params[i]
                if need_h[i]:
                    gh = e.reshape(rows, e.shape[1:].numel()).to(B.dtype) @ B.t()
                    if plan.clamp is not None:
                        gh = gh.clamp_(-plan.clamp, plan.clamp)
                    grad_h[i] = gh.view(shape).to(e.dtype)
        return (None, e, *grad_h, *grad_p)


class _DirectPlan:
    """What the Function needs to know, fixed at construction."""

    def __init__(self, paths, rule: Rule, oja, clamp=None, conv=None):
        self.paths = paths
        self.conv = list(conv or [False] * len(paths))  # per path: per-pixel (direct_conv) or dense
        self.clamp = clamp  # error_clamp: delta_l clamped to [-c, c]
        self.scale = LossScale()  # set by raftorch.loss_scale
        self.low_rank = rule.low_rank
        self.learns_q = "Q" in rule.learns
        self.oja = oja


class _TargetHook:
    """Forward hook on an injection module: stash ``h_l``, hand on ``h_l.detach()``."""

    def __init__(self, owner: "DirectFeedback", name: str):
        self.owner, self.name = owner, name

    def __call__(self, module, args, output):
        return self.owner._on_target(self.name, output)


class _SourceHook:
    def __init__(self, owner: "DirectFeedback"):
        self.owner = owner

    def __call__(self, module, args, output):
        return self.owner._on_source(output)


class _ResetHook:
    """Forward pre-hook on the model: a new forward starts with an empty stash."""

    def __init__(self, owner: "DirectFeedback"):
        self.owner = owner

    def __call__(self, module, args):
        self.owner._stash.clear()


def _named_index(model: nn.Module) -> dict[str, int]:
    return {n: i for i, (n, _) in enumerate(model.named_modules())}


class DirectFeedback(nn.Module):
    r"""Direct feedback from a source module to earlier target modules of ``model``.

    Constructing it attaches it: it registers forward hooks on ``model`` and becomes the
    submodule ``model.direct_feedback`` (so its parameters reach ``model.parameters()``,
    ``state_dict``, ``.to()``, DDP). :meth:`detach_from` undoes this. Its ``forward`` is the
    identity: an ``nn.Sequential`` model calls it as its last item (so ``model[-1]`` is
    this object, not the output layer; name layers, e.g. ``model.out``).

    Args:
        model: the network (its weight layers may be ``nn`` or raftorch layers).
        rule: ``"draf"`` (``B_l = Q_l P_l``, learned) or ``"dfa"`` (fixed random ``B_l``).
        rank: ``r`` for ``draf`` (an int, clamped to ``min(n_l, d_s)`` on a dense path and to
            the source's channels ``C_s`` on a convolutional one, or ``"full"``: that limit);
            ``None`` for ``dfa``.
        source: ``"output"`` (default: the model's output), ``"penultimate"`` (the
            second-to-last weight layer in registration order) or a module name; the source
            error is the gradient at that module's output.
        targets: module names (see the module docstring for where each error lands), or
            ``None``: every ``Linear``/``Conv2d`` whose injection point comes before the
            source in ``model.named_modules()`` order (with ``"output"``: every weight layer
            but the last).
        example_input: a sample batch; needed when sizes do not follow from ``Linear``
            widths or, for convolutional paths, from ``Conv2d`` channels (dense paths from or
            into convolutions, token inputs). It is run once under ``no_grad`` in eval mode
            (training flags are restored).
        path: the form of each path. ``"auto"`` (default): convolutional
            (:class:`raftorch.direct_conv.ConvDirectPath`: ``P`` ``(r, C_s)``, ``Q``
            ``(C_t, r)`` per pixel, area resampling between the grids) where the source's
            output and the target's activity are both ``(N, C, H, W)`` maps, dense
            (:class:`DirectPath`, over the flattened activity) elsewhere; ``"conv"``: every
            path convolutional (a ``ValueError`` if an end is not a map); ``"dense"``: every
            path dense. A ``Conv2d`` source (by name) and ``Conv2d`` targets need no
            ``example_input`` for convolutional paths.
        **options: Oja options for ``draf``: ``oja_center``, ``oja_scale``, ``oja_reduce``,
            ``oja_ddof`` (see :class:`raftorch.functional.OjaOptions`); and, for both rules,
            ``error_clamp=c``: every ``delta_l`` a path delivers is clamped to ``[-c, c]``.
            :func:`raftorch.loss_scale` applies to the paths' Oja updates as to a layer's.

    Every ``ValueError`` names what was wrong and the valid choices.
    """

    def __init__(self, model: nn.Module, rule: str = "draf", rank=None, *, source: str = "output",
                 targets=None, example_input=None, path: str = "auto", **options):
        super().__init__()
        if path not in _PATH_FORMS:
            raise ValueError(f"path must be one of {list(_PATH_FORMS)}, got {path!r}")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(rule, str) or rule.lower() not in DIRECT_RULES:
            raise ValueError(f"direct rule must be one of {sorted(DIRECT_RULES)}, got {rule!r}")
        self.rule = DIRECT_RULES[rule.lower()]
        if not self.rule.low_rank and rank is not None:
            raise ValueError(f"rule 'dfa' uses a fixed full-rank B and takes no rank (got rank={rank!r}); "
                             "use rule='draf' to limit the rank")
        if getattr(model, "direct_feedback", None) is not None:
            raise ValueError("model already has a direct_feedback; call "
                             "model.direct_feedback.detach_from(model) first")
        self.oja, self.error_clamp = parse_options(self.rule, options)
        self.source, self.source_point, source_index = self._resolve_source(model, source)
        points = self._resolve_targets(model, targets, source_index)

        shapes = self._shapes(model, points, example_input, path)
        ref = next(iter(model.parameters()), None)
        factory = {"device": None if ref is None else ref.device,
                   "dtype": None if ref is None else ref.dtype}
        self.paths = nn.ModuleList(self._build_path(t, p, rank, shapes, path, factory) for t, p in points)
        self.plan = _DirectPlan(list(range(len(self.paths))), self.rule, self.oja, self.error_clamp,
                           conv=[p.conv for p in self.paths])
        self._stash: dict[str, Tensor] = {}
        self._attach(model)

    # ------------------------------------------------------------------ construction

    def _resolve_source(self, model, source):
        weights = weight_layer_names(model)
        index = _named_index(model)
        if not isinstance(source, str):
            raise ValueError(f"source must be 'output', 'penultimate' or a module name, got {source!r}")
        if source == "output":
            if not weights:
                raise ValueError("the model has no Linear/Conv2d layer to train")
            return "output", "", index[weights[-1]]
        if source == "penultimate":
            if len(weights) < 3:
                raise ValueError(f"source='penultimate' needs at least 3 weight layers (found {weights}); "
                                 "name the source module instead")
            source = weights[-2]
        if source not in index or source == "":
            shown = ", ".join(repr(n) for n in list(index)[1:40])
            raise ValueError(f"source {source!r} is not a module of the model; use 'output', "
                             f"'penultimate' or one of: {shown}")
        return source, source, index[source]

    def _resolve_targets(self, model, targets, source_index):
        index = _named_index(model)
        src = "the output layer" if self.source == "output" else repr(self.source)
        if targets is None:
            names = [n for n in weight_layer_names(model) if index[injection_point(model, n)] < source_index]
            if not names:
                raise ValueError(f"no Linear/Conv2d layer comes before source {src}; "
                                 "choose a later source or pass targets=")
        else:
            names = [targets] if isinstance(targets, str) else list(targets)
            if not names:
                raise ValueError("targets is empty; pass module names or None for every layer before the source")
            for n in names:
                if not isinstance(n, str) or n not in index or n == "":
                    shown = ", ".join(repr(w) for w in weight_layer_names(model)[:20])
                    raise ValueError(f"target {n!r} is not a module of the model; the weight layers "
                                     f"are: {shown}")
                attn = attention_around(model, n)
                if attn is not None or isinstance(model.get_submodule(n), (nn.MultiheadAttention, nn.RNNBase)):
                    what = type(model.get_submodule(n)).__name__
                    why = (f"lies inside the attention module {attn!r}, whose projections run in one "
                           "attention call" if attn is not None else
                           f"is a {what} module, whose output is a tuple, not one activity tensor")
                    raise ValueError(f"target {n!r} {why}; direct feedback cannot inject there: name a "
                                     "module before or after it (it learns by rest_rule from the error "
                                     "reaching it)")
        points, seen = [], {}
        for n in names:
            p = injection_point(model, n)
            if index[p] >= source_index or n == self.source_point:
                raise ValueError(f"target {n!r} (error lands at {p!r}) does not come before source "
                                 f"{src}; targets must run before the source")
            if p in seen:
                raise ValueError(f"targets {seen[p]!r} and {n!r} both inject at {p!r}; keep one")
            seen[p] = n
            points.append((n, p))
        return points

    def _shapes(self, model, points, example_input, form):
        """Per-sample output shapes ``{point: shape, None: the source's}``: ``(n,)`` from a
        ``Linear``'s width, ``(C, None, None)`` (a map of unknown size) from a ``Conv2d``'s
        channels where a convolutional path may use them, else from a dry run on
        ``example_input``. A ``ValueError`` names what needs ``example_input``."""
        shapes = {}
        for t, p in points:
            n = _static_size(model, t, p)
            shapes[p] = (n,) if n is not None else _static_map(model, t, p) if form != "dense" else None
        if self.source == "output":
            last = model.get_submodule(weight_layer_names(model)[-1])
            shapes[None] = (last.out_features,) if isinstance(last, nn.Linear) else None
        else:
            m = model.get_submodule(self.source)
            shapes[None] = ((m.out_features,) if isinstance(m, nn.Linear) else
                            (m.out_channels, None, None) if isinstance(m, nn.Conv2d) and form != "dense"
                            else None)
        if example_input is None:
            # a dense path needs every size; a convolutional one only the channels of two maps
            src, missing, need_source = shapes[None], [], shapes[None] is None
            for t, p in points:
                sp = shapes[p]
                if sp is not None and src is not None and len(sp) == len(src) == 3 and form != "dense":
                    continue  # a convolutional path
                if form == "conv" and sp is not None and src is not None:
                    self._not_maps(t, p, sp, src)
                if sp is None or None in sp:
                    missing.append(p)
                need_source = need_source or None in src
            missing += [None] if need_source else []
            if missing:
                what = ", ".join("the source" if p is None else repr(p) for p in missing)
                raise ValueError(f"the size of {what} does not follow from Linear widths (a convolution "
                                 "or a reshaping module); pass example_input=<a sample batch>")
            return shapes
        seen = {}

        def record(key):
            def hook(module, args, output):
                if not isinstance(output, Tensor):
                    raise ValueError(f"{key or 'the model'!r} returns {type(output).__name__}, not a "
                                     "tensor; direct feedback needs a tensor there")
                seen[key] = tuple(output.shape[1:])
            return hook

        handles = [model.get_submodule(p).register_forward_hook(record(p)) for _, p in points]
        handles.append(model.get_submodule(self.source_point).register_forward_hook(record(None)))
        flags = {m: m.training for m in model.modules()}
        try:
            model.eval()
            with torch.no_grad():
                model(example_input)
        finally:
            for h in handles:
                h.remove()
            for m, t in flags.items():
                m.training = t
        for p in shapes:
            if p not in seen:
                raise ValueError(f"{'the source' if p is None else repr(p)} did not run on example_input")
        return seen

    def _not_maps(self, target, point, ht, src):
        where = (f"the source {self.source!r} gives {_shape_text(src)}" if len(src) != 3 else
                 f"target {target!r} (at {point!r}) gives {_shape_text(ht)}")
        raise ValueError(f"path='conv' needs (N, C, H, W) maps at the source and every target, but "
                         f"{where} per sample; use path='dense' or 'auto' (dense where an end is "
                         "not a map)")

    def _build_path(self, target, point, rank, shapes, form, factory):
        """A :class:`raftorch.direct_conv.ConvDirectPath` where ``form`` and the two ends'
        shapes (``(C, H, W)`` maps) say so, else a dense :class:`DirectPath`."""
        ht, src = shapes[point], shapes[None]
        maps = len(ht) == 3 and len(src) == 3
        if form == "conv" and not maps:
            self._not_maps(target, point, ht, src)
        if maps and form != "dense":
            return ConvDirectPath(target, point, self.rule, rank, ht[0], src[0], **factory)
        return DirectPath(target, point, self.rule, rank, math.prod(ht), math.prod(src), **factory)

    def _attach(self, model):
        # the handles register_forward_(pre_)hook returns: detach_from removes the hooks through them
        # (copy.deepcopy copies them with the model, pointing at the copy's hooks)
        self._handles = [model.register_forward_pre_hook(_ResetHook(self))]
        for path in self.paths:
            self._handles.append(
                model.get_submodule(path.point).register_forward_hook(_TargetHook(self, path.point)))
        self._handles.append(model.get_submodule(self.source_point).register_forward_hook(_SourceHook(self)))
        model.direct_feedback = self

    def detach_from(self, model: nn.Module) -> None:
        """Remove this object's hooks from ``model`` and the ``direct_feedback`` attribute."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if getattr(model, "direct_feedback", None) is self:
            delattr(model, "direct_feedback")

    # ------------------------------------------------------------------ forward hooks

    def _active(self) -> bool:
        return torch.is_grad_enabled()

    def _on_target(self, point: str, output):
        if not self._active():
            return None
        if not isinstance(output, Tensor):
            raise RuntimeError(f"direct feedback target {point!r} returned {type(output).__name__}; "
                               "it needs a tensor output")
        if point in self._stash:
            raise RuntimeError(f"direct feedback target {point!r} ran twice in one forward pass; "
                               "a module reused in the forward cannot be a target")
        self._stash[point] = output
        return output.detach()

    def _on_source(self, output):
        if not self._active():
            return None
        if not isinstance(output, Tensor):
            raise RuntimeError(f"the direct feedback source returned {type(output).__name__}, not a tensor")
        hs = []
        for path in self.paths:
            h = self._stash.pop(path.point, None)
            if h is None:
                raise RuntimeError(f"target {path.target!r} did not run before the source {self.source!r} "
                                   "in this forward pass; pass targets= with layers that run earlier")
            path.check_activity(h, output, self.source)
            hs.append(h)
        self._stash.clear()
        params = [p for path in self.paths for p in path.parameters()]
        return _DirectFeedbackFn.apply(self.plan, output, *hs, *params)

    def forward(self, input):
        """The identity. The object works through hooks; it is only called because an
        ``nn.Sequential`` calls every child, and there it sits last (after the output)."""
        return input

    def extra_repr(self) -> str:
        rank = f", rank={self.paths[0].rank}" if self.rule.low_rank else ""
        oja = f", oja={self.oja}" if self.oja is not None and self.oja != OjaOptions() else ""
        return f"rule={self.rule.name!r}{rank}, source={self.source!r}{oja}"


def convert_direct(model: nn.Module, rule: str, rank=None, *, source: str = "output", targets=None,
                   rest_rule: str = "bp", rest_rank=None, example_input=None, path: str = "auto",
                   inplace: bool = False, report: bool = False, **options):
    """``raftorch.convert(model, "dfa" | "draf", ...)``: convert every weight layer to
    ``rest_rule`` (default ``bp``; it only matters for layers after the source and for
    non-target layers before a target, since the targets' own weight update is exact) and
    attach a :class:`DirectFeedback` as ``model.direct_feedback``. Arguments as
    :class:`DirectFeedback` and :func:`raftorch.convert`."""
    if rest_rule in DIRECT_RULES:
        raise ValueError(f"rest_rule={rest_rule!r}: the layers outside the direct paths need a "
                         "layer-wise rule ('bp', 'fa', 'kp', 'fa-lowrank', 'raf-q', 'raf')")
    check_model(model)
    name = rest_rule.name if isinstance(rest_rule, Rule) else rest_rule.lower() if isinstance(rest_rule, str) else None
    if name in CONTROL_RULES:  # as raftorch.convert(model, "frozen"): every layer but the output frozen
        check_frozen_arguments({"rank": rest_rank})
        out = convert_frozen(model, inplace=inplace, report=report)
    else:
        out = convert_layers(model, rest_rule, rest_rank, inplace=inplace, report=report, stacklevel=3)
    model, result = out if report else (out, None)
    DirectFeedback(model, rule, rank, source=source, targets=targets,
                   example_input=example_input, path=path, **options)
    return (model, result) if report else model
