r"""What the error signals look like: does ``P`` span the error's principal subspace, and how
many dimensions does the error really have?

Notation (row convention): ``X`` ``(M, d)`` holds ``M`` samples of an error with ``d``
features. A ``Linear`` layer's error ``(*, d)`` gives one sample per row (per token for
``(N, T, D)``); a ``Conv2d`` layer's error map ``(N, C, H, W)`` gives one sample per **pixel**,
``M = N H W`` rows of ``d = C`` channels, as Oja's rule counts them
(:class:`raftorch.functional.Conv2dLowRankFeedback`). ``X_c = X - 1 mean(X)`` when centred.

* Covariance: ``C = X_c^T X_c / M`` (``d x d``; population normalisation ``1/M``, which no
  metric here depends on), eigenvalues ``lambda_1 >= ... >= lambda_d >= 0``, eigenvectors
  ``u_i``.
* Subspace overlap of a feedback matrix ``P`` ``(r, d)`` with the top-``k`` principal
  subspace ``U_k = [u_1 ... u_k]`` of ``C``: with ``P^T = P_q R`` (QR, ``P_q`` ``(d, r)``
  orthonormal columns spanning ``P``'s row space),
  ``overlap = ||U_k^T P_q||_F^2 / k = (1/k) sum_i cos^2 theta_i``, the mean squared cosine of
  the principal angles ``theta_i`` between the two subspaces: 1 when ``P``'s rows span the top
  ``k`` directions, 0 when they are orthogonal to them, ``r / d`` on average for a random
  ``P`` (``k = r``). Oja's subspace rule drives the rows of ``P`` to such a basis, so this is
  the measure of how far it got.
* Participation ratio (effective dimensionality):
  ``PR = (sum_i lambda_i)^2 / sum_i lambda_i^2 = tr(C)^2 / ||C||_F^2``, between 1 (one
  direction carries all the variance) and ``d`` (isotropic); ``k`` exactly when ``k``
  eigenvalues are equal and the rest zero.

Every metric is computed in float64 from the smaller Gram matrix (``X^T X`` or ``X X^T``), so
a ``512``-wide error on 256 samples costs a ``256 x 256`` eigendecomposition. With ``M``
samples the sample covariance has rank at most ``M - 1`` (centred): a participation ratio
near ``M`` means "at least that many dimensions", not a measurement.

:func:`track_subspace` measures these on one batch for every layer of a model, under the
model's own learning rule and under exact backprop (:func:`plain_copy`).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raftorch.convert import plain_copy
from raftorch.metrics import capture_errors, error_layer_names

__all__ = ["as_samples", "error_covariance", "principal_subspace", "subspace_overlap",
           "participation_ratio", "plain_copy", "capture_errors", "track_subspace"]


# --------------------------------------------------------------------------- pure functions


def as_samples(errors: Tensor, feature_dim: int | None = None) -> Tensor:
    """The error as a float64 sample matrix ``X`` ``(M, d)``: features along ``feature_dim``,
    every other dimension a sample. ``feature_dim=None``: 1 for a 4-d tensor (a convolution's
    ``(N, C, H, W)`` error map: ``M = N H W`` pixels of ``C`` channels), else the last
    (``(*, d)``: ``M`` = the product of the leading sizes). A 1-d tensor is one sample."""
    errors = errors.detach()
    if errors.ndim == 0:
        raise ValueError("errors must have at least one dimension (the features)")
    if errors.ndim == 1:
        errors = errors[None]
    if feature_dim is None:
        feature_dim = 1 if errors.ndim == 4 else -1
    return errors.movedim(feature_dim, -1).reshape(-1, errors.shape[feature_dim]).double()


def _centred(X: Tensor, center: bool) -> Tensor:
    return X - X.mean(0, keepdim=True) if center else X


def error_covariance(errors: Tensor, center: bool = True, *, feature_dim: int | None = None) -> Tensor:
    """``C = X_c^T X_c / M`` ``(d, d)``, float64, for the samples of :func:`as_samples`
    (``X_c = X`` with ``center=False``: then ``C`` is the second-moment matrix ``E[e e^T]``,
    the matrix Oja's rule sees with ``oja_center=False``)."""
    X = _centred(as_samples(errors, feature_dim), center)
    return X.t() @ X / X.shape[0]


def _rank_tol(evals: Tensor, shape: tuple[int, int], dtype: torch.dtype) -> float:
    """Eigenvalues of ``X^T X / M`` (or ``X X^T / M``) below this are zero: the float64
    eigendecomposition of a Gram matrix is accurate to about ``max(M, d) eps_64 lambda_max``,
    and errors that came in a lower precision carry rounding of relative size ``eps`` in ``X``,
    i.e. ``(max(M, d) eps)^2 lambda_max`` in the eigenvalues (``numpy.linalg.matrix_rank``'s
    singular-value tolerance, squared)."""
    n = max(shape)
    eps = torch.finfo(dtype if dtype.is_floating_point else torch.float64).eps
    return float(evals.max()) * max(n * torch.finfo(torch.float64).eps, (n * eps) ** 2)


def principal_subspace(cov: Tensor | None = None, *, errors: Tensor | None = None, center: bool = True,
                       feature_dim: int | None = None) -> tuple[Tensor, Tensor]:
    """``(lambda, U)``: the nonzero eigenvalues of the covariance in decreasing order and their
    orthonormal eigenvectors as the columns of ``U`` ``(d, k)``, ``k = rank(C)``.

    Give either ``cov`` (a symmetric ``(d, d)`` matrix) or ``errors`` (the covariance is then
    :func:`error_covariance`'s, computed through ``X X^T`` when ``M < d``: with
    ``X_c X_c^T / M = V diag(lambda) V^T``, ``U = X_c^T V diag(M lambda)^{-1/2}``).
    """
    if (cov is None) == (errors is None):
        raise ValueError("give either cov (a covariance matrix) or errors= (samples)")
    if cov is not None:
        if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
            raise ValueError(f"cov must be a square (d, d) matrix, got shape {tuple(cov.shape)}")
        C = cov.detach().double()
        evals, evecs = torch.linalg.eigh((C + C.t()) / 2)
        evals, evecs = evals.flip(0), evecs.flip(1)
        keep = evals > (_rank_tol(evals, C.shape, cov.dtype) if evals.max() > 0 else math.inf)
        return evals[keep], evecs[:, keep]
    X = _centred(as_samples(errors, feature_dim), center)
    M, d = X.shape
    if M >= d:
        evals, evecs = torch.linalg.eigh(X.t() @ X / M)
        evals, evecs = evals.flip(0), evecs.flip(1)
    else:
        evals, V = torch.linalg.eigh(X @ X.t() / M)
        evals, V = evals.flip(0), V.flip(1)
        evecs = None
    tol = _rank_tol(evals, (M, d), errors.dtype) if evals.max() > 0 else math.inf
    keep = evals > tol
    evals = evals[keep]
    if evecs is None:
        evecs = (X.t() @ V[:, keep]) / torch.sqrt(M * evals)
    else:
        evecs = evecs[:, keep]
    return evals, evecs


def subspace_overlap(P: Tensor, cov: Tensor | None = None, *, errors: Tensor | None = None,
                     r: int | None = None, center: bool = True, feature_dim: int | None = None) -> float:
    """Overlap of the row space of ``P`` ``(r_P, d)`` with the top-``k`` principal subspace of
    an error covariance: ``||U_k^T P_q||_F^2 / k``, the mean ``cos^2`` of the principal angles
    (see the module docstring). 1 = aligned, 0 = orthogonal.

    Args:
        P: the feedback matrix whose rows Oja's rule trains (``layer.P``); its rows are
            orthonormalised by QR, so only their span matters.
        cov: the covariance ``(d, d)``; or ``errors=``: samples, as :func:`error_covariance`
            takes them with ``center`` and ``feature_dim``.
        r: how many principal directions to compare with (default: ``P``'s rows).

    ``k = min(r, rank C)``: when the error has fewer than ``r`` nonzero directions (the output
    error of a ``K``-class softmax has at most ``K - 1``), the overlap is the fraction of the
    whole error subspace that ``P``'s rows contain, 1 iff they contain all of it. When
    ``r = d`` the overlap is 1 for any full-rank ``P``. ``nan`` for an all-zero error.
    """
    if P.ndim != 2:
        raise ValueError(f"P must be a matrix (r, d), got shape {tuple(P.shape)}")
    r = P.shape[0] if r is None else int(r)
    if r < 1:
        raise ValueError(f"r must be a positive whole number, got {r}")
    evals, U = principal_subspace(cov, errors=errors, center=center, feature_dim=feature_dim)
    if U.shape[0] != P.shape[1]:
        raise ValueError(f"P has {P.shape[1]} columns but the error has {U.shape[0]} features")
    k = min(r, U.shape[1])
    if k == 0:
        return float("nan")
    Pq = torch.linalg.qr(P.detach().double().t()).Q  # (d, r_P), orthonormal columns
    return min(1.0, float((U[:, :k].t() @ Pq).pow(2).sum() / k))  # 1 + rounding when k = d


def participation_ratio(errors: Tensor | None = None, *, cov: Tensor | None = None, center: bool = True,
                        feature_dim: int | None = None) -> float:
    """Effective dimensionality ``PR = (sum lambda)^2 / sum lambda^2 = tr(C)^2 / ||C||_F^2`` of
    the error covariance (module docstring), from ``errors`` (samples as
    :func:`error_covariance` takes them; centred by default) or ``cov=``.

    From samples no eigendecomposition is needed: ``tr(C) = ||X_c||_F^2 / M`` and
    ``||C||_F^2 = ||X_c^T X_c||_F^2 / M^2 = ||X_c X_c^T||_F^2 / M^2``, so
    ``PR = ||X_c||_F^4 / ||G||_F^2`` with ``G`` the smaller Gram matrix. ``nan`` for an
    all-zero error.
    """
    if (cov is None) == (errors is None):
        raise ValueError("give either errors (samples) or cov= (a covariance matrix)")
    if cov is not None:
        C = cov.detach().double()
        trace, frob2 = torch.diagonal(C).sum(), C.pow(2).sum()
    else:
        X = _centred(as_samples(errors, feature_dim), center)
        G = X.t() @ X if X.shape[0] >= X.shape[1] else X @ X.t()
        trace, frob2 = X.pow(2).sum(), G.pow(2).sum()
    if frob2 <= 0:
        return float("nan")
    return float(trace ** 2 / frob2)


# --------------------------------------------------------------------------- models


def _label(name: str) -> str:
    return name or "<root>"


def _learns_exactly(model: nn.Module) -> bool:
    """True when every weight layer of ``model`` learns by exact backprop (received error =
    backprop's), so no plain copy is needed."""
    from raftorch.layers import FeedbackLayer

    if getattr(model, "direct_feedback", None) is not None:
        return False
    return all(m.rule.name == "bp" for m in model.modules() if isinstance(m, FeedbackLayer))


def track_subspace(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable | None = None
                   ) -> dict[str, dict[str, float]]:
    r"""The representation metrics of ``model`` on one fixed batch ``(x, y)``.

    Returns three mappings from layer name to a float (``"<root>"`` for a model that is one
    layer), each left out when empty:

    * ``"subspace"``: for every layer with a low-rank feedback path ``B = Q P`` (``raf``,
      ``raf-q``, ``fa-lowrank``; a fixed ``P`` gives the chance level, about ``r / n``), the
      :func:`subspace_overlap` of ``P``'s rows with the top-``r`` principal subspace of the
      error the layer receives (its ``grad_output`` under the model's own rule), centred as
      the layer's ``OjaOptions.center`` says (``True`` when ``P`` is fixed). An output layer
      with ``oja_source="target"`` learns ``P`` on the targets, not the error; its overlap is
      still measured against the error. For ``draf``, one entry per direct path, named by
      the path's module (``"direct_feedback.paths.0"``): its ``P`` ``(r, d_s)`` against the
      source error ``e_s`` flattened per sample, the signal its Oja rule sees (a
      convolutional path, :mod:`raftorch.direct_conv`: ``P`` ``(r, C_s)`` against the source
      map's pixels, channels as features).
    * ``"error_dim"``: for every ``Linear`` / ``Conv2d``, the :func:`participation_ratio`
      (centred) of the **backprop** error at its output, from plain autograd on
      :func:`plain_copy` (the model itself when it learns by exact backprop).
    * ``"error_dim_received"``: the same for the error the layer receives under the model's
      rule; only for models that do not learn by exact backprop.

    A convolution's error counts every pixel as a sample, as Oja's rule does. One forward and
    backward pass each for the model and its plain copy, in eval mode; nothing of the model
    changes (see :func:`capture_errors`).
    """
    from raftorch.layers import FeedbackLayer

    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    layers = [(n, model.get_submodule(n)) for n in error_layer_names(model)]
    names = [n for n, _ in layers]
    direct = getattr(model, "direct_feedback", None)
    source = None
    if direct is not None and getattr(direct, "rule", None) is not None and direct.rule.low_rank:
        source = direct.source_point
    exact = _learns_exactly(model)
    received = capture_errors(model, x, y, loss_fn, names + ([source] if source not in (None, *names) else []))
    bp = received if exact else capture_errors(plain_copy(model), x, y, loss_fn, names)

    result: dict[str, dict[str, float]] = {"subspace": {}, "error_dim": {}, "error_dim_received": {}}
    for name, m in layers:
        if isinstance(m, FeedbackLayer) and m.rule.low_rank and name in received:
            center = m.oja.center if m.oja is not None else True
            result["subspace"][_label(name)] = subspace_overlap(
                m.P, errors=received[name], center=center, feature_dim=1 if isinstance(m, nn.Conv2d) else -1)
    if source is not None and source in received:
        e = received[source]
        for i, path in enumerate(direct.paths):
            conv = getattr(path, "conv", False)  # a convolutional path: Oja per pixel, channels as features
            result["subspace"][f"direct_feedback.paths.{i}"] = subspace_overlap(
                path.P, errors=e if conv else e.reshape(e.shape[0], -1), center=direct.oja.center,
                feature_dim=1 if conv else -1)
    for name, m in layers:
        fd = 1 if isinstance(m, nn.Conv2d) else -1
        if name in bp:
            result["error_dim"][_label(name)] = participation_ratio(bp[name], feature_dim=fd)
        if not exact and name in received:
            result["error_dim_received"][_label(name)] = participation_ratio(received[name], feature_dim=fd)
    return {k: v for k, v in result.items() if v}
