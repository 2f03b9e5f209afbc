"""What a run of the linear theory measures, and how it is saved.

Measurements of weights ``W`` on a task with modes ``(s_i, u_i, v_i)``, ``i < d``:

- mode strengths ``m_i = u_i^T W2 W1 v_i`` (``diag(U^T W2 W1 V)`` in the task's own mode order);
- relative error ``||W2 W1 - A||_F / ||A||_F``;
- alignment of ``P`` with the targets' principal directions ``p_i`` (eigenvectors of
  ``Sigma_yy``, largest first): ``a_i = |Pi_P p_i|^2``, ``Pi_P`` the orthogonal projector on the
  row space of ``P``. ``a_i = 1``: ``P`` sees direction ``i`` fully; ``0``: not at all.
  Reported for ``i < d``; ``None`` for rules without ``P``.
- plateau distance (rules with a fixed ``P``: ``fa-lowrank``, ``raf-q``):
  ``||W2 W1 - Sigma_yx Pi||_F / ||A||_F``, the distance of the final product from the closed-form
  plateau of :func:`raftorch.theory.exact.fixed_feedback_plateau`; ``None`` for other rules.

Results are saved as one JSON file per command (``save_results``), written atomically
(temporary file + ``os.replace``), and read back by ``load_results``; the figure is drawn
from that file only.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raftorch.training.checkpoint import write_text
from raftorch.theory.rules import Weights
from raftorch.theory.task import LinearTask


def mode_strengths(task: LinearTask, W1: np.ndarray, W2: np.ndarray) -> np.ndarray:
    """``(d,)``: ``u_i^T W2 W1 v_i`` for the task's modes, in the task's order."""
    return np.einsum("oi,oh,hn,ni->i", task.U, W2, W1, task.V)


def relative_error(task: LinearTask, W1: np.ndarray, W2: np.ndarray) -> float:
    """``||W2 W1 - A||_F / ||A||_F``."""
    return float(np.linalg.norm(W2 @ W1 - task.A) / np.linalg.norm(task.A))


def plateau_distance(task: LinearTask, W1: np.ndarray, W2: np.ndarray, P: np.ndarray) -> float:
    """``||W2 W1 - Sigma_yx Pi||_F / ||A||_F`` for a fixed ``P`` (module docstring)."""
    from raftorch.theory.exact import fixed_feedback_plateau

    return float(np.linalg.norm(W2 @ W1 - fixed_feedback_plateau(task.sigma_yx, P)) / np.linalg.norm(task.A))


def p_alignment(task: LinearTask, P: np.ndarray | None) -> np.ndarray | None:
    """``(d,)``: ``|Pi_P p_i|^2`` for the top ``d`` principal directions of the targets."""
    if P is None:
        return None
    basis, _ = np.linalg.qr(P.T)  # (n_out, r), orthonormal basis of P's row space
    return np.sum((basis.T @ task.target_pcs[:, : task.d]) ** 2, axis=0)


@dataclass
class TheoryResult:
    """Trajectories of one rule on one task, from ``simulate`` (``method="sim"``) or
    ``integrate`` (``method="ode"``).

    ``times`` is ``(T,)`` in flow time ``t = step * lr``; ``mode_strength_trajectory`` is
    ``(T, d)``; ``relative_error_trajectory`` ``(T,)``; ``alignment_trajectory`` ``(T, d)`` or
    ``None``. ``weights`` (final) is kept in memory only, not saved.
    """

    rule: str
    rank: int | None
    method: str
    strengths: np.ndarray
    times: np.ndarray
    mode_strength_trajectory: np.ndarray
    relative_error_trajectory: np.ndarray
    alignment_trajectory: np.ndarray | None
    settings: dict = field(default_factory=dict)
    task: dict = field(default_factory=dict)
    wall_s: float = 0.0
    weights: Weights | None = field(default=None, repr=False, compare=False)
    plateau_distance: float | None = None

    @property
    def mode_strengths(self) -> np.ndarray:
        """``(d,)``: final ``u_i^T W2 W1 v_i``, in the task's mode order."""
        return self.mode_strength_trajectory[-1]

    @property
    def relative_error(self) -> float:
        """Final ``||W2 W1 - A|| / ||A||``."""
        return float(self.relative_error_trajectory[-1])

    @property
    def alignment(self) -> np.ndarray | None:
        """Final ``|Pi_P p_i|^2``, ``(d,)``, or ``None`` without ``P``."""
        return None if self.alignment_trajectory is None else self.alignment_trajectory[-1]

    @property
    def steps(self) -> np.ndarray:
        """``(T,)``: ``times / lr``, the discrete steps the times correspond to."""
        return self.times / self.settings["lr"]

    @property
    def label(self) -> str:
        return self.rule if self.rank is None else f"{self.rule} r={self.rank}"

    def __repr__(self) -> str:
        m = ", ".join(f"{v:.3f}" for v in self.mode_strengths)
        return (f"TheoryResult(rule={self.rule!r}, rank={self.rank}, method={self.method!r}, "
                f"t_end={self.times[-1]:g}, relative_error={self.relative_error:.4f}, mode_strengths=[{m}])")

    def recovered(self, tol: float = 0.02) -> list[int]:
        """0-based indices of the modes whose final strength is within ``tol`` (relative) of ``s_i``."""
        ok = np.abs(self.mode_strengths - self.strengths) <= tol * self.strengths
        return [int(i) for i in np.flatnonzero(ok)]

    def to_dict(self) -> dict:
        """The result as a JSON-ready dict (arrays as lists), as :func:`save_results` writes it and
        :meth:`from_dict` reads it back."""
        def arr(a):
            return None if a is None else np.asarray(a).tolist()

        return {
            "rule": self.rule, "rank": self.rank, "method": self.method,
            "strengths": arr(self.strengths), "times": arr(self.times),
            "mode_strength_trajectory": arr(self.mode_strength_trajectory),
            "relative_error_trajectory": arr(self.relative_error_trajectory),
            "alignment_trajectory": arr(self.alignment_trajectory),
            "settings": self.settings, "task": self.task, "wall_s": self.wall_s,
            "plateau_distance": self.plateau_distance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TheoryResult":
        def arr(a):
            return None if a is None else np.asarray(a, dtype=np.float64)

        return cls(
            rule=d["rule"], rank=d["rank"], method=d["method"], strengths=arr(d["strengths"]),
            times=arr(d["times"]), mode_strength_trajectory=arr(d["mode_strength_trajectory"]),
            relative_error_trajectory=arr(d["relative_error_trajectory"]),
            alignment_trajectory=arr(d["alignment_trajectory"]),
            settings=d.get("settings", {}), task=d.get("task", {}), wall_s=d.get("wall_s", 0.0),
            plateau_distance=d.get("plateau_distance"),
        )


def save_results(path: str | os.PathLike, results: list[TheoryResult], meta: dict | None = None) -> Path:
    """Write ``{"meta": ..., "results": [...]}`` to ``path`` atomically; returns the path."""
    path = Path(path)
    payload = {"format": "raftorch.theory/1", "meta": meta or {}, "results": [r.to_dict() for r in results]}
    write_text(path, json.dumps(payload))
    return path


def load_results(path: str | os.PathLike) -> tuple[dict, list[TheoryResult]]:
    """Read a file written by ``save_results``: ``(meta, results)``."""
    with open(path) as f:
        payload = json.load(f)
    if payload.get("format") != "raftorch.theory/1":
        raise ValueError(f"{path} is not a raftorch theory result file (format {payload.get('format')!r})")
    return payload["meta"], [TheoryResult.from_dict(d) for d in payload["results"]]
