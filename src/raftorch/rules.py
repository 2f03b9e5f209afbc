"""The learning rules: which feedback path a layer uses and which of its parts learn.

Every rule sends the error arriving at a layer's output, ``delta_{l+1}`` (``grad_output`` in
PyTorch), back to the layer's input through a feedback matrix ``B_l``
(``delta_l = B_l delta_{l+1}``, then the nonlinearity's own backward multiplies by ``f'``).
The weight update is the same for every rule: ``grad_W = delta_{l+1} h_l^T``. Only ``B_l``
differs (see docs/rules.md for the equations):

============  ====================  =================================================
rule          feedback ``B_l``      what learns in the feedback path
============  ====================  =================================================
bp            ``W_l^T``             nothing (weight transport; exact backprop)
fa            ``B`` fixed random    nothing (Lillicrap et al. 2016)
kp            ``B`` learned         ``grad_B = grad_W^T`` (Kolen-Pollack; with weight decay
                                    on both, ``B - W^T`` decays to 0)
fa-lowrank    ``Q P`` fixed random  nothing (the paper's Fig. 2c baseline)
raf-q         ``Q P``, ``P`` fixed  ``Q`` by the Kolen-Pollack-like rule
raf           ``Q P``               ``Q`` Kolen-Pollack-like, ``P`` Oja's subspace rule
============  ====================  =================================================

The direct rules ``dfa`` (fixed random ``B_l``) and ``draf`` (``B_l = Q_l P_l``, learned as in
``raf``) are not per-layer rules: they send the error of a *source* layer straight to earlier
target layers. They are listed in ``DIRECT_RULES`` and wired by :mod:`raftorch.direct`
(``raftorch.convert(model, "draf", rank, source=...)`` or ``raftorch.DirectFeedback``).

The control ``frozen`` (in ``CONTROL_RULES``) has no feedback at all: every hidden layer stays
at its initialisation and only the output layer learns, so its accuracy is that of a linear
head trained on the initial net's random features: the baseline a feedback rule has to beat.
It is not a per-layer rule either; :mod:`raftorch.control` applies it
(``raftorch.convert(model, "frozen")``).

The arithmetic of each path lives in :mod:`raftorch.functional`; this module only names the
rules and validates ranks.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """One learning rule.

    ``path`` is the feedback path: ``"transpose"`` (``B = W^T``), ``"full"`` (a full-rank
    ``B``), ``"lowrank"`` (``B = Q P``) or ``"none"`` (no error reaches the hidden layers: the
    control ``frozen``). ``learns`` names the feedback parameters that
    receive a local update in ``.grad``; the others are fixed (``requires_grad=False``).
    """

    name: str
    path: str
    learns: tuple[str, ...]
    summary: str

    @property
    def low_rank(self) -> bool:
        return self.path == "lowrank"

    @property
    def feedback_names(self) -> tuple[str, ...]:
        return {"transpose": (), "full": ("B",), "lowrank": ("Q", "P"), "none": ()}[self.path]


RULES: dict[str, Rule] = {
    r.name: r
    for r in [
        Rule("bp", "transpose", (), "backpropagation: B = W^T"),
        Rule("fa", "full", (), "feedback alignment: fixed random full-rank B"),
        Rule("kp", "full", ("B",), "Kolen-Pollack: B learns with grad_B = grad_W^T"),
        Rule("fa-lowrank", "lowrank", (), "fixed random low-rank B = Q P"),
        Rule("raf-q", "lowrank", ("Q",), "B = Q P, Q Kolen-Pollack-like, P fixed"),
        Rule("raf", "lowrank", ("Q", "P"), "B = Q P, Q Kolen-Pollack-like, P Oja subspace rule"),
    ]
}


# Direct rules: the same description, for the paths of raftorch.direct.DirectFeedback.
DIRECT_RULES: dict[str, Rule] = {
    "dfa": Rule("dfa", "full", (), "direct feedback alignment: fixed random B from the source"),
    "draf": Rule("draf", "lowrank", ("Q", "P"),
                 "direct RAF: B = Q P from the source, Q Kolen-Pollack-like, P Oja on e_s"),
}


# Controls: no feedback path; applied to a whole model by raftorch.control.convert_frozen.
CONTROL_RULES: dict[str, Rule] = {
    "frozen": Rule("frozen", "none", (),
                   "no feedback: hidden layers frozen at initialisation, only the output layer learns"),
}


def get_rule(rule: str | Rule) -> Rule:
    """Look a rule up by name (a per-layer rule or the control ``frozen``); raise
    ``ValueError`` listing the valid names otherwise."""
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, str) and rule.lower() in RULES:
        return RULES[rule.lower()]
    if isinstance(rule, str) and rule.lower() in CONTROL_RULES:
        return CONTROL_RULES[rule.lower()]
    extra = ""
    if isinstance(rule, str) and rule.lower() in DIRECT_RULES:
        extra = (
            " Direct rules send the error of a source layer straight to earlier layers; "
            "they are not per-layer rules: use raftorch.convert(model, "
            f"{rule.lower()!r}, ..., source='output') or raftorch.DirectFeedback."
        )
    raise ValueError(
        f"unknown rule {rule!r}; choose one of {', '.join(repr(n) for n in RULES)}, or a direct rule "
        f"({', '.join(repr(n) for n in DIRECT_RULES)}), or the no-feedback control "
        f"{', '.join(repr(n) for n in CONTROL_RULES)} (hidden layers frozen, only the output layer "
        f"learns).{extra}"
    )


def check_rank(rule: Rule, rank, limit: int, *, layer: str = "layer") -> int | None:
    """Validate ``rank`` for ``rule`` and clamp it to ``limit``.

    Full-rank rules take no rank (``None``); low-rank rules need a positive integer, which is
    clamped to ``limit`` (``min(in, out)`` for a Linear): a feedback path cannot carry more
    independent directions than that. ``rank="full"`` means ``limit``. The control ``frozen``
    has no layer form: a layer built with it raises here.
    """
    if rule.path == "none":
        raise ValueError(
            f"rule {rule.name!r} is not a per-layer rule: it freezes every layer but the output "
            f"layer of a whole model; use raftorch.convert(model, {rule.name!r})"
        )
    if not rule.low_rank:
        if rank is not None:
            raise ValueError(
                f"rule {rule.name!r} uses full-rank feedback and takes no rank (got rank={rank!r}); "
                f"use a low-rank rule ('fa-lowrank', 'raf-q', 'raf') to limit the rank"
            )
        return None
    if rank == "full":
        return int(limit)
    if rank is None:
        raise ValueError(
            f"rule {rule.name!r} needs a rank: pass rank=r, a positive integer "
            f"(the paper uses r about the number of classes, e.g. rank=10 for CIFAR-10)"
        )
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise ValueError(f"rank must be a positive integer or 'full', got {rank!r} for {layer}")
    if rank <= 0:
        raise ValueError(f"rank must be a positive integer (>= 1), got {rank} for {layer}")
    return int(min(rank, limit))
