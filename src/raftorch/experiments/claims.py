r"""A panel's claims, declared in its spec, decided from the runs of several seeds.

Every claim is about one metric (``metric``, default ``test_accuracy`` in percent) of points
picked by *selectors*: a mapping of ``series`` and grid values, e.g. ``{series: RAF, rank:
10}``, which must pick exactly one point (all its seeds). A point's sample is one number per
finished seed. Each claim gets one of four verdicts:

* **holds**: the whole 95% interval lies on the claim's side of its line;
* **fails**: the whole interval lies on the other side;
* **undecided**: the interval crosses the line (the seeds do not decide it; the result says
  how many seeds the observed spread suggests would, ``seeds_needed``);
* **not evaluated**: a point it needs has no finished run.

The intervals are those of :mod:`raftorch.experiments.stats`: for two points that share
seeds, the **paired** Student-t interval of the per-seed differences ``d_i = a_i - b_i`` over
their common seeds (``d_bar ± t_{0.975, n-1} s_d / sqrt(n)``); where they share fewer than two
seeds (or the claim says ``paired: false``), **Welch**'s interval; against a
number ``value``, the one-sample interval of ``a_i - value``. One seed gives no interval: undecided.
A verdict thus rests on the seed-to-seed spread, which is far larger than the last-digit
differences that the thread count or the CPU cause; where those would move a verdict, the
interval crosses the line and the claim is undecided. Types, with ``d = a - b`` (or ``a - value``):

``at_least``   ``d >= margin`` (``margin: -1`` reads "at most 1 point below b, or above
               it"): holds if ``lo >= margin``, fails if ``hi < margin``.
``at_most``    ``d <= margin``: holds if ``hi <= margin``, fails if ``lo > margin``.
``close``      ``|d| <= tolerance``, an equivalence test (two one-sided tests): holds if
               ``-tolerance <= lo`` and ``hi <= tolerance``; fails if ``lo > tolerance`` or
               ``hi < -tolerance``.
``ordered``    ``points: [p_1, ..., p_k]``: every step ``p_{j+1} - p_j >= -tolerance``
               ("lower rank, lower accuracy, gently"). Holds if every step holds at 95%
               (an intersection-union test: its error is at most that of one step, 2.5%);
               fails if some step fails at the Bonferroni-corrected level
               ``1 - 0.05 / (k - 1)`` (a union of k - 1 tests, family error at most 2.5%);
               undecided otherwise.
``min_x_grows`` for each value ``g`` of ``over`` (e.g. the number of classes K), the smallest
               ``x`` (e.g. rank) whose ``curve`` point is within ``tolerance`` of the
               ``reference`` point at the same ``g`` grows with ``g``. Each ``x`` at each
               ``g`` is the one-sided test ``curve - reference >= -tolerance`` at 95%
               (holds / fails / undecided), which bounds the minimal ``x``:
               ``low(g)`` = the first ``x`` whose test does not fail, ``high(g)`` = the first
               whose test holds (``inf`` if none). Holds if ``high(g) <= low(g')`` for every
               consecutive ``g < g'`` and ``high(first) < low(last)`` (never falls, and larger
               at the last ``g``); fails if some ``low(g) > high(g')`` (a certain fall) or
               ``high(last) <= low(first)``; undecided otherwise.

Statistical options of a claim: ``paired`` (default ``true``: pair the points' common seeds;
``false``: Welch, for points whose seeds share nothing, e.g. different data). A claim keeps the paper's meaning and its
margin; more seeds (``raftorch reproduce --decide``) decide it, never a wider margin.
``paper`` (text) is the paper's number for the report; ``source: ours`` marks a claim that
is ours rather than the paper's.
"""
from __future__ import annotations

import math
import statistics
from typing import Any

from raftorch.experiments import stats
from raftorch.experiments.stats import Interval, seed_values

TYPES = {"at_least": {"a", "b", "value", "margin"}, "at_most": {"a", "b", "value", "margin"},
         "close": {"a", "b", "value", "tolerance"}, "ordered": {"points", "tolerance"},
         "min_x_grows": {"x", "over", "curve", "reference", "tolerance"}}
