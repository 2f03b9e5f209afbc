"""The statistics a claim is decided by, against hand-computed cases."""
import math

import pytest

from raftorch.experiments import claims as C
from raftorch.experiments import stats

T_975_2 = 4.302652729749462  # Student t quantiles (tables): df = 2, 5, 6
T_975_5 = 2.5705818356363146
T_975_6 = 2.4469118511449786


def test_t_quantiles_are_the_table_values():
    assert stats.t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)
    assert stats.t_quantile(0.975, 2) == pytest.approx(T_975_2, abs=1e-9)
    assert stats.t_quantile(0.975, 9) == pytest.approx(2.2622, abs=1e-4)


def test_paired_interval_on_known_numbers():
    a, b = {0: 80.0, 1: 81.0, 2: 83.0}, {0: 79.0, 1: 81.0, 2: 81.0}  # d = 1, 0, 2: mean 1, sd 1
    iv = stats.paired(a, b)
    half = T_975_2 * 1.0 / math.sqrt(3)
    assert (iv.estimate, iv.n, iv.method, iv.df) == (1.0, 3, "paired", 2)
    assert iv.lo == pytest.approx(1 - half, abs=1e-12) and iv.hi == pytest.approx(1 + half, abs=1e-12)
    assert iv.spread == pytest.approx(1.0)


def test_pairing_removes_the_shared_seed_spread_that_welch_keeps():
    a = {0: 70.0, 1: 80.0, 2: 90.0}
    b = {s: v - 1.0 + 0.1 * s for s, v in a.items()}  # same seed effect, a small consistent gap
    assert stats.paired(a, b).width < 1.0 < stats.welch(a, b).width


def test_welch_interval_and_degrees_of_freedom_on_known_numbers():
    a, b = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}, {0: 2.0, 1: 4.0, 2: 6.0}
    iv = stats.welch(a, b)
    ua, ub = (5 / 3) / 4, 4 / 3  # s_a^2 / n_a, s_b^2 / n_b
    df = (ua + ub) ** 2 / (ua ** 2 / 3 + ub ** 2 / 2)
    assert df == pytest.approx(3.234718826, abs=1e-8) and iv.df == pytest.approx(df)
    half = stats.t_quantile(0.975, df) * math.sqrt(ua + ub)
    assert half == pytest.approx(4.042328, abs=1e-5)
    assert (iv.estimate, iv.method) == (-1.5, "welch")
    assert iv.lo == pytest.approx(-1.5 - half) and iv.hi == pytest.approx(-1.5 + half)


def test_points_sharing_fewer_than_two_seeds_use_welch():
    assert stats.difference({0: 1.0, 1: 2.0}, {0: 1.5, 1: 2.5}).method == "paired"
    assert stats.difference({0: 1.0, 1: 2.0}, {5: 1.5, 6: 2.5}).method == "welch"
    assert stats.difference({0: 1.0, 1: 2.0}, {0: 1.5, 1: 2.5}, pair=False).method == "welch"
    assert stats.difference({0: 1.0, 1: 2.0}, None, value=1.0).method == "one-sample"


# --------------------------------------------------------------------------- verdicts

def rows_of(samples: dict[str, dict[int, float]]) -> list[dict]:
    return [{"point": f"{name.lower()}_s{seed}", "series": name, "seed": seed, "status": "done",
             "test_accuracy": v, "threads": 1} for name, sample in samples.items() for seed, v in sample.items()]


KNOWN = rows_of({"A": {0: 80.0, 1: 81.0, 2: 83.0}, "B": {0: 79.0, 1: 81.0, 2: 81.0}})
HALF = T_975_2 / math.sqrt(3)  # the interval of A - B is 1 ± HALF = [-1.484, 3.484]


def decide(rows=KNOWN, **claim):
    return C.evaluate_claims([{"text": "t", "a": {"series": "A"}, "b": {"series": "B"}, **claim}], rows)[0]


@pytest.mark.parametrize("margin, verdict", [(1 - HALF - 1e-9, "holds"), (1 - HALF + 1e-6, "undecided"),
                                             (1 + HALF - 1e-6, "undecided"), (1 + HALF + 1e-6, "fails")])
def test_at_least_at_its_boundaries(margin, verdict):
    r = decide(type="at_least", margin=margin)
    assert r["verdict"] == verdict
    assert r["lo"] == pytest.approx(1 - HALF) and r["hi"] == pytest.approx(1 + HALF) and r["n"] == 3


