"""The five learning rules of the linear theory, written out once: discrete step and flow.

Network ``y_hat = W2 W1 x``; ``W1`` is ``(n_hidden, n_in)``, ``W2`` is ``(n_out, n_hidden)``.
The feedback matrix ``B`` (``(n_hidden, n_out)``) carries the output error to the hidden
layer in place of ``W2^T``; ``r`` is its rank, ``Q`` is ``(n_hidden, r)``, ``P`` is ``(r, n_out)``.

====================  =====================  ==========================================
rule                  feedback ``B``         what else learns
====================  =====================  ==========================================
``bp``                ``W2^T``               nothing
``fa``                fixed random, full     nothing
``fa-lowrank``        ``Q P``, both fixed    nothing (the paper's Fig. 2c baseline)
``raf-q``             ``Q P``, ``P`` fixed   ``Q`` (Kolen-Pollack-like)
``raf``               ``Q P``                ``Q`` (Kolen-Pollack-like), ``P`` (Oja on targets)
====================  =====================  ==========================================

**Discrete step** (``simulate``; a batch ``X_b (n_in, b)``, ``Y_b (n_out, b)``, learning
rate ``eta``, all updates computed from the weights before the step)::

    e     = W2 W1 X_b - Y_b                      # (n_out, b), dLoss/dy_hat, loss = |e|^2 / (2b)
    W2   -= eta * e (W1 X_b)^T / b
    W1   -= eta * (B e) X_b^T / b
    Q    -= eta * ((W1 X_b)(P e)^T / b + lambda Q)                  # raf-q, raf
    P    += eta * ((P Y_b) Y_b^T - (P Y_b)(P Y_b)^T P) / b           # raf (Oja on targets)

``lambda`` (``weight_decay``) multiplies ``eta`` like ``torch.optim.SGD``'s weight decay, so the
flow below has ``- lambda Q`` with the same ``lambda``. The targets are zero-mean by
construction, so Oja runs on them uncentred.

**Flow** (``integrate``; full batch, ``eta -> 0``, time ``t = step * eta``, i.e. the paper's
``tau = 1/eta`` with ``t`` measured in units of ``tau``; ``E = Sigma_yx - W2 W1`` with
``Sigma_xx = I``)::

    dW1/dt = B E
    dW2/dt = E W1^T
    dQ/dt  = W1 E^T P^T - lambda Q                                   # raf-q, raf
    dP/dt  = P Sigma_yy (I - P^T P)                                  # raf

Rotating to the SVD basis ``Sigma_yx = U S V^T`` (full square ``U``, ``V``):
``W1' = W1 V``, ``W2' = U^T W2``, ``P' = P U``, fixed ``B' = B U`` (fa) and ``Q`` unrotated
give the same equations with ``Sigma_yx -> S`` (rectangular diagonal) and
``Sigma_yy -> U^T Sigma_yy U``. The mode strengths are ``diag(U^T W2 W1 V)``.

Fixed point of ``W1``: ``B E = 0``. For ``B = Q P`` with ``Q`` of full column rank this is
``P E = 0``: only the ``r`` directions of the error that ``P`` sees are driven to zero. With
``P`` fixed at random (``fa-lowrank``, ``raf-q``) and ``r < d`` those are the wrong ones; Oja
turns the rows of ``P`` into a basis of the top-``r`` principal subspace of the targets, which
(for ``Sigma_xx = I``) is the span of the top-``r`` modes, so ``raf`` learns those exactly.
With ``P`` fixed, ``W1`` only grows inside ``span(Q)`` and ``W2 W1`` stops at
``Sigma_yx Pi``, ``Pi`` the projector on the row space of ``P Sigma_yx`` (whatever ``Q`` does).

These are fixed points of the small-initialisation regime (Saxe et al.): ``W1``'s initial
part outside the feedback's reach is tiny. It is not zero, and ``W2`` alone can solve a
linear task, so through it ``W2`` slowly learns the rest; the wrong solution of
``fa-lowrank`` is then a plateau whose length grows as ``init_scale`` shrinks (measured on the
default task: with ``init_scale = 0.1`` fa-lowrank r=3 reaches BP's error by ``t = 40``; with
``1e-3`` it stays at the plateau far beyond ``t = 60``).

**Initial weights** (``init_weights``): ``W1``, ``W2`` entries ``N(0, init_scale^2)`` (small:
the Saxe et al. regime); ``B`` (fa) and ``Q`` entries ``N(0, 1/n_hidden)``, so their singular
values are about 1; ``P`` random with orthonormal rows (an orthonormal start stays
orthonormal under Oja's flow).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from raftorch.theory.task import LinearTask, random_orthonormal

RULES = ("bp", "fa", "fa-lowrank", "raf-q", "raf")
LOW_RANK_RULES = ("fa-lowrank", "raf-q", "raf")


@dataclass
class Weights:
    """All weights of the linear network (numpy float64, shapes as in the module docstring).

    ``B`` is set only for ``fa``; ``Q`` and ``P`` only for the low-rank rules.
    """

    W1: np.ndarray
    W2: np.ndarray
    B: np.ndarray | None = None
    Q: np.ndarray | None = None
    P: np.ndarray | None = None

    def copy(self) -> "Weights":
        """A copy with every array copied (``None`` stays ``None``)."""
        return replace(self, **{k: (None if v is None else v.copy()) for k, v in self.__dict__.items()})

    def feedback(self) -> np.ndarray:
        """The feedback matrix ``B`` that carries the output error to the hidden layer."""
        if self.Q is not None:
            return self.Q @ self.P
        return self.W2.T if self.B is None else self.B


def check_rule(rule: str) -> str:
    """``rule`` if it is one of :data:`RULES`, else a ``ValueError`` that lists them."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    return rule


