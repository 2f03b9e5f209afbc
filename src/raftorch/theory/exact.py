"""Closed-form solutions used as exact references for the flows in ``ode.py``.

- Saxe, McClelland & Ganguli (2013), eq. (7): BP on one mode of strength ``s`` from a
  balanced start ``W1 = a h v^T``, ``W2 = a u h^T`` (``a^2 = u0``) keeps that form and its
  strength ``u = a^2`` follows ``du/dt = 2 u (s - u)`` (``tau = 1``), so
  ``u(t) = s e^{2st} / (e^{2st} - 1 + s/u0)``.
- Oja's subspace flow ``dP/dt = P C (I - P^T P)`` with ``C`` fixed (Yan, Helmke & Moore 1994;
  ALGORITHM.md): with ``W0 = P0^T``, ``Z = e^{Ct} W0`` and ``M = I - W0^T W0 + Z^T Z``,
  ``P^T P(t) = Z M^{-1} Z^T``. (Check: ``K = P^T P`` obeys ``dK/dt = CK + KC - 2KCK``, and so
  does ``Z M^{-1} Z^T`` since ``dZ/dt = CZ``, ``dM/dt = 2 Z^T C Z``.)
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
