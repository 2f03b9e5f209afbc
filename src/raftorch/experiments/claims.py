"""A panel's claims, declared in its spec, checked on the aggregated numbers.

Every claim compares means over seeds of one metric (``metric``, default ``test_accuracy`` in
percent) of points picked by *selectors*: a mapping of ``series`` and grid values, e.g.
``{series: RAF, rank: 10}``, which must pick exactly one point (all its seeds). Types:

``at_least``   ``mean(a) >= mean(b) + margin`` (``b`` a selector, or ``value`` a number);
               ``margin: -1`` reads "at most 1 point below b, or above it".
``at_most``    ``mean(a) <= mean(b) + margin``.
``close``      ``|mean(a) - mean(b)| <= tolerance``.
``ordered``    ``points: [s1, s2, ...]``: each mean at least the previous one minus
               ``tolerance`` ("lower rank, lower accuracy, gently").
``min_x_grows`` for each value ``g`` of ``over`` (e.g. the number of classes K), the smallest
               ``x`` (e.g. rank) whose ``curve`` point is within ``tolerance`` of the
               ``reference`` point at the same ``g``; passes when that minimal x never falls
               as ``g`` grows and is larger at the last ``g`` than at the first.

A claim whose points are missing or failed is *not evaluated* (``passed: null``) and says
which points are missing; it never passes by default. ``paper`` (text) is the paper's number
for the report.
"""
from __future__ import annotations

import math
from typing import Any

from raftorch.experiments.aggregate import done_values, mean_std

TYPES = {"at_least": {"a", "b", "value", "margin"}, "at_most": {"a", "b", "value", "margin"},
         "close": {"a", "b", "value", "tolerance"}, "ordered": {"points", "tolerance"},
         "min_x_grows": {"x", "over", "curve", "reference", "tolerance"}}
COMMON = {"text", "type", "metric", "paper"}


class MissingPoints(Exception):
    """Some points a claim needs have no finished run."""


def _fmt(v: float) -> str:
    return f"{v:.2f}" if abs(v) >= 0.1 or v == 0 else f"{v:.4f}"


def _signed(v: float) -> str:
    return f"{v:+.2f}" if abs(v) >= 0.1 or v == 0 else f"{v:+.4f}"


def _label(sel: dict) -> str:
    rest = ", ".join(f"{k}={v}" for k, v in sel.items() if k != "series")
    return f"{sel.get('series', '?')}" + (f" ({rest})" if rest else "")


def _matches(row: dict, sel: dict) -> bool:
    return all(str(row.get(k, "")) == str(v) for k, v in sel.items())


class Table:
    """Finished runs (summary rows with ``status == "done"``) with the selector lookups."""

    def __init__(self, rows: list[dict], metric: str):
        self.all_rows = rows
        self.metric = metric

    def stat(self, sel: dict) -> tuple[float, float, int]:
        """(mean, std, n) of the finished runs ``sel`` picks; :class:`MissingPoints` if none."""
        known = [r for r in self.all_rows if _matches(r, sel)]
        st = mean_std(done_values(known, self.metric))
        if st is None:
            why = (f"{len(known)} run(s) not finished or failed" if known else "no such run")
            raise MissingPoints(f"{_label(sel)}: {why}")
        return st

    def describe(self, sel: dict) -> str:
        m, s, n = self.stat(sel)
        return f"{_label(sel)} {_fmt(m)} ± {_fmt(s)} (n={n})"


def _compare(claim: dict, table: Table) -> tuple[bool, str, dict]:
    m_a = table.stat(claim["a"])[0]
    if "b" in claim:
        m_b, ref = table.stat(claim["b"])[0], table.describe(claim["b"])
    else:
        m_b, ref = float(claim["value"]), _fmt(float(claim["value"]))
    kind, diff = claim["type"], m_a - m_b
    if kind == "at_least":
        margin = float(claim.get("margin", 0.0))
        ok, rule = diff >= margin, f"a - b = {_signed(diff)} >= {_signed(margin)}"
    elif kind == "at_most":
        margin = float(claim.get("margin", 0.0))
        ok, rule = diff <= margin, f"a - b = {_signed(diff)} <= {_signed(margin)}"
    else:
        tol = float(claim.get("tolerance", 1.0))
        ok, rule = abs(diff) <= tol, f"|a - b| = {_fmt(abs(diff))} <= {_fmt(tol)}"
    return ok, f"{table.describe(claim['a'])} vs {ref}: {rule}", {"a": m_a, "b": m_b, "difference": diff}


def _ordered(claim: dict, table: Table) -> tuple[bool, str, dict]:
    tol = float(claim.get("tolerance", 0.0))
    means = [table.stat(sel)[0] for sel in claim["points"]]
    ok = all(later >= earlier - tol for earlier, later in zip(means, means[1:]))
    text = " <= ".join(table.describe(sel) for sel in claim["points"])
    return ok, f"{text} (each step may fall by at most {tol:.2f})", {"means": means}


