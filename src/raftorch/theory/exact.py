"""Closed-form solutions used as exact references for the flows in ``ode.py``.

- Saxe, McClelland & Ganguli (2013), eq. (7): BP on one mode of strength ``s`` from a
  balanced start ``W1 = a h v^T``, ``W2 = a u h^T`` (``a^2 = u0``) keeps that form and its
  strength ``u = a^2`` follows ``du/dt = 2 u (s - u)`` (``tau = 1``), so
  ``u(t) = s e^{2st} / (e^{2st} - 1 + s/u0)``.
- Oja's subspace flow ``dP/dt = P C (I - P^T P)`` with ``C`` fixed (Yan, Helmke & Moore 1994;
  docs/theory.md): with ``W0 = P0^T``, ``Z = e^{Ct} W0`` and ``M = I - W0^T W0 + Z^T Z``,
  ``P^T P(t) = Z M^{-1} Z^T``. (Check: ``K = P^T P`` obeys ``dK/dt = CK + KC - 2KCK``, and so
  does ``Z M^{-1} Z^T`` since ``dZ/dt = CZ``, ``dM/dt = 2 Z^T C Z``.)
- The plateau of a fixed feedback ``B = Q P`` (``fa-lowrank``; ``raf-q``, whose ``P`` is fixed
  too), from a small start: ``W1`` grows only inside ``span(Q)`` with ``dW1/dt = Q P E``, so
  its rows stay in the row space of ``P Sigma_yx`` (to ``O(init_scale)``), and ``W1``'s flow
  stops at ``P E = 0``, ``W2``'s at ``E W1^T = 0``. With ``Pi`` the orthogonal projector on
  the row space of ``P Sigma_yx`` this gives ``W2 W1 = Sigma_yx Pi`` (unique: ``E = Sigma_yx
  (I - Pi)`` satisfies both). For noise-free targets and ``r >= d`` that row space is the
  teacher's input modes and the plateau is ``A`` (Sec. 3.1's "unique solution"); noise in the
  targets gives ``Sigma_yx`` small singular values in every direction, and ``P`` mixes them
  into the row space, so the plateau is off ``A`` at any ``r``.
"""
from __future__ import annotations

import numpy as np
from scipy.linalg import expm


def saxe_mode_strength(t: np.ndarray | float, s: float, u0: float) -> np.ndarray:
    """Strength of one BP-learned mode at flow time ``t``, from ``u0`` (``0 < u0``)."""
    g = np.exp(2.0 * s * np.asarray(t, dtype=np.float64))
    return s * g / (g - 1.0 + s / u0)


def oja_projector(t: float, C: np.ndarray, P0: np.ndarray) -> np.ndarray:
    """``P^T P`` at time ``t`` under Oja's subspace flow from ``P0 (r, n)`` with fixed ``C (n, n)``."""
    W0 = P0.T
    Z = expm(C * t) @ W0
    M = np.eye(W0.shape[1]) - W0.T @ W0 + Z.T @ Z
    return Z @ np.linalg.solve(M, Z.T)


def fixed_feedback_plateau(sigma_yx: np.ndarray, P: np.ndarray) -> np.ndarray:
    """``Sigma_yx Pi`` ``(n_out, n_in)``: the ``W2 W1`` at which the flow with a fixed feedback
    ``B = Q P`` (``P (r, n_out)``, task basis) stops from a small start (module docstring)."""
    M = P @ sigma_yx
    return sigma_yx @ (M.T @ np.linalg.solve(M @ M.T, M))
