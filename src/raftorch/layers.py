"""Drop-in ``Linear`` and ``Conv2d`` layers that learn with a chosen feedback rule.

They subclass ``torch.nn.Linear`` / ``torch.nn.Conv2d``: the forward pass, the ``weight`` and
``bias`` parameters, ``state_dict`` keys, ``.to()``, ``deepcopy`` and optimizers are those of
PyTorch. Only the backward pass changes (:mod:`raftorch.functional`), and the feedback weights
are ordinary ``nn.Parameter``s (``B`` or ``Q``, ``P``); fixed ones have
``requires_grad=False``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from raftorch import functional as RF
from raftorch.rules import DIRECT_RULES, Rule, check_rank, get_rule

# layer option -> OjaOptions field
OJA_OPTIONS = {"oja_source": "source", "oja_center": "center", "oja_scale": "scale", "oja_reduce": "reduce",
               "oja_ddof": "ddof"}
OPTIONS = tuple(OJA_OPTIONS) + ("error_clamp",)
# a direct path's options: no oja_source (the targets are for a layer-wise output layer)
DIRECT_OPTIONS = tuple(k for k in OPTIONS if k != "oja_source")


def parse_options(rule: Rule, options: dict) -> tuple[RF.OjaOptions | None, float | None]:
    """The layer options of a feedback path (a layer, an attention projection, a direct path)
    checked against ``rule``: ``(oja, error_clamp)``, ``oja`` ``None`` unless the rule learns
    ``P``. A ``ValueError`` names an unknown option, Oja options for a rule without a learned
    ``P``, or ``error_clamp`` with ``bp``. A direct rule (``dfa``, ``draf``) takes
    :data:`DIRECT_OPTIONS`, the others :data:`OPTIONS`."""
    options = dict(options)
    error_clamp = RF.check_error_clamp(options.pop("error_clamp", None))
    if error_clamp is not None and rule.path == "transpose":
        raise ValueError("error_clamp changes the error sent down, so rule 'bp' would no longer be "
                         "backprop; use it with a feedback rule")
    direct = rule.name in DIRECT_RULES
    valid = DIRECT_OPTIONS if direct else OPTIONS
    unknown = sorted(set(options) - set(valid))
    if unknown and direct:
        raise ValueError(f"unknown option(s) {unknown} for direct feedback; valid: {list(valid)}"
                         + (" (oja_source='target' is for a layer-wise output layer only)"
                            if "oja_source" in unknown else ""))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; valid options are {list(valid)}")
    if options and "P" not in rule.learns and direct:
        raise ValueError(f"options {sorted(options)} set how P learns; rule {rule.name!r} has no P (use 'draf')")
    if options and "P" not in rule.learns:
        raise ValueError(
            f"options {sorted(options)} set how P learns (Oja's rule), but rule {rule.name!r} "
            "does not learn P; use rule='raf' or drop them"
        )
    if "P" not in rule.learns:
        return None, error_clamp
    return RF.OjaOptions(**{OJA_OPTIONS[k]: v for k, v in options.items()}), error_clamp


@torch.no_grad()
def init_feedback_(module: nn.Module, fan_in: int) -> None:
    """Draw the feedback weights ``B``, ``Q``, ``P`` that ``module`` has, in place.

    ``B`` and ``Q`` are drawn like a forward weight with this fan-in,
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; ``P`` gets random orthonormal rows (Oja's rule
    keeps them orthonormal). ``Q`` on the forward weight's scale matters with Adam, which
    moves every entry by about the learning rate per step: a larger random ``Q`` takes
    correspondingly longer to be overwritten by its Kolen-Pollack-like updates (on
    Fashion-MNIST, MLP 4 x 512, r = 10, 2 epochs: 74.9% test accuracy with ``Q`` scaled so that
    ``Q P`` matched ``fa``'s ``B`` in entry variance, 83.7% with ``Q`` ten times smaller,
    85.3% for BP).
    """
    for name in ("B", "Q"):
        if getattr(module, name, None) is not None:
            bound = 1.0 / math.sqrt(fan_in)
            getattr(module, name).uniform_(-bound, bound)
    if getattr(module, "P", None) is not None:
        P = module.P
        if P.dtype in (torch.float16, torch.bfloat16):  # no QR in half precision on the CPU
            P.copy_(nn.init.orthogonal_(torch.empty(P.shape, device=P.device)))
        else:
            nn.init.orthogonal_(P)


def require_features(layer: str, rule, **sizes: int) -> None:
    """A ``ValueError`` if a feedback rule is asked of a layer with no inputs or no outputs.

    ``torch.nn.Linear`` / ``Conv*d`` accept 0 features (an empty weight). With ``rule="bp"`` a
    raftorch layer is that module and accepts them too; a feedback rule is refused: there is
    no error to send down (or none arriving), a rank would be 0 and the feedback weights'
    scale ``1/sqrt(fan_in)`` undefined, so a clear message beats a zero-size path that cannot
    learn anything."""
    if get_rule(rule).path == "transpose":
        return
    for name, n in sizes.items():
        if n == 0:
            shown = ", ".join(f"{k}={v}" for k, v in sizes.items())
            raise ValueError(
                f"raftorch.{layer}({shown}) with rule {get_rule(rule).name!r}: {name} must be at least "
                f"1 for a feedback rule (a layer without inputs or outputs has no error to feed back); "
                f"rule='bp' accepts 0, as torch.nn.{layer} does")


class FeedbackLayer:
    """What ``raftorch.Linear`` and ``raftorch.Conv2d`` share: the rule, the rank, the
    feedback parameters and their initialisation.

    Initialisation: see :func:`init_feedback_`.
    """

    rule: Rule
    rank: int | None
    oja: RF.OjaOptions | None

    def _setup_feedback(self, rule, rank, rank_limit: int, options: dict) -> None:
        self.rule = get_rule(rule)
        self.rank = check_rank(self.rule, rank, rank_limit, layer=type(self).__name__)
        self.oja, self.error_clamp = parse_options(self.rule, options)
        # the factor the current backward's loss was multiplied by (raftorch.loss_scale)
        self.scale_slot = RF.LossScale() if self.oja is not None else None
        if self.oja is not None and self.oja.source == "target":
            if not isinstance(self, nn.Linear):
                raise ValueError("oja_source='target' is only meaningful for a Linear output layer")
            self.target_slot = RF.TargetSlot(f"{type(self).__name__}({self.extra_repr()})")
        else:
            self.target_slot = None
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        for name, shape in self._feedback_shapes().items():
            p = nn.Parameter(torch.empty(shape, **factory), requires_grad=name in self.rule.learns)
            self.register_parameter(name, p)
        self.reset_feedback()

    # subclasses say how big their feedback weights are and how they enter the math
    def _feedback_shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def _fan_in(self) -> int:
        return math.prod(self.weight.shape[1:])  # weight[0].numel(), also with 0 outputs (bp)

    def reset_feedback(self) -> None:
        """Draw new random feedback weights (:func:`init_feedback_`)."""
        init_feedback_(self, self._fan_in())

    def feedback_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the feedback parameters (empty for ``bp``)."""
        return {n: tuple(getattr(self, n).shape) for n in self.rule.feedback_names}

    def extra_repr(self) -> str:
        """The torch layer's summary followed by ``rule=`` and, where set, ``rank=``, ``oja=`` (options other
        than the defaults) and ``error_clamp=``: what ``print(model)`` shows."""
        base = super().extra_repr()
        rank = f", rank={self.rank}" if self.rank is not None else ""
        oja = ""
        if self.oja is not None and self.oja != RF.OjaOptions():
            oja = f", oja={self.oja}"
        if self.error_clamp is not None:
            oja += f", error_clamp={self.error_clamp:g}"
        return f"{base}, rule={self.rule.name!r}{rank}{oja}"


