"""Alternative starting points of the learned feedback weights, for ablations.

The default (:func:`raftorch.layers.init_feedback_`) draws ``B`` and ``Q`` like a forward
weight and gives ``P`` random orthonormal rows. Two departures, each named explicitly by the
training tool's ``feedback_init_scale`` and ``feedback_init`` settings:

* :func:`scale_feedback_`: ``B`` and ``Q`` multiplied by a factor (``P`` keeps orthonormal rows).
* :func:`svd_feedback_`: the feedback matrix starts as the best rank-``r`` approximation of
  the forward weight's transpose, ``Q P = U_r S_r V_r^T`` (truncated SVD; ``P = V_r^T`` has
  orthonormal rows, as Oja's rule keeps them), and ``B = W^T`` for the full-rank rules. This is
  **weight transport at initialisation**: the feedback path reads the forward weights once. The
  paper draws its feedback at random; an SVD start is a choice of the authors' later code, so
  it is never a default and runs that use it say so in their configuration.

Both act on every layer-wise feedback path of a model: raftorch ``Linear``, ``Conv1d``,
``Conv2d`` and the q, k, v projections of :class:`raftorch.attention.MultiheadAttention`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["feedback_paths", "scale_feedback_", "svd_feedback_"]


def feedback_paths(model: nn.Module) -> list[tuple[str, nn.Module, Tensor]]:
    """``(name, owner, forward weight)`` of every layer-wise feedback path with learned or
    random feedback weights (``B`` or ``Q``/``P``) in ``model``; attention projections are
    named ``<attn>.q`` / ``.k`` / ``.v`` with their slice of the packed weight."""
    from raftorch.attention import MultiheadAttention
    from raftorch.layers import FeedbackLayer

    out = []
    for name, m in model.named_modules():
        if name == "direct_feedback" or name.startswith("direct_feedback."):
            continue
        if isinstance(m, FeedbackLayer) and m.rule.feedback_names:
            out.append((name, m, m.weight))
        elif isinstance(m, MultiheadAttention):
            for part, fb, weight in m.projection_feedback():
                if fb.rule.feedback_names:
                    out.append((f"{name}.{part}" if name else part, fb, weight))
    return out


@torch.no_grad()
def scale_feedback_(model: nn.Module, factor: float) -> int:
    """Multiply every feedback path's ``B`` or ``Q`` by ``factor``, in place; ``P`` is left
    orthonormal. Returns the number of paths changed."""
    paths = feedback_paths(model)
    for _, owner, _ in paths:
        for name in ("B", "Q"):
            t = getattr(owner, name, None)
            if isinstance(t, Tensor):
                t.mul_(factor)
    return len(paths)


@torch.no_grad()
def svd_feedback_(model: nn.Module) -> int:
    """Set every feedback path to the forward weight's transpose (``B = W^T``) or its best
    rank-``r`` approximation (``Q P``, truncated SVD, ``P`` with orthonormal rows), in place.
    Returns the number of paths set. Grouped convolutions are refused (their ``Q``, ``P``
    factor a block-diagonal kernel, not one matrix)."""
    from raftorch.attention import ProjectionFeedback

    paths = feedback_paths(model)
    for name, owner, weight in paths:
        if getattr(owner, "groups", 1) != 1:
            raise ValueError(f"feedback_init 'svd' does not support the grouped convolution {name!r}")
        W = weight.detach().double()
        if isinstance(owner, (nn.Conv1d, nn.Conv2d)):
            # feedback kernel K[o, c...] = sum_k P[k, o] Q[k, c...], K = W: W_flat = P^T Q_flat
            if hasattr(owner, "B"):
                owner.B.copy_(W)
                continue
            U, S, Vh = torch.linalg.svd(W.reshape(W.shape[0], -1), full_matrices=False)
            r = owner.P.shape[0]
            owner.P.copy_(U[:, :r].t())
            owner.Q.copy_((S[:r, None] * Vh[:r]).reshape(owner.Q.shape))
        elif isinstance(owner, (nn.Linear, ProjectionFeedback)):
            # B (in, out) = W^T; Q (in, r) P (r, out) = U_r S_r V_r^T of W^T
            if hasattr(owner, "B"):
                owner.B.copy_(W.t())
                continue
            U, S, Vh = torch.linalg.svd(W.t(), full_matrices=False)
            r = owner.P.shape[0]
            owner.Q.copy_(U[:, :r] * S[:r])
            owner.P.copy_(Vh[:r])
        else:  # a new feedback layer type must say how its factors map to its weight
            raise TypeError(f"feedback_init 'svd': no factorisation known for {type(owner).__name__} ({name!r})")
    return len(paths)
