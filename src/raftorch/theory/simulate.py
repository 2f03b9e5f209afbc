"""Discrete learning of the linear network on the task's samples (full-batch or mini-batch SGD).

This is the per-sample rule of docs/theory.md, averaged over a batch; it never uses the
covariances or the SVD (those belong to ``ode.py``), so the two paths check each other.
The step of each rule is written out in ``rules.py``.
"""
from __future__ import annotations

import time

import numpy as np

from raftorch.theory._threads import single_threaded_blas
from raftorch.theory.result import TheoryResult, mode_strengths, p_alignment, relative_error
from raftorch.theory.rules import Weights, check_rank, check_weights, init_weights
from raftorch.theory.task import LinearTask


def sgd_step(w: Weights, rule: str, x: np.ndarray, y: np.ndarray, lr: float, weight_decay: float) -> None:
    """One step of ``rule`` on the batch ``x (n_in, b)``, ``y (n_out, b)``, in place.

    All updates are computed from the weights before the step (see ``rules.py``)::

        e = W2 W1 x - y;  W2 -= lr e h^T / b;  W1 -= lr (B e) x^T / b           (h = W1 x)
        Q -= lr (h (P e)^T / b + weight_decay Q)                               (raf-q, raf)
        P += lr ((P y) y^T - (P y)(P y)^T P) / b                               (raf)
    """
    b = x.shape[1]
    h = w.W1 @ x
    e = w.W2 @ h - y
    delta = w.feedback() @ e  # (n_hidden, b): the error that reaches the hidden layer
    grad_W2 = e @ h.T / b
    grad_W1 = delta @ x.T / b
    if rule in ("raf-q", "raf"):
        grad_Q = h @ (w.P @ e).T / b + weight_decay * w.Q
    if rule == "raf":
        z = w.P @ y  # (r, b): the targets seen through P
        oja = (z @ y.T - (z @ z.T) @ w.P) / b
    w.W2 -= lr * grad_W2
    w.W1 -= lr * grad_W1
    if rule in ("raf-q", "raf"):
        w.Q -= lr * grad_Q
    if rule == "raf":
        w.P += lr * oja


def simulate(
    task: LinearTask,
    rule: str,
    rank: int | None = None,
    steps: int = 1000,
    lr: float = 0.01,
    seed: int = 0,
    *,
    batch_size: int | None = None,
    weight_decay: float = 0.0,
    init_scale: float = 1e-3,
    init: Weights | None = None,
    n_records: int = 101,
) -> TheoryResult:
    """Train ``y_hat = W2 W1 x`` on ``task``'s samples with ``rule`` for ``steps`` SGD steps.

    Args:
        rule: ``"bp"``, ``"fa"``, ``"fa-lowrank"``, ``"raf-q"`` or ``"raf"``.
        rank: feedback rank ``r`` for the low-rank rules, ``None`` for bp and fa.
        steps, lr: number of steps and learning rate ``eta``; flow time is ``t = step * lr``.
        seed: seed of the initial weights and of the mini-batch order.
        batch_size: ``None`` for full batch, else mini-batches of that size, sampled without
            replacement, a fresh permutation every epoch.
        weight_decay: ``lambda`` on ``Q`` (raf-q, raf).
        init_scale: std of the initial ``W1``, ``W2`` entries; ``init`` overrides all initial
            weights (a :class:`Weights` with the shapes of ``rules.py``).
        n_records: number of evenly spaced steps (first and last included) recorded.

    Returns a :class:`TheoryResult` with ``method="sim"``.
    """
    rank = check_rank(task, rule, rank)
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive integer number of SGD steps")
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr!r} must be a positive learning rate; the flow time is t = step * lr")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay={weight_decay!r} must be >= 0")
    n = task.n_samples
    if batch_size is not None and not (int(batch_size) == batch_size and 1 <= batch_size <= n):
        raise ValueError(
            f"batch_size={batch_size!r} must be an integer in [1, n_samples={n}], or None for full batch"
        )
    if not (isinstance(n_records, int) and n_records >= 2):
        raise ValueError(f"n_records={n_records!r} must be an integer >= 2")
    w = init_weights(task, rule, rank, seed, init_scale) if init is None else check_weights(task, rule, rank, init)

    record_at = np.unique(np.round(np.linspace(0, steps, n_records)).astype(int))
    record_set = set(record_at.tolist())
    rng = np.random.default_rng([seed, 2])
    order, cursor = rng.permutation(n), 0
    traj_m, traj_err, traj_a = [], [], []
    start = time.perf_counter()
    with single_threaded_blas():
        for step in range(steps + 1):
            if step in record_set:
                traj_m.append(mode_strengths(task, w.W1, w.W2))
                traj_err.append(relative_error(task, w.W1, w.W2))
                traj_a.append(p_alignment(task, w.P))
            if step == steps:
                break
            if batch_size is None:
                x, y = task.X, task.Y
            else:  # a fresh permutation every epoch, the incomplete last batch dropped
                if cursor + batch_size > n:
                    order, cursor = rng.permutation(n), 0
                idx = order[cursor: cursor + batch_size]
                cursor += batch_size
                x, y = task.X[:, idx], task.Y[:, idx]
            sgd_step(w, rule, x, y, lr, weight_decay)
            if not np.isfinite(w.W2[0, 0]):
                raise FloatingPointError(
                    f"{rule} diverged at step {step} with lr={lr}; use a smaller lr (raf needs lr < ~1/s_max^2)"
                )
    return TheoryResult(
        rule=rule, rank=rank, method="sim", strengths=task.strengths.copy(),
        times=record_at * lr, mode_strength_trajectory=np.array(traj_m),
        relative_error_trajectory=np.array(traj_err),
        alignment_trajectory=None if w.P is None else np.array(traj_a),
        settings={"lr": lr, "steps": int(steps), "batch_size": batch_size, "seed": seed,
                  "weight_decay": weight_decay, "init_scale": init_scale},
        task=task.config(), wall_s=time.perf_counter() - start, weights=w,
    )