@pytest.mark.parametrize("margin, verdict", [(1 + HALF + 1e-9, "holds"), (1 + HALF - 1e-6, "undecided"),
                                             (1 - HALF + 1e-6, "undecided"), (1 - HALF - 1e-6, "fails")])
def test_at_most_mirrors_at_least(margin, verdict):
    assert decide(type="at_most", margin=margin)["verdict"] == verdict


def test_a_line_touching_a_degenerate_interval_is_on_the_claims_side():
    rows = rows_of({"A": {0: 5.0, 1: 5.0}, "B": {0: 4.0, 1: 4.0}})  # every seed: a - b = 1 exactly
    assert decide(rows, type="at_least", margin=1.0)["verdict"] == "holds"
    assert decide(rows, type="at_least", margin=1.0 + 1e-9)["verdict"] == "fails"
    assert decide(rows, type="at_most", margin=1.0)["verdict"] == "holds"
    assert decide(rows, type="close", tolerance=1.0)["verdict"] == "holds"
    assert decide(rows, type="close", tolerance=0.999)["verdict"] == "fails"


@pytest.mark.parametrize("tolerance, verdict", [(1 + HALF + 1e-6, "holds"), (3.0, "undecided"),
                                                (0.5, "undecided")])
def test_close_is_an_equivalence_test(tolerance, verdict):
    assert decide(type="close", tolerance=tolerance)["verdict"] == verdict


def test_close_fails_when_the_whole_interval_is_outside_the_tolerance():
    rows = rows_of({"A": {0: 90.0, 1: 91.0, 2: 92.0}, "B": {0: 80.0, 1: 80.5, 2: 81.5}})
    r = decide(rows, type="close", tolerance=1.0)
    assert r["verdict"] == "fails" and r["lo"] > 1.0


def test_a_single_seed_cannot_decide_a_claim_and_asks_for_a_second():
    rows = rows_of({"A": {0: 90.0}, "B": {0: 10.0}})
    r = decide(rows, type="at_least", margin=0.0)
    assert r["verdict"] == "undecided" and r["lo"] is None and r["hi"] is None and r["seeds_needed"] == 2
    assert r["points"] == ["a", "b"]


def test_seeds_needed_follows_the_observed_spread():
    # d = 1 ± 1 (sd): t_{n-1} / sqrt(n) < 1 first at n = 7 (2.447 / 2.646), not at n = 6 (2.571 / 2.449)
    assert T_975_6 / math.sqrt(7) < 1 < T_975_5 / math.sqrt(6)
    r = decide(type="at_least", margin=0.0)
    assert r["verdict"] == "undecided" and r["seeds_needed"] == 7
    on_the_line = decide(type="at_least", margin=1.0)
    assert on_the_line["verdict"] == "undecided" and on_the_line["seeds_needed"] is None


def test_a_value_claim_uses_the_one_sample_interval():
    r = C.evaluate_claims([{"text": "t", "type": "at_least", "a": {"series": "A"}, "value": 79.0}], KNOWN)[0]
    s = math.sqrt(7 / 3)  # values 80, 81, 83: mean 81.333, sd 1.528
    half = T_975_2 * s / math.sqrt(3)
    assert r["estimate"] == pytest.approx(81 + 1 / 3 - 79) and r["lo"] == pytest.approx(r["estimate"] - half)
    assert r["verdict"] == "undecided"  # lo = 2.333 - 3.795 < 0


# --------------------------------------------------------------------------- ordered, min_x_grows

def ordered(samples, tolerance=0.0):
    names = list(samples)
    return C.evaluate_claims([{"text": "t", "type": "ordered", "tolerance": tolerance,
                               "points": [{"series": n} for n in names]}], rows_of(samples))[0]


def test_ordered_holds_only_when_every_step_holds():
    r = ordered({"R1": {0: 50.0, 1: 52.0, 2: 54.0}, "R2": {0: 70.0, 1: 71.0, 2: 73.0},
                 "R10": {0: 80.0, 1: 80.5, 2: 82.0}})
    assert r["verdict"] == "holds" and [s["verdict"] for s in r["values"]["steps"]] == ["holds", "holds"]