COMMON = {"text", "type", "metric", "paper", "paired", "source"}
VERDICTS = ("holds", "fails", "undecided", "not evaluated")
HOLDS, FAILS, UNDECIDED, NOT_EVALUATED = VERDICTS


class MissingPoints(Exception):
    """Some points a claim needs have no finished run."""


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.2f}" if abs(v) >= 0.1 or v == 0 else f"{v:.4f}"


def signed(v: float) -> str:
    """A difference for the report: its sign and two decimals (four below 0.1)."""
    if not math.isfinite(v):
        return "+inf" if v > 0 else "-inf"
    return f"{v:+.2f}" if abs(v) >= 0.1 or v == 0 else f"{v:+.4f}"


def _label(sel: dict) -> str:
    rest = ", ".join(f"{k}={v}" for k, v in sel.items() if k != "series")
    return f"{sel.get('series', '?')}" + (f" ({rest})" if rest else "")


def matches(row: dict, sel: dict) -> bool:
    """Whether ``row`` has every value the selector ``sel`` names."""
    return all(str(row.get(k, "")) == str(v) for k, v in sel.items())


def point_prefix(point_id: str) -> str:
    """A run's point id without its seed (``raf_rank-10_s3`` -> ``raf_rank-10``, the point's
    :attr:`~raftorch.experiments.spec.Point.stem`)."""
    head, sep, seed = point_id.rpartition("_s")
    return head if sep and seed.isdigit() else point_id


class Table:
    """Finished runs (summary rows with ``status == "done"``) with the selector lookups."""

    def __init__(self, rows: list[dict], metric: str):
        self.all_rows = rows
        self.metric = metric

    def sample(self, sel: dict) -> dict[int, float]:
        """``{seed: metric}`` of the finished runs ``sel`` picks; :class:`MissingPoints` if none."""
        known = [r for r in self.all_rows if matches(r, sel)]
        got = seed_values(known, self.metric)
        if not got:
            why = (f"{len(known)} run(s) not finished or failed" if known else "no such run")
            raise MissingPoints(f"{_label(sel)}: {why}")
        return got

    def points(self, sel: dict) -> set[str]:
        """The point ids (without seed) whose runs ``sel`` picks."""
        return {point_prefix(str(r["point"])) for r in self.all_rows if matches(r, sel) and r.get("point")}

    def describe(self, sel: dict) -> str:
        """``sel``'s label with the mean ± sample std of the metric over the finished runs it picks and their
        number, ``(n=N)``; :class:`MissingPoints` if none."""
        v = list(self.sample(sel).values())
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{_label(sel)} {_fmt(statistics.fmean(v))} ± {_fmt(sd)} (n={len(v)})"


def one_sided(iv: Interval, line: float, side: str) -> str:
    """Verdict of ``d >= line`` (``side="ge"``) or ``d <= line`` (``"le"``) from ``iv``."""
    if side == "ge":
        return HOLDS if iv.lo >= line else FAILS if iv.hi < line else UNDECIDED
    return HOLDS if iv.hi <= line else FAILS if iv.lo > line else UNDECIDED


def equivalent(iv: Interval, tol: float) -> str:
    """Verdict of ``|d| <= tol`` from ``iv`` (module docstring)."""
    if -tol <= iv.lo and iv.hi <= tol:
        return HOLDS
    if iv.lo > tol or iv.hi < -tol:
        return FAILS
    return UNDECIDED


def _gap(iv: Interval, kind: str, line: float) -> float:
    """How far the estimate sits from the line it must clear to be decided."""
    if kind == "close":
        return abs(line - abs(iv.estimate))
    return abs(iv.estimate - line)


def _interval_text(iv: Interval) -> str:
    if iv.spread is None:
        return f"{signed(iv.estimate)} (n={iv.n}: no interval)"
    return f"{signed(iv.estimate)} [{signed(iv.lo)}, {signed(iv.hi)}] ({iv.method}, n={iv.n})"


