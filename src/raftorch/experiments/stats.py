r"""Confidence intervals for a difference of two points measured over a few seeds.

A *sample* is one number per seed (``{seed: value}``). Three intervals, all two-sided at level
``1 - alpha`` (``alpha = 0.05`` by default, so each one-sided decision errs at most 2.5%):

**Paired** (two points that share their seeds: same seed = same initial weights and batches)::

    d_i = a_i - b_i,   d_bar = mean(d),   s_d = sample std of d (n - 1),
    se = s_d / sqrt(n),   d_bar ± t_{1 - alpha/2, n - 1} · se

**Welch** (points that share fewer than two seeds, or a claim that asks ``paired: false``)::

    se^2 = s_a^2 / n_a + s_b^2 / n_b,
    df = se^4 / ((s_a^2 / n_a)^2 / (n_a - 1) + (s_b^2 / n_b)^2 / (n_b - 1))   (Welch-Satterthwaite),
    (mean_a - mean_b) ± t_{1 - alpha/2, df} · se

**One sample** (a point against a number ``v``): ``a_i - v`` as a paired sample.

With one seed on a side there is no spread and no interval (``lo = -inf``, ``hi = +inf``:
every claim on it is undecided). A spread of exactly 0 (every seed equal, as counts of
recovered modes often are) gives the degenerate interval ``[d_bar, d_bar]``.

**Seeds that would decide** a claim whose interval crosses its line at distance
``g = |d_bar - line|``: the smallest ``n`` with ``t_{1 - alpha/2, n - 1} · s / sqrt(n) < g``
(``s = s_d`` paired; ``s = sqrt(s_a^2 + s_b^2)`` with ``n`` seeds on each side for Welch,
``df = 2n - 2``), taking the observed spread as the truth; 2 while there is one seed (no
spread yet); ``None`` when ``g = 0`` (the mean sits on the line: no number of seeds is
expected to decide it).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

from scipy import stats as _sp

ALPHA = 0.05
NO_DECISION = 10_000  # an n beyond any cap: "more seeds than it is sensible to run"


def t_quantile(q: float, df: float) -> float:
    """Student's t quantile (``t_quantile(0.975, 1) = 12.706``)."""
    return float(_sp.t.ppf(q, df))


@dataclass(frozen=True)
class Interval:
    """An estimate of ``a - b`` (or ``a - v``) with its two-sided interval."""

    estimate: float
    lo: float
    hi: float
    n: int  # paired / one-sample: the seeds; Welch: the smaller side's seeds
    method: str  # paired | welch | one-sample
    spread: float | None  # s_d (paired, one-sample) or sqrt(s_a^2 + s_b^2) (Welch); None with n < 2
    df: float | None = None
    level: float = 1 - ALPHA

    @property
    def width(self) -> float:
        return self.hi - self.lo

    def as_dict(self) -> dict:
        """The fields as a JSON-ready dict, a non-finite float (an unbounded interval end) as ``None``."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def paired(a: dict, b: dict, alpha: float = ALPHA) -> Interval:
    """Interval of ``a - b`` over the seeds both samples have."""
    seeds = sorted(set(a) & set(b))
    return _one([a[s] - b[s] for s in seeds], "paired", alpha)


def one_sample(a: dict, value: float, alpha: float = ALPHA) -> Interval:
    """Interval of ``a - value``."""
    return _one([v - value for v in a.values()], "one-sample", alpha)


def _one(d: list[float], method: str, alpha: float) -> Interval:
    n = len(d)
    if n == 0:
        raise ValueError("no values to compare")
    mean = statistics.fmean(d)
    if n == 1:
        return Interval(mean, -math.inf, math.inf, 1, method, None, None, 1 - alpha)
    s = _sd(d)
    half = t_quantile(1 - alpha / 2, n - 1) * s / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, method, s, n - 1, 1 - alpha)


def welch(a: dict, b: dict, alpha: float = ALPHA) -> Interval:
    """Welch's interval of ``mean(a) - mean(b)`` (seeds need not match)."""
    va, vb = list(a.values()), list(b.values())
    if not va or not vb:
        raise ValueError("no values to compare")
    na, nb = len(va), len(vb)
    mean = statistics.fmean(va) - statistics.fmean(vb)
    if na < 2 or nb < 2:
        return Interval(mean, -math.inf, math.inf, min(na, nb), "welch", None, None, 1 - alpha)
    ua, ub = _sd(va) ** 2 / na, _sd(vb) ** 2 / nb
    spread = math.sqrt(_sd(va) ** 2 + _sd(vb) ** 2)
    if ua + ub == 0:
        return Interval(mean, mean, mean, min(na, nb), "welch", 0.0, None, 1 - alpha)
    df = (ua + ub) ** 2 / (ua ** 2 / (na - 1) + ub ** 2 / (nb - 1))
    half = t_quantile(1 - alpha / 2, df) * math.sqrt(ua + ub)
    return Interval(mean, mean - half, mean + half, min(na, nb), "welch", spread, df, 1 - alpha)


def difference(a: dict, b: dict | None, value: float | None = None, pair: bool = True,
               alpha: float = ALPHA) -> Interval:
    """The interval of ``a - b`` (or ``a - value`` where ``b`` is None): paired over the seeds
    both samples have where there are at least two and ``pair`` is true, Welch otherwise."""
    if b is None:
        return one_sample(a, float(value), alpha)
    if pair and len(set(a) & set(b)) >= 2:
        return paired(a, b, alpha)
    return welch(a, b, alpha)


def seeds_to_decide(iv: Interval, gap: float, alpha: float = ALPHA, cap: int = NO_DECISION) -> int | None:
    """The seeds per point at which the interval's half-width drops below ``gap`` (module
    docstring), at least ``iv.n + 1`` (2 when there is no spread yet: one seed); ``None`` when
    ``gap`` is 0 (the mean on the line); :data:`NO_DECISION` when more than ``cap`` would be needed."""
    if gap <= 0 or not math.isfinite(gap):
        return None
    if iv.spread is None:  # one seed: a second one gives the first spread
        return max(2, iv.n + 1)
    if iv.spread == 0:
        return iv.n + 1
    for n in range(max(iv.n + 1, 2), cap + 1):
        df = 2 * n - 2 if iv.method == "welch" else n - 1
        if t_quantile(1 - alpha / 2, df) * iv.spread / math.sqrt(n) < gap:
            return n
    return NO_DECISION


def seed_values(rows: list[dict], metric: str) -> dict[int, float]:
    """``{seed: metric}`` of the finished runs among ``rows`` (a point's sample for the statistics)."""
    return {int(r["seed"]): float(r[metric]) for r in rows
            if r.get("status") == "done" and r.get(metric) not in (None, "")}