def test_ordered_fails_on_one_step_below_the_line_at_the_bonferroni_level():
    # the second step: d = -5 ± 0.5 (sd): far below -1 even at the corrected level
    r = ordered({"R1": {0: 50.0, 1: 52.0, 2: 54.0}, "R2": {0: 70.0, 1: 71.0, 2: 73.0},
                 "R10": {0: 65.0, 1: 66.5, 2: 67.5}}, tolerance=1.0)
    steps = r["values"]["steps"]
    assert r["verdict"] == "fails" and steps[1]["verdict"] == "fails"
    lo_b, hi_b = steps[1]["bonferroni_interval"]
    lo, hi = steps[1]["interval"]
    assert lo_b < lo and hi < hi_b  # the corrected interval (level 1 - 0.05 / 2) is wider


def test_ordered_step_between_the_two_levels_is_undecided_not_failed():
    # d = (-2, -2.6, -1.4): mean -2, sd 0.6; 95% hi = -2 + 4.303*0.346 = -0.51;
    # Bonferroni (97.5%) hi = -2 + 6.205*0.346 = +0.15: below -1 only at 95%
    d = [-2.0, -2.6, -1.4]
    samples = {"R1": {0: 50.0, 1: 52.0, 2: 54.0}, "R2": {0: 70.0, 1: 71.0, 2: 73.0},
               "R3": {s: 70.0 + [0, 1, 3][s] + d[s] for s in range(3)}}
    r = ordered(samples, tolerance=0.2)
    step = r["values"]["steps"][1]
    assert step["interval"][1] < -0.2 < step["bonferroni_interval"][1]
    assert step["verdict"] == "undecided" and r["verdict"] == "undecided"


def curve_rows(accs: dict[int, dict], ref: dict[int, float], seeds=(0, 1, 2), jitter=0.1):
    rows = []
    for k, by_rank in accs.items():
        for s in seeds:
            rows.append({"point": f"bp_k-{k}_s{s}", "series": "BP", "K": k, "rank": "", "seed": s, "status": "done",
                         "test_accuracy": ref[k] + jitter * s})
            rows += [{"point": f"raf_k-{k}_rank-{r}_s{s}", "series": "RAF", "K": k, "rank": r, "seed": s,
                      "status": "done", "test_accuracy": a + jitter * s + 0.05 * (s == 1) * r} for r, a in by_rank.items()]
    return rows


MIN_X = {"text": "t", "type": "min_x_grows", "x": "rank", "over": "K", "curve": {"series": "RAF"},
         "reference": {"series": "BP"}, "tolerance": 1.0}


def test_min_x_grows_holds_when_the_decided_minimal_rank_grows():
    rows = curve_rows({3: {1: 90, 2: 95, 3: 95}, 10: {1: 50, 2: 70, 3: 80, 10: 85}}, {3: 95, 10: 85})
    r = C.evaluate_claims([MIN_X], rows)[0]
    assert r["verdict"] == "holds" and r["values"]["minimal"] == {"3": [2, 2], "10": [10, 10]}


def test_min_x_grows_fails_when_every_rank_matches_everywhere():
    rows = curve_rows({3: {1: 95, 2: 95}, 10: {1: 85, 2: 85}}, {3: 95, 10: 85})
    r = C.evaluate_claims([MIN_X], rows)[0]
    assert r["verdict"] == "fails" and r["values"]["minimal"] == {"3": [1, 1], "10": [1, 1]}


def test_min_x_grows_is_undecided_where_the_minimal_rank_is_not_pinned_down():
    rows = curve_rows({3: {1: 95, 2: 95}, 10: {1: 85, 2: 85}}, {3: 95, 10: 85}, seeds=(0,))  # one seed: no test decides
    r = C.evaluate_claims([MIN_X], rows)[0]
    assert r["verdict"] == "undecided" and r["seeds_needed"] == 2 and r["points"]


def test_a_claim_on_missing_or_failed_points_is_not_evaluated():
    rows = KNOWN + [{"point": "c_s0", "series": "C", "seed": 0, "status": "failed", "test_accuracy": ""}]
    r = C.evaluate_claims([{"text": "t", "type": "at_least", "a": {"series": "C"}, "value": 0.0}], rows)[0]
    assert r["verdict"] == "not evaluated" and "not finished or failed" in r["measured"]
    r = C.evaluate_claims([{"text": "t", "type": "at_least", "a": {"series": "KP"}, "value": 0.0}], rows)[0]
    assert r["verdict"] == "not evaluated" and "no such run" in r["measured"]