def _compare(claim: dict, table: Table) -> dict:
    a = table.sample(claim["a"])
    points = table.points(claim["a"])
    if "b" in claim:
        b, ref = table.sample(claim["b"]), table.describe(claim["b"])
        points |= table.points(claim["b"])
    else:
        b, ref = None, _fmt(float(claim["value"]))
    iv = stats.difference(a, b, claim.get("value"), claim.get("paired", True))
    kind = claim["type"]
    if kind == "close":
        line = float(claim.get("tolerance", 1.0))
        verdict, rule = equivalent(iv, line), f"|a - b| <= {_fmt(line)}"
    else:
        line = float(claim.get("margin", 0.0))
        side = "ge" if kind == "at_least" else "le"
        verdict, rule = one_sided(iv, line, side), f"a - b {'>=' if side == 'ge' else '<='} {signed(line)}"
    measured = f"{table.describe(claim['a'])} vs {ref}: a - b = {_interval_text(iv)}; claim: {rule}"
    needed = stats.seeds_to_decide(iv, _gap(iv, kind, line)) if verdict == UNDECIDED else None
    values = {"a": statistics.fmean(a.values()), "b": statistics.fmean(b.values()) if b else float(claim["value"]),
              "difference": iv.estimate, "interval": [iv.lo, iv.hi], "line": line, "interval_detail": iv.as_dict()}
    return {"verdict": verdict, "measured": measured, "values": values, "n": iv.n, "estimate": iv.estimate,
            "lo": iv.lo, "hi": iv.hi, "line": line, "method": iv.method, "seeds_needed": needed, "points": points}


def _ordered(claim: dict, table: Table) -> dict:
    tol = float(claim.get("tolerance", 0.0))
    sels = claim["points"]
    samples = [table.sample(sel) for sel in sels]
    k = len(sels)
    family_alpha = stats.ALPHA / (k - 1)
    steps, texts, verdicts, needed = [], [], [], []
    paired = claim.get("paired", True)
    for (s0, a0), (s1, a1) in zip(zip(sels, samples), zip(sels[1:], samples[1:])):
        iv = stats.difference(a1, a0, pair=paired)
        strict = stats.difference(a1, a0, pair=paired, alpha=family_alpha)
        v = HOLDS if iv.lo >= -tol else FAILS if strict.hi < -tol else UNDECIDED
        verdicts.append(v)
        if v == UNDECIDED:
            needed.append(stats.seeds_to_decide(iv, abs(iv.estimate + tol)))
        texts.append(_interval_text(iv))
        steps.append({"from": _label(s0), "to": _label(s1), "difference": iv.estimate, "interval": [iv.lo, iv.hi],
                      "bonferroni_interval": [strict.lo, strict.hi], "n": iv.n, "method": iv.method, "verdict": v})
    verdict = FAILS if FAILS in verdicts else HOLDS if all(v == HOLDS for v in verdicts) else UNDECIDED
    text = "; ".join(f"{s['to']} - {s['from']} = {t} {s['verdict']}" for s, t in zip(steps, texts))
    means = [statistics.fmean(s.values()) for s in samples]
    worst = min(steps, key=lambda s: s["interval"][0])
    points = set().union(*(table.points(sel) for sel in sels))
    return {"verdict": verdict, "measured": f"{text} (each step must be >= {signed(-tol)})",
            "values": {"means": means, "steps": steps}, "n": min(s["n"] for s in steps),
            "estimate": worst["difference"], "lo": worst["interval"][0], "hi": worst["interval"][1], "line": -tol,
            "method": worst["method"], "seeds_needed": _max_needed(needed), "points": points}


def _max_needed(needed: list) -> int | None:
    known = [n for n in needed if n is not None]
    return max(known) if known else None


