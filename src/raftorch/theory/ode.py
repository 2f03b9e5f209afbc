"""The learning dynamics as ordinary differential equations, integrated with ``solve_ivp``.

Gradient flow of each rule (``rules.py`` has the derivation's summary), written in the SVD
basis of the input-output covariance ``Sigma_yx = U S V^T`` (``U (n_out, n_out)``,
``V (n_in, n_in)`` orthogonal, ``S (n_out, n_in)`` rectangular diagonal). With
``W1' = W1 V``, ``W2' = U^T W2``, ``P' = P U``, ``B' = B U``, ``C' = U^T Sigma_yy U`` and
``E' = S - W2' W1'`` (time ``t = step * lr``, ``tau = 1``)::

    dW1'/dt = B' E'             B' = W2'^T (bp) | B U (fa) | Q P' (fa-lowrank, raf-q, raf)
    dW2'/dt = E' W1'^T
    dQ/dt   = W1' E'^T P'^T - lambda Q                         (raf-q, raf; Q is not rotated)
    dP'/dt  = P' C' (I - P'^T P')                              (raf: Oja on the targets)

The flow uses only ``Sigma_yx`` and ``Sigma_yy`` (the task whitens its inputs, so
``Sigma_xx = I``), never the samples: it is independent of ``simulate.py``.
"""
from __future__ import annotations

import time

import numpy as np
from scipy.integrate import solve_ivp

from raftorch.theory._threads import single_threaded_blas
from raftorch.theory.result import TheoryResult, mode_strengths, p_alignment, relative_error
from raftorch.theory.rules import Weights, check_rank, check_weights, init_weights
from raftorch.theory.task import LinearTask


