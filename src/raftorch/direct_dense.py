r"""The dense direct-feedback path :class:`DirectPath`: the feedback from a ``dfa`` / ``draf``
source to one target over the flattened per-sample activity, and the base of the per-pixel
:class:`raftorch.direct_conv.ConvDirectPath`. :class:`raftorch.direct.DirectFeedback` builds
these paths and runs their backward (equations in :mod:`raftorch.direct`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from raftorch.layers import init_feedback_
from raftorch.rules import Rule, check_rank

__all__ = ["DirectPath"]


class DirectPath(nn.Module):
    r"""The feedback from the source to one target: ``B`` ``(n_target, d_source)`` (``dfa``,
    fixed) or ``Q`` ``(n_target, r)`` and ``P`` ``(r, d_source)`` (``draf``, both learned).

    Initialisation, as for a layer-wise feedback path whose virtual forward map goes from
    the target's ``n_target`` units to the source's ``d_source`` (fan-in ``n_target``):
    :func:`raftorch.layers.init_feedback_`.

    The activity and the error are flattened per sample (for convolutional ends see
    :class:`raftorch.direct_conv.ConvDirectPath`, the per-pixel form).
    """

    conv = False  # the dense form: B over the flattened per-sample activity

    def __init__(self, target: str, point: str, rule: Rule, rank, n_target: int, d_source: int,
                 *, device=None, dtype=None):
        super().__init__()
        self.n_target, self.d_source = int(n_target), int(d_source)
        if min(self.n_target, self.d_source) < 1:
            raise ValueError(f"target {target!r}: a direct path needs at least one target unit and one "
                             f"source value per sample, got {self.n_target} and {self.d_source}")
        self._make_feedback(target, point, rule, check_rank(rule, rank, min(n_target, d_source),
                                                             layer=f"target {target!r}"),
                            (self.n_target, self.d_source), device, dtype)

    def _make_feedback(self, target: str, point: str, rule: Rule, rank: int | None, sides: tuple[int, int],
                       device, dtype) -> None:
        """Register ``B`` or ``Q``, ``P`` for a feedback matrix of shape ``sides`` = (target
        side, source side) and draw them (shared with the per-pixel form)."""
        self.target, self.point, self.rule, self.rank = target, point, rule, rank
        self._sides = sides
        factory = {"device": device, "dtype": dtype}
        for name, shape in self.feedback_shapes().items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory),
                                                       requires_grad=name in rule.learns))
        self.reset_feedback()

    def feedback_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the feedback parameters: ``Q`` ``(rows, rank)`` and ``P`` ``(rank, cols)`` for a
        low-rank rule, else ``B`` ``(rows, cols)``, with ``(rows, cols)`` the (target side, source side) sizes."""
        rows, cols = self._sides
        if self.rule.low_rank:
            return {"Q": (rows, self.rank), "P": (self.rank, cols)}
        return {"B": (rows, cols)}

    @torch.no_grad()
    def reset_feedback(self) -> None:
        """Draw new random feedback weights (see the class docstring)."""
        init_feedback_(self, self._sides[0])

    @torch.no_grad()
    def feedback_matrix(self) -> Tensor:
        """The effective ``B_l`` ``(n_target, d_source)``: ``B`` or ``Q P``."""
        return self.Q @ self.P if self.rule.low_rank else self.B.detach().clone()

    def check_activity(self, h: Tensor, source: Tensor, source_name: str) -> None:
        """A ``RuntimeError`` unless ``h`` and ``source`` have the sizes this path was built for."""
        if h.shape[0] != source.shape[0] or h.shape[1:].numel() != self.n_target:
            raise RuntimeError(
                f"target {self.target!r}: expected activity (N={source.shape[0]}, {self.n_target} "
                f"per sample), got {tuple(h.shape)}; build DirectFeedback with example_input=")
        if source.shape[1:].numel() != self.d_source:
            raise RuntimeError(f"source {source_name!r}: expected {self.d_source} values per sample, "
                               f"got {tuple(source.shape)}; build DirectFeedback with example_input=")

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{k}={tuple(s)}" for k, s in self.feedback_shapes().items())
        return f"target={self.target!r}, at={self.point!r}, {shapes}"