def _min_x_grows(claim: dict, table: Table) -> dict:
    x, over, tol = claim["x"], claim["over"], float(claim.get("tolerance", 1.0))
    groups = sorted({r[over] for r in table.all_rows if matches(r, claim["curve"]) and r.get(over) not in (None, "")},
                    key=_num)
    if not groups:
        raise MissingPoints(f"{_label(claim['curve'])}: no runs")
    bounds, parts, needed, points, tests = [], [], [], set(), {}
    paired = claim.get("paired", True)
    for g in groups:
        ref_sel = {**claim["reference"], over: g}
        ref = table.sample(ref_sel)
        xs = sorted({r[x] for r in table.all_rows if matches(r, {**claim["curve"], over: g})}, key=_num)
        low = high = math.inf
        for v in xs:
            sel = {**claim["curve"], over: g, x: v}
            iv = stats.difference(table.sample(sel), ref, pair=paired)
            verdict = one_sided(iv, -tol, "ge")
            tests[f"{over}={g}, {x}={v}"] = {"difference": iv.estimate, "interval": [iv.lo, iv.hi], "verdict": verdict}
            if verdict == UNDECIDED:
                needed.append(stats.seeds_to_decide(iv, abs(iv.estimate + tol)))
                points |= table.points(sel) | table.points(ref_sel)
            if verdict != FAILS and low == math.inf:
                low = _num(v)
            if verdict == HOLDS and high == math.inf:
                high = _num(v)
        bounds.append((low, high))
        parts.append(f"{over}={g}: minimal {x} " + (f"{low:g}" if low == high else f"in [{low:g}, {high:g}]"))
    steps = list(zip(bounds, bounds[1:]))
    if all(hi0 <= lo1 for (_, hi0), (lo1, _) in steps) and bounds[0][1] < bounds[-1][0]:
        verdict = HOLDS
    elif any(lo0 > hi1 for (lo0, _), (_, hi1) in steps) or bounds[-1][1] <= bounds[0][0]:
        verdict = FAILS
    else:
        verdict = UNDECIDED
    return {"verdict": verdict, "measured": "; ".join(parts) + f" (within {_fmt(tol)} of the reference, 95% one-sided)",
            "values": {"minimal": {str(g): [lo, hi] for g, (lo, hi) in zip(groups, bounds)}, "tests": tests},
            "n": None, "estimate": None, "lo": None, "hi": None, "line": -tol, "method": "paired" if paired else "welch",
            "seeds_needed": _max_needed(needed) if verdict == UNDECIDED else None,
            "points": points if verdict == UNDECIDED else set()}


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.inf


EVALUATORS = {"at_least": _compare, "at_most": _compare, "close": _compare, "ordered": _ordered,
              "min_x_grows": _min_x_grows}


def evaluate_claims(claims: list[dict], rows: list[dict]) -> list[dict[str, Any]]:
    """One result per claim: ``claim`` (text), ``verdict`` (:data:`VERDICTS`), ``measured``
    (the numbers, in words), ``estimate``, ``lo``, ``hi`` (the 95% interval of the difference
    or, for ``ordered``, of its weakest step), ``line``, ``n``, ``method``, ``seeds_needed``
    (undecided claims), ``points`` (the point ids, without seed, an undecided claim needs
    more seeds of), ``values``, ``paper``, ``source``, ``threads`` (the thread counts of the panel's
    runs read)."""
    threads = sorted({str(r.get("threads")) for r in rows if r.get("status") == "done"
                      and r.get("threads") not in (None, "")})
    results = []
    for claim in claims:
        table = Table(rows, claim.get("metric", "test_accuracy"))
        out = {"claim": claim["text"], "type": claim["type"], "paper": claim.get("paper", ""),
               "source": claim.get("source", "paper"), "metric": table.metric}
        try:
            got = EVALUATORS[claim["type"]](claim, table)
            if got["verdict"] != UNDECIDED:
                got["points"] = set()
            got["points"] = sorted(got["points"])
            out.update(got)
        except MissingPoints as exc:
            out.update(verdict=NOT_EVALUATED, measured=f"not evaluated: {exc}", values={}, n=None, estimate=None,
                       lo=None, hi=None, line=None, method=None, seeds_needed=None, points=[])
        for key in ("lo", "hi", "estimate"):
            if isinstance(out.get(key), float) and not math.isfinite(out[key]):
                out[key] = None
        out["threads"] = threads
        results.append(out)
    return results
