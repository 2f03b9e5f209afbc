"""The linear task of the paper's section 3: ``y = A x + noise`` with ``A`` of rank ``d``.

``A = sum_{i<d} s_i u_i v_i^T`` (``u_i``: output directions, ``v_i``: input directions,
orthonormal, drawn at random from the task's seed; ``s_i``: the mode strengths, in the
order the caller gives them). Inputs are drawn ``x ~ N(0, I)`` and then whitened so that
the *sample* covariance is exactly the identity (**choice**: the theory assumes
``Sigma_xx = I``; whitening the sample makes the flow on the empirical loss exactly the one
written in docs/theory.md instead of an approximation). Targets are ``y = A x + noise * xi``,
``xi ~ N(0, I)``.

Shapes follow the paper's column convention: ``X`` is ``(n_in, n_samples)``,
``Y`` is ``(n_out, n_samples)``, ``A`` is ``(n_out, n_in)``.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import numpy as np


def random_orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``(n, k)`` matrix with orthonormal columns, uniformly distributed (QR with sign fix)."""
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    return q * np.sign(np.diag(r))


class LinearTask:
    """A rank-``d`` linear regression task and its sample covariances.

    Args:
        n_in, n_hidden, n_out: sizes of input, hidden and output layers of the network
            ``y_hat = W2 W1 x`` that learns the task.
        strengths: the ``d`` mode strengths ``s_i > 0`` of ``A`` (any order; results report
            modes in this order), or an int ``d`` to draw ``d`` strengths uniformly in
            ``[1, 8]`` from ``seed`` (sorted, largest first).
        n_samples: number of training samples ``N`` (at least ``n_in``, for the whitening).
        noise: standard deviation of the additive Gaussian noise on the targets (``>= 0``).
        seed: seed of everything random in the task (modes, samples, noise).

    Attributes (numpy, float64): ``A (n_out, n_in)``, ``U (n_out, d)``, ``V (n_in, d)``,
    ``X (n_in, N)``, ``Y (n_out, N)``, ``sigma_yx = Y X^T / N``, ``sigma_yy = Y Y^T / N``,
    ``sigma_xx = X X^T / N`` (= I up to rounding).
    """

    def __init__(
        self,
        n_in: int = 30,
        n_hidden: int = 60,
        n_out: int = 30,
        strengths: Sequence[float] | int = (8.0, 6.0, 4.5, 3.0, 2.0),
        n_samples: int = 1000,
        noise: float = 0.5,
        seed: int = 0,
    ) -> None:
        for name, value in (("n_in", n_in), ("n_hidden", n_hidden), ("n_out", n_out)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}; pass e.g. {name}=30")
        rng = np.random.default_rng(seed)
        if isinstance(strengths, (int, np.integer)) and not isinstance(strengths, bool):
            if strengths < 1:
                raise ValueError(
                    f"strengths={strengths}: an int asks for that many random modes and must be >= 1; "
                    "pass e.g. strengths=5 or a list such as strengths=[8, 6, 4.5]"
                )
            s = np.sort(rng.uniform(1.0, 8.0, size=int(strengths)))[::-1].copy()
        else:
            s = np.asarray(strengths, dtype=np.float64).reshape(-1)
            if s.size == 0:
                raise ValueError("strengths is empty; give the d > 0 mode strengths of A, e.g. [8, 6, 4.5]")
            if not np.all(np.isfinite(s)) or np.any(s <= 0):
                raise ValueError(
                    f"strengths must be finite and > 0 (they are singular values of A), got {s.tolist()}; "
                    "drop the non-positive entries (a zero mode lowers the rank d instead)"
                )
        d = s.size
        if d > min(n_in, n_out):
            raise ValueError(
                f"the task's rank d={d} (number of strengths) is larger than n_in={n_in} or n_out={n_out}: "
                f"A is n_out x n_in, so d <= min(n_in, n_out) = {min(n_in, n_out)}; "
                "give fewer strengths or larger sizes"
            )
        if d > n_hidden:
            raise ValueError(
                f"the task's rank d={d} is larger than n_hidden={n_hidden}: W2 W1 has rank <= n_hidden, "
                f"so the network could never learn the task; use n_hidden >= {d} or fewer strengths"
            )
        if int(n_samples) != n_samples or n_samples < n_in:
            raise ValueError(
                f"n_samples={n_samples!r} must be an integer >= n_in={n_in} (the inputs are whitened, which "
                f"needs a full-rank sample covariance); use n_samples >= {n_in}"
            )
        if not np.isfinite(noise) or noise < 0:
            raise ValueError(
                f"noise={noise!r} is the standard deviation of the target noise and must be >= 0; "
                "use noise=0 for a noise-free task"
            )

        self.n_in, self.n_hidden, self.n_out = int(n_in), int(n_hidden), int(n_out)
        self.n_samples, self.noise, self.seed = int(n_samples), float(noise), int(seed)
        self.strengths = s
        self.U = random_orthonormal(rng, n_out, d)
        self.V = random_orthonormal(rng, n_in, d)
        self.A = (self.U * s) @ self.V.T

        x = rng.standard_normal((n_in, n_samples))
        evals, evecs = np.linalg.eigh(x @ x.T / n_samples)
        self.X = (evecs / np.sqrt(evals)) @ evecs.T @ x  # symmetric (ZCA) whitening
        self.Y = self.A @ self.X + self.noise * rng.standard_normal((n_out, n_samples))

    @property
    def d(self) -> int:
        """Rank of ``A`` (number of modes)."""
        return int(self.strengths.size)

    @cached_property
    def sigma_xx(self) -> np.ndarray:
        return self.X @ self.X.T / self.n_samples

    @cached_property
    def sigma_yx(self) -> np.ndarray:
        return self.Y @ self.X.T / self.n_samples

    @cached_property
    def sigma_yy(self) -> np.ndarray:
        return self.Y @ self.Y.T / self.n_samples

    @cached_property
    def target_pcs(self) -> np.ndarray:
        """``(n_out, n_out)``: principal directions of the targets (eigenvectors of
        ``Sigma_yy``), largest eigenvalue first, columns. Signs are arbitrary."""
        evals, evecs = np.linalg.eigh(self.sigma_yy)
        return evecs[:, ::-1].copy()

    def config(self) -> dict:
        """The arguments that rebuild this task (JSON-ready)."""
        return {
            "n_in": self.n_in, "n_hidden": self.n_hidden, "n_out": self.n_out,
            "strengths": self.strengths.tolist(), "n_samples": self.n_samples,
            "noise": self.noise, "seed": self.seed,
        }

    def __repr__(self) -> str:
        s = ", ".join(f"{v:g}" for v in self.strengths)
        return (f"LinearTask(n_in={self.n_in}, n_hidden={self.n_hidden}, n_out={self.n_out}, "
                f"strengths=[{s}], n_samples={self.n_samples}, noise={self.noise:g}, seed={self.seed})")