class Linear(FeedbackLayer, nn.Linear):
    r"""``y = x W^T + b``, trained with the feedback rule ``rule``.

    Args:
        in_features, out_features, bias: as ``torch.nn.Linear``; 0 features only with
            ``rule="bp"`` (a feedback rule raises a ``ValueError``: :func:`require_features`).
        rule: ``"bp"``, ``"fa"``, ``"kp"``, ``"fa-lowrank"``, ``"raf-q"`` or ``"raf"``
            (see :mod:`raftorch.rules`).
        rank: rank ``r`` of the feedback path for the low-rank rules, clamped to
            ``min(in_features, out_features)``.
        **options: Oja options for ``rule="raf"``: ``oja_source``, ``oja_center``,
            ``oja_scale``, ``oja_reduce``, ``oja_ddof`` (see
            :class:`raftorch.functional.OjaOptions`); and, for every rule but ``bp``,
            ``error_clamp=c`` (clamp the input gradient this layer sends down to ``[-c, c]``,
            the authors' backward hook; default ``None``).

    ``rule="bp"`` runs ``nn.Linear.forward`` itself (plain autograd), so it equals
    ``nn.Linear`` exactly, second derivatives (``create_graph=True``) included. The feedback
    rules raise under ``create_graph=True``: a feedback rule has no second derivative.

    Feedback parameters: ``B`` ``(in_features, out_features)`` for ``fa``/``kp``;
    ``Q`` ``(in_features, r)`` and ``P`` ``(r, out_features)`` for the low-rank rules.

    Shape: input ``(*, in_features)`` (token tensors ``(N, T, D)`` included), output
    ``(*, out_features)``. Backward: ``grad_input = grad_output B^T`` with ``B = W^T``,
    ``B`` or ``Q P``; ``grad_W`` is always the exact ``grad_output^T input``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 rule: str = "raf", rank: int | None = None, device=None, dtype=None, **options):
        require_features("Linear", rule, in_features=in_features, out_features=out_features)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup_feedback(rule, rank, min(in_features, out_features), options)

    def _feedback_shapes(self):
        if self.rule.path == "full":
            return {"B": (self.in_features, self.out_features)}
        if self.rule.path == "lowrank":
            return {"Q": (self.in_features, self.rank), "P": (self.rank, self.out_features)}
        return {}

    def forward(self, input: Tensor) -> Tensor:
        path = self.rule.path
        if path == "lowrank":
            return RF.linear_lowrank(input, self.weight, self.bias, self.Q, self.P, self.oja,
                                     self.target_slot, self.scale_slot, self.error_clamp)
        if path == "transpose":  # bp: exactly nn.Linear (double backward included)
            return nn.Linear.forward(self, input)
        return RF.LinearFullFeedback.apply(input, self.weight, self.bias, self.B, self.error_clamp)

    @torch.no_grad()
    def feedback_matrix(self) -> Tensor:
        """The effective feedback matrix ``B`` ``(in_features, out_features)``:
        ``W^T`` for bp, ``B`` for fa/kp, ``Q P`` for the low-rank rules."""
        if self.rule.path == "lowrank":
            return self.Q @ self.P
        if self.rule.path == "full":
            return self.B.detach().clone()
        return self.weight.t().clone()

    @torch.no_grad()
    def weight_transpose(self) -> Tensor:
        """``W^T`` in the layout of :meth:`feedback_matrix` (what backprop would use)."""
        return self.weight.t().clone()


def _require_zero_padding(layer: str, padding_mode: str) -> None:
    if padding_mode != "zeros":
        raise ValueError(
            f"raftorch.{layer} supports padding_mode='zeros' only, got {padding_mode!r}; "
            "pad the input explicitly (F.pad) before a zero-padded convolution"
        )


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class Conv2d(FeedbackLayer, nn.Conv2d):
    r"""2-d convolution trained with the feedback rule ``rule``.

    Arguments as ``torch.nn.Conv2d`` (stride, padding, dilation and groups all supported;
    ``padding_mode="zeros"`` only; 0 channels only with ``rule="bp"``), plus ``rule``,
    ``rank`` and ``**options`` as :class:`Linear`. The rank counts **channels** of the error
    map and is clamped to ``min(out_channels, in_channels * kH * kW)``.

    Feedback parameters: ``B`` with the weight's shape ``(C_out, C_in / groups, kH, kW)``
    for ``fa``/``kp``, used like the transpose of the forward convolution;
    ``Q`` ``(r, C_in / groups, kH, kW)`` (a transposed convolution with the forward
    stride, padding, dilation and groups) and ``P`` ``(r, C_out)`` (a 1x1 convolution) for the
    low-rank rules.

    Groups: ``P`` mixes all output channels into the ``r`` error channels; the ``r`` channels
    are then split evenly between the groups, group ``j`` of the input receiving the
    ``r / groups`` channels ``j r/groups ... (j+1) r/groups - 1`` through its slice of ``Q``.
    So the rank must be a multiple of ``groups``.

    Shape: input ``(N, C_in, H, W)``, output ``(N, C_out, H_out, W_out)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 rule: str = "raf", rank: int | None = None, device=None, dtype=None, **options):
        require_features("Conv2d", rule, in_channels=in_channels, out_channels=out_channels)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device=device, dtype=dtype)
        _require_zero_padding("Conv2d", padding_mode)
        self.geometry = RF.ConvGeometry(
            _pair(self.stride), self._explicit_padding(), _pair(self.dilation), groups
        )
        kh, kw = self.kernel_size
        limit = min(out_channels, in_channels * kh * kw)
        self._setup_feedback(rule, rank, limit, options)
        if self.rank is not None and self.rank % groups:
            raise ValueError(
                f"rank {self.rank} does not fit groups={groups}: the error channels are split "
                f"evenly between groups, so the rank must be a multiple of {groups}"
            )

    def _explicit_padding(self) -> tuple[int, int]:
        if self.padding == "valid":
            return (0, 0)
        if self.padding == "same":
            pads = []
            for d, k in zip(_pair(self.dilation), self.kernel_size):
                total = d * (k - 1)
                if total % 2:
                    raise ValueError(
                        "padding='same' with an even kernel needs asymmetric padding, which "
                        "raftorch.Conv2d does not support; pad explicitly instead"
                    )
                pads.append(total // 2)
            return tuple(pads)
        return _pair(self.padding)

    def _feedback_shapes(self):
        if self.rule.path == "full":
            return {"B": tuple(self.weight.shape)}
        if self.rule.path == "lowrank":
            r = self.rank
            return {"Q": (r, self.in_channels // self.groups, *self.kernel_size),
                    "P": (r, self.out_channels)}
        return {}

    def forward(self, input: Tensor) -> Tensor:
        path = self.rule.path
        if path == "lowrank":
            return RF.Conv2dLowRankFeedback.apply(
                input, self.weight, self.bias, self.Q, self.P, self.geometry, self.oja,
                self.scale_slot, self.error_clamp
            )
        if path == "transpose":  # bp: exactly nn.Conv2d (double backward included)
            return nn.Conv2d.forward(self, input)
        return RF.Conv2dFullFeedback.apply(input, self.weight, self.bias, self.B, self.geometry,
                                           self.error_clamp)

    def _dense(self, kernel: Tensor) -> Tensor:
        """A grouped kernel ``(C_out, C_in/g, kH, kW)`` as its dense equivalent
        ``(C_out, C_in, kH, kW)`` (zeros between groups)."""
        g = self.groups
        if g == 1:
            return kernel.detach().clone()
        co, ci = self.out_channels // g, self.in_channels // g
        dense = kernel.new_zeros(self.out_channels, self.in_channels, *kernel.shape[2:])
        for j in range(g):
            dense[j * co:(j + 1) * co, j * ci:(j + 1) * ci] = kernel[j * co:(j + 1) * co]
        return dense

    @torch.no_grad()
    def feedback_matrix(self) -> Tensor:
        """The effective feedback kernel ``K`` ``(C_out, C_in, kH, kW)`` (dense over groups):
        the error sent down is ``conv_transpose2d(grad_output, K)`` with the forward
        geometry. ``W`` for bp, ``B`` for fa/kp, ``sum_k P[k, o] Q[k, c]`` for low rank."""
        if self.rule.path != "lowrank":
            return self._dense(self.B if self.rule.path == "full" else self.weight)
        g, r = self.groups, self.rank
        rg, ci = r // g, self.in_channels // g
        P = self.P.view(g, rg, self.out_channels)
        Q = self.Q.view(g, rg, ci, *self.kernel_size)
        blocks = torch.einsum("gko,gkchw->gochw", P, Q)  # (g, C_out, C_in/g, kH, kW)
        return torch.cat(list(blocks), dim=1)

    @torch.no_grad()
    def weight_transpose(self) -> Tensor:
        """The weight in the layout of :meth:`feedback_matrix` (what backprop would use)."""
        return self._dense(self.weight)


class Conv1d(FeedbackLayer, nn.Conv1d):
    r"""1-d convolution (sequence models) trained with the feedback rule ``rule``.

    Arguments as ``torch.nn.Conv1d`` (stride, padding, dilation, groups;
    ``padding_mode="zeros"`` only; 0 channels only with ``rule="bp"``), plus ``rule``,
    ``rank`` and ``**options`` as :class:`Conv2d`, of which it is the unit-height case: the
    input ``(N, C_in, L)`` is viewed as ``(N, C_in, 1, L)`` and the weight ``(C_out, C_in / g, k)``
    as ``(C_out, C_in / g, 1, k)``,
    so the forward output equals ``torch.nn.Conv1d``'s bit for bit (tested) and the backward
    is :class:`Conv2d`'s (Oja over batch and positions). Feedback parameters have the weight's
    1-d layout: ``B`` ``(C_out, C_in / g, k)``; ``Q`` ``(r, C_in / g, k)``, ``P`` ``(r, C_out)``.
    The rank is clamped to ``min(C_out, C_in k)`` and must be a multiple of ``groups``.

    Shape: input ``(N, C_in, L)``, output ``(N, C_out, L_out)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 rule: str = "raf", rank: int | None = None, device=None, dtype=None, **options):
        require_features("Conv1d", rule, in_channels=in_channels, out_channels=out_channels)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device=device, dtype=dtype)
        _require_zero_padding("Conv1d", padding_mode)
        (k,), (d,) = self.kernel_size, self.dilation
        if self.padding == "same":
            if d * (k - 1) % 2:
                raise ValueError("padding='same' with an even kernel needs asymmetric padding, which "
                                 "raftorch.Conv1d does not support; pad explicitly instead")
            pad = d * (k - 1) // 2
        else:
            pad = 0 if self.padding == "valid" else self.padding[0]
        self.geometry = RF.ConvGeometry((1, self.stride[0]), (0, pad), (1, d), groups)
        self._setup_feedback(rule, rank, min(out_channels, in_channels * k), options)
        if self.rank is not None and self.rank % groups:
            raise ValueError(
                f"rank {self.rank} does not fit groups={groups}: the error channels are split "
                f"evenly between groups, so the rank must be a multiple of {groups}"
            )

    _feedback_shapes = Conv2d._feedback_shapes
    _dense = Conv2d._dense
    weight_transpose = Conv2d.weight_transpose

    @torch.no_grad()
    def feedback_matrix(self) -> Tensor:
        """The effective feedback kernel ``K`` ``(C_out, C_in, k)`` (dense over groups), as
        :meth:`Conv2d.feedback_matrix`."""
        if self.rule.path != "lowrank":
            return self._dense(self.B if self.rule.path == "full" else self.weight)
        g, rg = self.groups, self.rank // self.groups
        P = self.P.view(g, rg, self.out_channels)
        Q = self.Q.view(g, rg, self.in_channels // g, *self.kernel_size)
        return torch.cat(list(torch.einsum("gko,gkcl->gocl", P, Q)), dim=1)

    def forward(self, input: Tensor) -> Tensor:
        if self.rule.path == "transpose":  # bp: exactly nn.Conv1d (double backward included)
            return nn.Conv1d.forward(self, input)
        x, w = input.unsqueeze(-2), self.weight.unsqueeze(2)
        if self.rule.path == "lowrank":
            out = RF.Conv2dLowRankFeedback.apply(
                x, w, self.bias, self.Q.unsqueeze(2), self.P, self.geometry, self.oja,
                self.scale_slot, self.error_clamp)
        else:
            out = RF.Conv2dFullFeedback.apply(x, w, self.bias, self.B.unsqueeze(2), self.geometry,
                                              self.error_clamp)
        return out.squeeze(-2)