def _min_x_grows(claim: dict, table: Table) -> tuple[bool, str, dict]:
    x, over, tol = claim["x"], claim["over"], float(claim.get("tolerance", 1.0))
    groups = sorted({r[over] for r in table.all_rows if _matches(r, claim["curve"]) and r.get(over) not in (None, "")},
                    key=_num)
    if not groups:
        raise MissingPoints(f"{_label(claim['curve'])}: no runs")
    minimal: dict[Any, Any] = {}
    parts = []
    for g in groups:
        ref = table.stat({**claim["reference"], over: g})[0]
        xs = sorted({r[x] for r in table.all_rows if _matches(r, {**claim["curve"], over: g})}, key=_num)
        within = [v for v in xs if table.stat({**claim["curve"], over: g, x: v})[0] >= ref - tol]
        minimal[g] = within[0] if within else math.inf
        parts.append(f"{over}={g}: minimal {x} {minimal[g]} (reference {_fmt(ref)})")
    seq = [_num(minimal[g]) for g in groups]
    ok = all(b >= a for a, b in zip(seq, seq[1:])) and seq[-1] > seq[0]
    return ok, "; ".join(parts) + f" (within {tol:.2f} of the reference)", {"minimal": {str(k): v for k, v in minimal.items()}}


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.inf


EVALUATORS = {"at_least": _compare, "at_most": _compare, "close": _compare, "ordered": _ordered,
              "min_x_grows": _min_x_grows}


def evaluate_claims(claims: list[dict], rows: list[dict]) -> list[dict[str, Any]]:
    """One result per claim: ``claim`` (text), ``passed`` (True / False / None when not
    evaluated), ``measured`` (the numbers, in words), ``values``, ``paper``."""
    results = []
    for claim in claims:
        table = Table(rows, claim.get("metric", "test_accuracy"))
        out = {"claim": claim["text"], "type": claim["type"], "paper": claim.get("paper", ""),
               "metric": table.metric}
        try:
            ok, measured, values = EVALUATORS[claim["type"]](claim, table)
            out.update(passed=bool(ok), measured=measured, values=values)
        except MissingPoints as exc:
            out.update(passed=None, measured=f"not evaluated: {exc}", values={})
        results.append(out)
    return results


def check_claim_specs(panel) -> None:
    """Raise a :class:`~raftorch.experiments.spec.SpecError` for a malformed claim, or (for
    training panels) a selector that does not pick exactly one point of the panel."""
    from raftorch.experiments.spec import SpecError

    keys = None
    if panel.kind == "train":
        keys = [dict(series=s, **dict(values)) for s, values in {p.key for p in panel.points()}]
    for i, claim in enumerate(panel.claims):
        where = f"{panel.path}: claim {i + 1}"
        if not isinstance(claim, dict) or "type" not in claim or "text" not in claim:
            raise SpecError(f"{where}: a claim needs 'text' and 'type' ({', '.join(TYPES)})")
        if claim["type"] not in TYPES:
            raise SpecError(f"{where}: unknown claim type {claim['type']!r}; choose one of {', '.join(TYPES)}")
        unknown = sorted(set(claim) - TYPES[claim["type"]] - COMMON)
        if unknown:
            raise SpecError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} for type "
                            f"{claim['type']!r}; known: {', '.join(sorted(TYPES[claim['type']] | COMMON))}")
        kind = claim["type"]
        if kind in ("at_least", "at_most", "close"):
            if "a" not in claim or ("b" in claim) == ("value" in claim):
                raise SpecError(f"{where}: {kind} needs 'a' and exactly one of 'b' (a selector) or 'value'")
            selectors = [claim["a"]] + ([claim["b"]] if "b" in claim else [])
        elif kind == "ordered":
            if not isinstance(claim.get("points"), list) or len(claim["points"]) < 2:
                raise SpecError(f"{where}: ordered needs 'points', a list of at least two selectors")
            selectors = claim["points"]
        else:
            missing = {"x", "over", "curve", "reference"} - set(claim)
            if missing:
                raise SpecError(f"{where}: min_x_grows needs {', '.join(sorted(missing))}")
            selectors = []
        for sel in selectors:
            if not isinstance(sel, dict) or "series" not in sel:
                raise SpecError(f"{where}: a selector is a mapping with 'series' and grid values, got {sel!r}")
            if keys is not None:
                n = sum(_matches(k, sel) for k in keys)
                if n != 1:
                    raise SpecError(f"{where}: selector {sel} picks {n} points of the panel; it must pick "
                                    f"exactly one (name the series and every grid value)")