def oja_rhs(P: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Oja's subspace flow ``dP/dt = P C (I - P^T P)`` for ``P (r, n)`` and ``C (n, n)``."""
    PC = P @ C
    return PC - (PC @ P.T) @ P


def oja_flow(P0: np.ndarray, C: np.ndarray, times: np.ndarray, *, rtol: float = 1e-10,
             atol: float = 1e-12, solver: str = "DOP853") -> np.ndarray:
    """Integrate Oja's subspace flow with ``C`` fixed; returns ``P`` at ``times``, ``(T, r, n)``."""
    r, n = P0.shape
    with single_threaded_blas():
        sol = solve_ivp(lambda t, p: oja_rhs(p.reshape(r, n), C).ravel(), (0.0, float(times[-1])),
                        P0.ravel().astype(np.float64), method=solver, t_eval=times, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed on Oja's flow: {sol.message}")
    return sol.y.T.reshape(len(times), r, n)


class _Packer:
    """Flattens named matrices into one state vector for ``solve_ivp`` and back."""

    def __init__(self, shapes: dict[str, tuple[int, int]]):
        self.shapes = shapes
        self.slices, start = {}, 0
        for name, (a, b) in shapes.items():
            self.slices[name] = slice(start, start + a * b)
            start += a * b
        self.size = start

    def pack(self, **mats: np.ndarray) -> np.ndarray:
        out = np.empty(self.size)
        for name, sl in self.slices.items():
            out[sl] = mats[name].ravel()
        return out

    def unpack(self, y: np.ndarray) -> dict[str, np.ndarray]:
        return {name: y[sl].reshape(self.shapes[name]) for name, sl in self.slices.items()}


def integrate(
    task: LinearTask,
    rule: str,
    rank: int | None = None,
    t_end: float = 10.0,
    lr: float = 0.01,
    seed: int = 0,
    *,
    weight_decay: float = 0.0,
    init_scale: float = 1e-3,
    init: Weights | None = None,
    n_records: int = 101,
    rtol: float = 1e-8,
    atol: float = 1e-10,
    solver: str = "DOP853",
) -> TheoryResult:
    """Integrate the gradient flow of ``rule`` on ``task`` from ``t = 0`` to ``t_end``.

    Arguments as in :func:`raftorch.theory.simulate`, except ``t_end`` (flow time,
    ``t = step * lr``) and the solver's ``rtol``, ``atol`` and ``solver`` (a ``solve_ivp``
    method). ``lr`` does not enter the flow; it is recorded so that ``result.steps`` gives
    the number of discrete steps each time corresponds to. The same ``seed`` and
    ``init_scale`` as ``simulate`` give the same initial weights.

    Returns a :class:`TheoryResult` with ``method="ode"``.
    """
    rank = check_rank(task, rule, rank)
    if not (np.isfinite(t_end) and t_end > 0):
        raise ValueError(f"t_end={t_end!r} must be a positive flow time (t = step * lr)")
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr!r} must be a positive learning rate")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay={weight_decay!r} must be >= 0")
    if not (isinstance(n_records, int) and n_records >= 2):
        raise ValueError(f"n_records={n_records!r} must be an integer >= 2")
    w0 = init_weights(task, rule, rank, seed, init_scale) if init is None else check_weights(task, rule, rank, init)

    U, s, Vt = np.linalg.svd(task.sigma_yx, full_matrices=True)
    V = Vt.T
    S = np.zeros((task.n_out, task.n_in))
    S[np.arange(s.size), np.arange(s.size)] = s
    C = U.T @ task.sigma_yy @ U
    B = None if w0.B is None else w0.B @ U

    n_in, n_h, n_out = task.n_in, task.n_hidden, task.n_out
    shapes = {"W1": (n_h, n_in), "W2": (n_out, n_h)}
    if rule in ("raf-q", "raf"):
        shapes["Q"] = (n_h, rank)
    if rule == "raf":
        shapes["P"] = (rank, n_out)
    packer = _Packer(shapes)
    Q_fixed = w0.Q if rule == "fa-lowrank" else None
    P_fixed = w0.P @ U if rule in ("fa-lowrank", "raf-q") else None

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        m = packer.unpack(y)
        W1, W2 = m["W1"], m["W2"]
        Q, P = m.get("Q", Q_fixed), m.get("P", P_fixed)
        E = S - W2 @ W1
        if rule == "bp":
            feedback = W2.T
        elif rule == "fa":
            feedback = B
        else:
            feedback = Q @ P
        d = {"W1": feedback @ E, "W2": E @ W1.T}
        if "Q" in m:
            d["Q"] = W1 @ E.T @ P.T - weight_decay * Q
        if "P" in m:
            d["P"] = oja_rhs(P, C)
        return packer.pack(**d)

    y0 = {"W1": w0.W1 @ V, "W2": U.T @ w0.W2}
    if "Q" in shapes:
        y0["Q"] = w0.Q
    if "P" in shapes:
        y0["P"] = w0.P @ U
    times = np.linspace(0.0, float(t_end), n_records)
    start = time.perf_counter()
    with single_threaded_blas():
        sol = solve_ivp(rhs, (0.0, float(t_end)), packer.pack(**y0), method=solver, t_eval=times,
                        rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"solve_ivp failed for rule {rule!r}: {sol.message}")
        traj_m, traj_err, traj_a = [], [], []
        for k in range(len(times)):
            m = packer.unpack(sol.y[:, k])
            W1, W2 = m["W1"] @ V.T, U @ m["W2"]  # back to the task's basis
            P = m["P"] @ U.T if "P" in m else w0.P
            traj_m.append(mode_strengths(task, W1, W2))
            traj_err.append(relative_error(task, W1, W2))
            traj_a.append(p_alignment(task, P))
    final = packer.unpack(sol.y[:, -1])
    weights = Weights(W1=final["W1"] @ V.T, W2=U @ final["W2"], B=w0.B,
                      Q=final.get("Q", w0.Q), P=final["P"] @ U.T if "P" in final else w0.P)
    return TheoryResult(
        rule=rule, rank=rank, method="ode", strengths=task.strengths.copy(), times=times,
        mode_strength_trajectory=np.array(traj_m), relative_error_trajectory=np.array(traj_err),
        alignment_trajectory=None if w0.P is None else np.array(traj_a),
        settings={"lr": lr, "t_end": float(t_end), "seed": seed, "weight_decay": weight_decay,
                  "init_scale": init_scale, "rtol": rtol, "atol": atol, "solver": solver,
                  "n_rhs_evals": int(sol.nfev)},
        task=task.config(), wall_s=time.perf_counter() - start, weights=weights,
    )
