r"""Two scores of a receptive field: how oriented it is, and how centre-surround it is.

Both take fields ``F`` of shape ``(channels, H, W)`` (a single ``(H, W)`` field is treated as
one channel) and return one float per channel (a float64 tensor ``(channels,)``), higher
meaning more of the property. Pixel ``(i, j)`` sits at ``(x, y) = (j, i)`` (columns to the
right, rows down).

**Orientedness** (Lindsey et al. 2019's orientation selectivity, with quadrature gratings).
For orientation ``theta`` (``n_orientations`` angles ``theta_m = m pi / n``, default 16 over
180 degrees) and spatial frequency ``f`` (cycles per pixel, default ``f = q / max(H, W)`` for
``q = 1 .. max(H, W) // 2``, up to the Nyquist frequency 0.5), the response to the best
phase of the grating ``cos(2 pi f (x cos theta + y sin theta) + phi)`` is its quadrature
energy::

    E(theta, f) = max_phi |<F, grating>| = sqrt(<F, cos>^2 + <F, sin>^2)
                = |sum_{x, y} F(x, y) exp(-2 pi i f (x cos theta + y sin theta))|

(the magnitude of the field's Fourier transform at that frequency: it does not depend on
where the field sits in the image). The tuning curve is ``R(theta) = max_f E(theta, f)``, the
preferred orientation ``theta_p = argmax R`` and::

    orientedness = (R(theta_p) - R(theta_p + 90 deg)) / (R(theta_p) + R(theta_p + 90 deg))

in ``[0, 1]``: 0 for a radially symmetric field (equal response at every orientation), near
1 for a grating or a Gabor patch (no response to the orthogonal grating). A zero field
scores 0. ``n_orientations`` must be even, so that ``theta_p + 90 deg`` is on the grid.

**Centre-surround index** (CSI). Centre ``c`` = the energy centroid of the field,
``c = sum_p F(p)^2 p / sum_p F(p)^2``. Rings: pixel ``p`` belongs to ring
``k(p) = round(||p - c||)``. The radial reconstruction ``S(p) = mean_{q: k(q) = k(p)} F(q)``
(the field's rotational average re-expanded to 2-d) is the orthogonal projection of ``F``
onto the fields that are constant on every ring, so::

    radial_fraction = ||S||^2 / ||F||^2                                   in [0, 1]

is the fraction of the field's energy (sum of squares, nothing removed) that a radially
symmetric profile explains. Antagonism between centre and surround is whether that profile
has a part of the sign opposite to its dominant part (a surround of opposite sign, or, where
the surround outweighs the centre, a centre of opposite sign), measured by the mass of the
minority-sign part relative to the majority-sign part, with ``M+ = sum_p max(S(p), 0)`` and
``M- = sum_p max(-S(p), 0)``::

    rho = min(M+, M-) / max(M+, M-)                                       in [0, 1]
    surround = min(1, k rho),   k = 20                                    in [0, 1]
    centre_surround_index = radial_fraction * surround

``rho`` is 0 exactly for a profile of one sign (a ring average of values of one sign keeps
that sign, so a Gaussian blob, round or elongated, scores 0) and 1 for a balanced profile.
The surround term saturates: once the minority part carries at least ``1/k`` = 5 % of the
majority's mass the profile counts as fully antagonistic, whichever sign dominates, and the
index is the radial fraction, which separates a radially symmetric field from an oriented one.
The value of ``k``: for a difference of Gaussians (DoG) ``G(s) - w G(a s)`` (unit-mass
Gaussians: surround/centre mass ``w``, width ratio ``a``) ``rho`` depends on ``w`` and ``a``
only; it is 1 at ``w = 1``, 0.065 at ``(w, a) = (0.2, 2)``, 0.12 at ``(0.2, 3)``, 0.16 at
``(2, 2)``, 0.078 at ``(5, 4)``, and ``rho >= 1/20`` for ``w`` from 0.17 to 2.6 at ``a = 2``,
0.095 to 4.4 at ``a = 3``, 0.074 to 6.0 at ``a = 4`` (a stronger surround cancels the centre,
whose peak is gone at ``w = a^2``; a weaker one is a blob's faint skirt). A larger ``k`` would
also credit the faint opposite-sign rings that noise leaves in a blob's profile: a Gaussian
blob (sigma 2 pixels, 21 x 21) plus white noise of 2 % of its peak has ``rho`` about 0.013 on
average (surround term about 0.25; about 0.65 at 5 % noise, where a blob and a weak surround
are no longer told apart).

So a DoG in that range scores its radial fraction whichever sign its centre has and whether
its surround is weaker or stronger than its centre: ~1 for a DoG centred on a pixel, less where
the pixel grid makes the rings coarse (0.86 or more for centre sigmas of 1.2 pixels or more,
~0.78 for a centre sigma of 0.8 pixel off the pixel grid). A Gabor scores its radial fraction
too (its ring average ``J0(2 pi f r) exp(-r^2 / (2 sigma^2))`` changes sign), which is low for
a Gabor with at least about half a cycle under its envelope (at most ~0.7 for
``f sigma >= 0.3``, 2 octaves of bandwidth or less; ~0.5 at ``f sigma = 0.375``) and 0 for an
odd one; a Gabor with a much wider band is close to a round blob with a faint ring and
scores like a DoG. A grating scores low (below 0.5), a plain blob 0, white noise ~0 (a ring
average keeps about (number of rings) / (number of pixels) of its energy). A zero field
scores 0.

**Field dimensionality** (one number for a layer's set of fields, not per channel): how many
distinct field shapes the channels have. Each live (nonzero) field is flattened and scaled to
unit norm, ``u_k = F_k / ||F_k||``; with the Gram matrix ``G_kl = <u_k, u_l>`` of the ``n``
live fields (eigenvalues ``lambda``)::

    field_dimensionality = (sum lambda)^2 / sum lambda^2 = n^2 / sum_{k, l} <u_k, u_l>^2

the participation ratio of the fields, in ``[1, n]``: 1 when every channel has the same field
up to sign and scale, ``n`` for mutually orthogonal fields, ``k`` for ``k`` orthogonal shapes
shared equally by the channels. It is the quantity the paper's mechanism speaks to: where
the error a layer receives has rank ``r`` over its channels (a linear layer or 1 x 1 conv above
it with rank-``r`` feedback, or dRAF at rank ``r``), every channel's weight update lies in the
span of ``r`` directions, so the learned part of its fields spans about ``r`` shapes (plus what
the layers below contribute). A ``k x k`` conv above with rank-``r`` feedback sends errors
spanning up to ``r k^2`` channel directions per pixel, so there the rank limits the error's
total dimension, not its channel rank. 0 when no field is live.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["orientedness", "orientation_tuning", "centre_surround_index", "radial_fraction",
           "radial_reconstruction", "field_dimensionality"]


def _as_fields(fields) -> Tensor:
    f = torch.as_tensor(fields).detach().to(torch.float64).cpu()
    if f.dim() == 2:
        f = f.unsqueeze(0)
    if f.dim() != 3:
        raise ValueError(f"fields must be (channels, H, W) or (H, W), got shape {tuple(f.shape)}")
    return f


def default_frequencies(h: int, w: int) -> list[float]:
    """``q / max(h, w)`` for ``q = 1 .. max(h, w) // 2`` cycles per pixel (at least one)."""
    n = max(h, w)
    return [q / n for q in range(1, max(n // 2, 1) + 1)]


def orientation_tuning(fields, *, n_orientations: int = 16,
                       frequencies: Sequence[float] | None = None) -> tuple[Tensor, Tensor]:
    """``(R, theta)``: the tuning curves ``R`` ``(channels, n_orientations)``,
    ``R[k, m] = max_f E_k(theta_m, f)``, and the angles ``theta`` (radians). See the module
    docstring for ``E``."""
    f = _as_fields(fields)
    _, h, w = f.shape
    if n_orientations < 2 or n_orientations % 2:
        raise ValueError(f"n_orientations must be even and >= 2, got {n_orientations}")
    freqs = torch.tensor(list(frequencies) if frequencies is not None else default_frequencies(h, w),
                         dtype=torch.float64)
    theta = torch.arange(n_orientations, dtype=torch.float64) * math.pi / n_orientations
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                          indexing="ij")
    along = x[None] * torch.cos(theta)[:, None, None] + y[None] * torch.sin(theta)[:, None, None]
    phase = 2 * math.pi * freqs[None, :, None, None] * along[:, None]  # (n_theta, n_f, H, W)
    a = torch.einsum("khw,tfhw->ktf", f, torch.cos(phase))
    b = torch.einsum("khw,tfhw->ktf", f, torch.sin(phase))
    energy = torch.sqrt(a * a + b * b)
    return energy.amax(dim=2), theta


def orientedness(fields, *, n_orientations: int = 16, frequencies: Sequence[float] | None = None) -> Tensor:
    r"""``(R(theta_p) - R(theta_p + 90 deg)) / (R(theta_p) + R(theta_p + 90 deg))`` per channel,
    in ``[0, 1]`` (module docstring); ``(channels,)`` float64."""
    tuning, _ = orientation_tuning(fields, n_orientations=n_orientations, frequencies=frequencies)
    pref = tuning.argmax(dim=1)
    orth = (pref + n_orientations // 2) % n_orientations
    rows = torch.arange(len(tuning))
    rp, ro = tuning[rows, pref], tuning[rows, orth]
    total = rp + ro
    return torch.where(total > 0, (rp - ro) / total.clamp_min(1e-300), torch.zeros_like(total))


def radial_reconstruction(fields) -> tuple[Tensor, Tensor]:
    """``(S, centre)``: the ring-average reconstruction ``S`` ``(channels, H, W)`` about the
    energy centroid, and the centroids ``(channels, 2)`` as ``(row, column)``."""
    f = _as_fields(fields)
    k, h, w = f.shape
    rows = torch.arange(h, dtype=torch.float64).view(1, h, 1)
    cols = torch.arange(w, dtype=torch.float64).view(1, 1, w)
    energy = f * f
    total = energy.sum(dim=(1, 2))
    safe = total.clamp_min(1e-300)
    cy = torch.where(total > 0, (energy * rows).sum(dim=(1, 2)) / safe, torch.full_like(total, (h - 1) / 2))
    cx = torch.where(total > 0, (energy * cols).sum(dim=(1, 2)) / safe, torch.full_like(total, (w - 1) / 2))
    dist = torch.sqrt((rows - cy.view(-1, 1, 1)) ** 2 + (cols - cx.view(-1, 1, 1)) ** 2)
    ring = torch.round(dist).long().flatten(1)  # (k, H*W)
    n_rings = int(ring.max()) + 1
    sums = torch.zeros(k, n_rings, dtype=torch.float64).scatter_add_(1, ring, f.flatten(1))
    counts = torch.zeros(k, n_rings, dtype=torch.float64).scatter_add_(1, ring, torch.ones_like(f.flatten(1)))
    means = sums / counts.clamp_min(1)
    return means.gather(1, ring).view(k, h, w), torch.stack([cy, cx], dim=1)


def radial_fraction(fields) -> Tensor:
    """``||S||^2 / ||F||^2``: the fraction of each field's energy explained by its ring
    average about its energy centroid (module docstring); 0 for a zero field."""
    f = _as_fields(fields)
    s, _ = radial_reconstruction(f)
    total = (f * f).sum(dim=(1, 2))
    return torch.where(total > 0, (s * s).sum(dim=(1, 2)) / total.clamp_min(1e-300), torch.zeros_like(total))


SURROUND_GAIN = 20.0  # k: the minority-sign part counts fully from 1/k of the majority's mass


def centre_surround_index(fields) -> Tensor:
    r"""``radial_fraction * min(1, k min(M+, M-) / max(M+, M-))`` per channel, ``k = 20``, in
    ``[0, 1]`` (module docstring); ``(channels,)`` float64."""
    f = _as_fields(fields)
    s, _ = radial_reconstruction(f)
    total = (f * f).sum(dim=(1, 2))
    frac = torch.where(total > 0, (s * s).sum(dim=(1, 2)) / total.clamp_min(1e-300), torch.zeros_like(total))
    pos = s.clamp_min(0).sum(dim=(1, 2))
    neg = (-s).clamp_min(0).sum(dim=(1, 2))
    major = torch.maximum(pos, neg)
    rho = torch.where(major > 0, torch.minimum(pos, neg) / major.clamp_min(1e-300), torch.zeros_like(major))
    return frac * (SURROUND_GAIN * rho).clamp(max=1.0)


def field_dimensionality(fields) -> float:
    r"""``n^2 / sum_{k, l} <u_k, u_l>^2`` over the ``n`` live fields scaled to unit norm
    (module docstring): in ``[1, n]``; 0.0 when every field is zero."""
    f = _as_fields(fields).flatten(1)
    norms = f.norm(dim=1)
    live = f[norms > 0] / norms[norms > 0, None]
    if len(live) == 0:
        return 0.0
    gram = live @ live.t()
    return float(len(live) ** 2 / gram.pow(2).sum())