def check_rank(task: LinearTask, rule: str, rank: int | None) -> int | None:
    """Validate ``rank`` for ``rule`` on ``task``; returns it (``None`` for bp and fa)."""
    check_rule(rule)
    if rule not in LOW_RANK_RULES:
        if rank is not None:
            raise ValueError(
                f"rule {rule!r} has a full-rank feedback and takes no rank (got rank={rank}); "
                f"pass rank=None, or use one of {', '.join(LOW_RANK_RULES)} for a rank-r feedback"
            )
        return None
    if rank is None:
        raise ValueError(f"rule {rule!r} needs the feedback rank r; pass e.g. rank=3 (1 <= r <= n_out)")
    if isinstance(rank, bool) or int(rank) != rank or rank <= 0:
        raise ValueError(
            f"rank must be a positive integer (the number of error dimensions fed back), got rank={rank!r}; "
            "use rank >= 1"
        )
    limit = min(task.n_out, task.n_hidden)
    if rank > limit:
        raise ValueError(
            f"rank={rank} is larger than min(n_out, n_hidden)={limit}: P is r x n_out with orthonormal rows "
            f"and Q is n_hidden x r, so r <= {limit}; use a smaller rank"
        )
    return int(rank)


def init_weights(
    task: LinearTask, rule: str, rank: int | None = None, seed: int = 0, init_scale: float = 1e-3
) -> Weights:
    """Initial weights for ``rule`` (see the module docstring); same ``seed`` -> same start
    for ``simulate`` and ``integrate``."""
    rank = check_rank(task, rule, rank)
    if not init_scale > 0:
        raise ValueError(f"init_scale={init_scale!r} must be > 0 (std of the initial W1, W2 entries); use e.g. 1e-3")
    rng = np.random.default_rng([seed, 1])  # stream independent of the task's
    n_in, n_h, n_out = task.n_in, task.n_hidden, task.n_out
    w = Weights(
        W1=init_scale * rng.standard_normal((n_h, n_in)),
        W2=init_scale * rng.standard_normal((n_out, n_h)),
    )
    if rule == "fa":
        w.B = rng.standard_normal((n_h, n_out)) / np.sqrt(n_h)
    elif rule in LOW_RANK_RULES:
        w.Q = rng.standard_normal((n_h, rank)) / np.sqrt(n_h)
        w.P = random_orthonormal(rng, n_out, rank).T
    return w


def check_weights(task: LinearTask, rule: str, rank: int | None, weights: Weights) -> Weights:
    """Check that user-given initial weights fit the task and rule; returns a float64 copy."""
    w = Weights(**{k: (None if v is None else np.array(v, dtype=np.float64)) for k, v in weights.__dict__.items()})
    n_in, n_h, n_out = task.n_in, task.n_hidden, task.n_out
    need = {"W1": (n_h, n_in), "W2": (n_out, n_h)}
    if rule == "fa":
        need["B"] = (n_h, n_out)
    if rule in LOW_RANK_RULES:
        need.update(Q=(n_h, rank), P=(rank, n_out))
    for name, shape in need.items():
        value = getattr(w, name)
        if value is None or value.shape != shape:
            got = None if value is None else value.shape
            raise ValueError(f"initial {name} for rule {rule!r} must have shape {shape}, got {got}")
    return w
