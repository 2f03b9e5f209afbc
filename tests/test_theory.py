"""Tests of raftorch.theory: the linear theory of the paper's section 3 and appendix A.

Exact oracles: Saxe et al.'s closed form for BP, the closed form of Oja's subspace flow,
and the fixed points derived in ``raftorch/theory/rules.py``. The SGD simulation and the ODE
were written independently, so their agreement checks both.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from raftorch.theory import (
    Figure2Config, LinearTask, Weights, draw_figure, init_weights, integrate, load_results,
    fixed_feedback_plateau, oja_flow, oja_projector, run_figure2, save_results, saxe_mode_strength, simulate,
)

DEFAULT = dict(n_in=30, n_hidden=60, n_out=30, strengths=[8.0, 6.0, 4.5, 3.0, 2.0], n_samples=1000, noise=0.5)


def small_task(**kw) -> LinearTask:
    args = dict(n_in=8, n_hidden=12, n_out=8, strengths=[4.0, 2.5, 1.5], n_samples=200, noise=0.3, seed=0)
    args.update(kw)
    return LinearTask(**args)


# --- the task and the measurements ---------------------------------------------------------

def test_task_is_whitened_and_A_has_the_given_modes():
    task = small_task()
    assert np.allclose(task.sigma_xx, np.eye(task.n_in), atol=1e-12)
    assert np.allclose(task.U.T @ task.U, np.eye(3), atol=1e-12)
    assert np.allclose(task.V.T @ task.V, np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.svd(task.A, compute_uv=False)[:3], [4.0, 2.5, 1.5], atol=1e-12)
    assert np.linalg.matrix_rank(task.A) == 3


def test_noise_free_task_has_sigma_yx_equal_to_A():
    task = small_task(noise=0.0)
    assert np.allclose(task.sigma_yx, task.A, atol=1e-12)


def test_measurements_of_the_exact_solution():
    from raftorch.theory.result import mode_strengths, relative_error

    task = small_task(strengths=[2.0, 5.0, 1.0])  # unsorted: reported in this order
    W2 = np.eye(task.n_out, task.n_hidden)  # W2 W1 = A
    W1 = np.vstack([task.A, np.zeros((task.n_hidden - task.n_out, task.n_in))])
    assert np.allclose(mode_strengths(task, W1, W2), [2.0, 5.0, 1.0], atol=1e-12)
    assert relative_error(task, W1, W2) < 1e-12
    assert relative_error(task, 0 * W1, W2) == pytest.approx(1.0)


def test_random_strengths_are_seeded_positive_and_sorted():
    a, b = LinearTask(10, 10, 10, strengths=4, n_samples=20, noise=0.1, seed=3), \
        LinearTask(10, 10, 10, strengths=4, n_samples=20, noise=0.1, seed=3)
    assert a.d == 4 and np.array_equal(a.strengths, b.strengths)
    assert np.all(a.strengths > 0) and np.all(np.diff(a.strengths) <= 0)


def test_ode_reports_modes_in_the_tasks_own_order():
    task = small_task(strengths=[1.5, 4.0, 2.5])
    res = integrate(task, "bp", t_end=8)
    assert np.allclose(res.mode_strengths, [1.5, 4.0, 2.5], rtol=0.03)


# --- exact references ------------------------------------------------------------------------

def test_bp_ode_single_mode_balanced_start_matches_saxe_closed_form():
    s, u0 = 3.0, 1e-3
    task = LinearTask(n_in=3, n_hidden=4, n_out=3, strengths=[s], n_samples=50, noise=0.0, seed=1)
    u, v = task.U[:, 0], task.V[:, 0]
    h = np.array([0.5, -0.5, 0.5, 0.5])  # unit vector in the hidden layer
    a = np.sqrt(u0)
    init = Weights(W1=a * np.outer(h, v), W2=a * np.outer(u, h))
    res = integrate(task, "bp", t_end=4.0, init=init, rtol=1e-11, atol=1e-13, n_records=81)
    exact = saxe_mode_strength(res.times, s, u0)
    assert exact[0] == pytest.approx(u0) and exact[-1] == pytest.approx(s, rel=1e-5)  # the whole sigmoid
    assert np.max(np.abs(res.mode_strength_trajectory[:, 0] / exact - 1)) < 1e-6


def test_oja_subspace_flow_matches_closed_form():
    rng = np.random.default_rng(0)
    n, r = 6, 2
    G = rng.standard_normal((n, n))
    C = G @ G.T / n + 0.1 * np.eye(n)
    P0 = 0.5 * rng.standard_normal((r, n))  # not orthonormal: the formula holds for any start
    times = np.array([0.0, 0.3, 1.0, 2.5])
    P = oja_flow(P0, C, times)
    for k, t in enumerate(times):
        assert np.allclose(P[k].T @ P[k], oja_projector(t, C, P0), atol=1e-8)
    # an orthonormal start stays orthonormal, and ends on the top-r eigenspace of C
    P0 = np.linalg.qr(rng.standard_normal((n, r)))[0].T
    P = oja_flow(P0, C, np.array([0.0, 1.0, 40.0]))
    assert np.allclose(P[1] @ P[1].T, np.eye(r), atol=1e-8)
    top = np.linalg.eigh(C)[1][:, -r:]
    assert np.allclose(P[-1].T @ P[-1], top @ top.T, atol=1e-6)


def test_raf_ode_feedback_P_follows_oja_closed_form_on_targets():
    # in the one-hidden-layer case dP/dt = P Sigma_yy (I - P^T P) does not depend on W: exact reference
    task = small_task(strengths=[2.0, 1.5, 1.0], noise=0.2)
    res = integrate(task, "raf", rank=2, t_end=0.8, rtol=1e-11, atol=1e-13)
    P0 = init_weights(task, "raf", 2, seed=0).P
    P = res.weights.P
    assert np.allclose(P.T @ P, oja_projector(0.8, task.sigma_yy, P0), atol=1e-7)


# --- simulation and ODE agree ------------------------------------------------------------

FOLLOW_CASES = [("bp", None), ("fa", None), ("fa-lowrank", 2), ("raf-q", 2), ("raf", 2), ("raf", 3)]


@pytest.mark.slow
@pytest.mark.parametrize("rule,rank", FOLLOW_CASES)
def test_small_lr_simulation_follows_the_ode(rule, rank):
    task = small_task()
    lr, t_end = 1e-3, 8.0
    ode = integrate(task, rule, rank, t_end=t_end, lr=lr)
    sim = simulate(task, rule, rank, steps=int(t_end / lr), lr=lr)
    assert np.allclose(sim.times, ode.times)
    scale = task.strengths.max()
    assert np.max(np.abs(sim.mode_strength_trajectory - ode.mode_strength_trajectory)) < 0.03 * scale
    assert np.max(np.abs(sim.relative_error_trajectory - ode.relative_error_trajectory)) < 0.03
    if rank is not None:
        assert np.max(np.abs(sim.alignment_trajectory - ode.alignment_trajectory)) < 0.03
    assert ode.relative_error < 0.9  # something was learned: the comparison is not of two flat lines


def test_minibatch_sgd_with_small_lr_follows_the_ode():
    task = small_task()
    ode = integrate(task, "raf", 2, t_end=8.0, lr=1e-3)
    sim = simulate(task, "raf", 2, steps=8000, lr=1e-3, batch_size=20, seed=0)
    assert np.max(np.abs(sim.mode_strength_trajectory - ode.mode_strength_trajectory)) < 0.05 * 4.0


def test_simulation_with_a_large_lr_departs_from_the_flow():
    # the comparison above can fail: at lr = 0.05 the discrete steps no longer follow the flow
    task = small_task()
    ode = integrate(task, "bp", t_end=8.0, lr=0.05)
    sim = simulate(task, "bp", steps=160, lr=0.05)
    assert np.max(np.abs(sim.mode_strength_trajectory - ode.mode_strength_trajectory)) > 0.03 * 4.0


# --- the fixed points of Figure 2 -----------------------------------------------------------

@pytest.fixture(scope="module")
def fig2():
    task = LinearTask(**DEFAULT, seed=0)
    runs = {key: integrate(task, key[0], key[1], t_end=10.0)
            for key in [("bp", None), ("fa", None), ("fa-lowrank", 3), ("raf-q", 3), ("raf", 3), ("raf", 5), ("raf", 8)]}
    return task, runs


@pytest.mark.slow
def test_bp_and_full_fa_recover_all_five_modes(fig2):
    task, runs = fig2
    for key in [("bp", None), ("fa", None)]:
        assert runs[key].recovered(0.02) == [0, 1, 2, 3, 4], key


def test_raf_rank3_recovers_the_top_three_modes_within_2_percent(fig2):
    task, runs = fig2
    res = runs[("raf", 3)]
    m, s = res.mode_strengths, task.strengths
    assert np.all(np.abs(m[:3] - s[:3]) <= 0.02 * s[:3])
    assert np.all(np.abs(m[3:]) < 0.05 * s[3:])  # the bottom modes are not learned
    assert np.all(res.alignment[:3] > 0.999) and np.all(res.alignment[3:] < 1e-3)
    # Eckart-Young: the best rank-3 approximation of A misses exactly the bottom two modes
    floor = np.linalg.norm(s[3:]) / np.linalg.norm(s)
    assert res.relative_error == pytest.approx(floor, rel=0.01)


def test_raf_rank3_with_sgd_recovers_the_top_three_modes(fig2):
    task, _ = fig2
    res = simulate(task, "raf", 3, steps=1000, lr=0.01)
    assert res.recovered(0.02) == [0, 1, 2]


def test_fixed_rank3_feedback_does_not_reach_bp_error(fig2):
    task, runs = fig2
    bp = runs[("bp", None)].relative_error
    for key in [("fa-lowrank", 3), ("raf-q", 3)]:
        assert runs[key].relative_error > bp + 0.1, key
        assert runs[key].recovered(0.02) != [0, 1, 2], key
    # and it is worse than RAF with the same rank, which learns the right three modes
    assert runs[("fa-lowrank", 3)].relative_error > runs[("raf", 3)].relative_error


def test_raf_with_rank_at_least_d_matches_bp_error(fig2):
    task, runs = fig2
    bp = runs[("bp", None)].relative_error
    for key in [("raf", 5), ("raf", 8)]:
        assert abs(runs[key].relative_error - bp) < 0.01, key
        assert runs[key].recovered(0.02) == [0, 1, 2, 3, 4], key


def test_fixed_P_stops_where_P_E_is_zero(fig2):
    # fixed point of rules.py: P E = 0 and E W1^T = 0 with W2 W1 of rank r give
    # W2 W1 = Sigma_yx Pi, Pi the projector on the row space of P Sigma_yx; Q does not matter.
    task, runs = fig2
    P = init_weights(task, "fa-lowrank", 3, seed=0).P
    basis = np.linalg.qr((P @ task.sigma_yx).T)[0]
    expected = task.sigma_yx @ basis @ basis.T
    for key in [("fa-lowrank", 3), ("raf-q", 3)]:
        w = runs[key].weights
        assert np.linalg.norm(w.W2 @ w.W1 - expected) < 0.01 * np.linalg.norm(expected), key


def test_raf_fixed_point_is_sigma_yx_seen_through_P(fig2):
    task, runs = fig2
    w = runs[("raf", 3)].weights
    assert np.allclose(w.P @ w.P.T, np.eye(3), atol=1e-6)
    expected = w.P.T @ w.P @ task.sigma_yx
    assert np.linalg.norm(w.W2 @ w.W1 - expected) < 0.01 * np.linalg.norm(expected)


def test_fixed_feedback_plateau_is_A_without_noise_and_off_A_with_it():
    # Sec. 3.1: with r >= d a fixed B = Q P converges to the unique solution W2 W1 = A. In closed
    # form that holds for noise-free targets; noisy targets tilt the row space of P Sigma_yx.
    clean = LinearTask(**{**DEFAULT, "noise": 0.0}, seed=0)
    P = init_weights(clean, "fa-lowrank", 5, seed=0).P
    assert np.allclose(fixed_feedback_plateau(clean.sigma_yx, P), clean.A, atol=1e-9)
    noisy = LinearTask(**DEFAULT, seed=0)
    P = init_weights(noisy, "fa-lowrank", 5, seed=0).P
    plateau = fixed_feedback_plateau(noisy.sigma_yx, P)
    assert np.linalg.norm(P @ (noisy.sigma_yx - plateau)) < 1e-9  # P E = 0 there
    assert np.linalg.norm(plateau - noisy.A) > 0.2 * np.linalg.norm(noisy.A)


@pytest.mark.slow
def test_fixed_rank_d_feedback_converges_to_its_plateau_not_to_A():
    # the flow reaches the closed-form plateau by t = 10 (not slow), and the plateau is off A
    task = LinearTask(**DEFAULT, seed=0)
    _, results = run_figure2(Figure2Config(methods=("ode",), rank_high=5))
    by = {(r.rule, r.rank): r for r in results}
    fixed, bp = by[("fa-lowrank", 5)], by[("bp", None)]
    w = fixed.weights
    assert fixed.plateau_distance == pytest.approx(
        np.linalg.norm(w.W2 @ w.W1 - fixed_feedback_plateau(task.sigma_yx, w.P)) / np.linalg.norm(task.A))
    assert fixed.plateau_distance < 0.01
    assert fixed.relative_error > bp.relative_error + 0.2
    assert by[("raf", 5)].plateau_distance is None and by[("raf-q", 3)].plateau_distance < 0.01


# --- bad parameters ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(strengths=[3, 2, 1, 1, 1, 1, 1, 1, 1]), r"rank d=9 .* larger than n_in=8 or n_out=8.*give fewer strengths"),
    (dict(n_hidden=2), r"rank d=3 is larger than n_hidden=2.*use n_hidden >= 3"),
    (dict(noise=-0.1), r"noise=-0.1 .* must be >= 0.*noise=0 for a noise-free task"),
    (dict(strengths=[3.0, 0.0]), r"strengths must be finite and > 0"),
    (dict(strengths=[]), r"strengths is empty"),
    (dict(n_samples=5), r"n_samples=5 must be an integer >= n_in=8"),
    (dict(n_in=0), r"n_in must be a positive integer"),
])
def test_bad_task_parameters_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_task(**kwargs)


@pytest.mark.parametrize("rule,rank,message", [
    ("raf", 0, r"rank must be a positive integer .* got rank=0; use rank >= 1"),
    ("fa-lowrank", -2, r"rank must be a positive integer .* got rank=-2"),
    ("raf", 9, r"rank=9 is larger than min\(n_out, n_hidden\)=8.*use a smaller rank"),
    ("raf", None, r"rule 'raf' needs the feedback rank r; pass e.g. rank=3"),
    ("bp", 3, r"rule 'bp' has a full-rank feedback and takes no rank .* pass rank=None"),
    ("sgd", None, r"unknown rule 'sgd'; choose one of bp, fa, fa-lowrank, raf-q, raf"),
])
def test_bad_rule_or_rank_raise_clear_errors(rule, rank, message):
    task = small_task()
    with pytest.raises(ValueError, match=message):
        simulate(task, rule, rank, steps=1)
    with pytest.raises(ValueError, match=message):
        integrate(task, rule, rank, t_end=0.1)


def test_bad_run_settings_raise_clear_errors():
    task = small_task()
    with pytest.raises(ValueError, match=r"lr=0 must be a positive learning rate"):
        simulate(task, "bp", steps=10, lr=0)
    with pytest.raises(ValueError, match=r"batch_size=500 must be an integer in \[1, n_samples=200\]"):
        simulate(task, "bp", steps=10, batch_size=500)
    with pytest.raises(ValueError, match=r"t_end=-1 must be a positive flow time"):
        integrate(task, "bp", t_end=-1)
    with pytest.raises(ValueError, match=r"initial W1 for rule 'bp' must have shape \(12, 8\)"):
        integrate(task, "bp", t_end=1, init=Weights(W1=np.zeros((3, 3)), W2=np.zeros((8, 12))))
    with pytest.raises(ValueError, match=r"need rank_low < d <= rank_high.*--rank-low 1 --rank-high 3"):
        Figure2Config(task=dict(small_task().config(), strengths=[3, 2, 1]), rank_low=3).runs()


# --- results files, figure and CLI --------------------------------------------------------------

def _tiny_config(**kw) -> Figure2Config:
    task = dict(n_in=6, n_hidden=8, n_out=6, strengths=[3.0, 2.0, 1.0], n_samples=60, noise=0.1)
    return Figure2Config(task=task, rank_low=2, t_end=4.0, lr=0.02, n_records=21, **kw)


def test_results_round_trip_through_json_and_the_figure_is_drawn_from_the_file(tmp_path):
    config = _tiny_config()
    _, results = run_figure2(config)
    path = save_results(tmp_path / "theory.json", results, {"panels": config.panels()})
    assert [p.name for p in tmp_path.iterdir()] == ["theory.json"]  # no temporary file left
    meta, loaded = load_results(path)
    assert meta["panels"][3] == {"title": "RAF, r = 2 < d", "rule": "raf", "rank": 2}
    assert len(loaded) == len(results) == 14
    for a, b in zip(results, loaded):
        assert (a.rule, a.rank, a.method) == (b.rule, b.rank, b.method)
        assert np.array_equal(a.mode_strength_trajectory, b.mode_strength_trajectory)
        assert a.relative_error == b.relative_error
        assert (a.alignment_trajectory is None) == (b.alignment_trajectory is None)
    png = draw_figure(path, tmp_path / "fig.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000
    with open(path, "w") as f:
        json.dump({"format": "something else"}, f)
    with pytest.raises(ValueError, match="not a raftorch theory result file"):
        load_results(path)


@pytest.mark.slow
def test_cli_prints_the_table_and_writes_json_and_png(tmp_path, capsys):
    from raftorch.cli import main

    args = ["theory", "--out", str(tmp_path), "--n-in", "6", "--n-hidden", "8", "--n-out", "6",
            "--strengths", "3,2,1", "--samples", "60", "--noise", "0.1", "--rank-low", "2",
            "--t-end", "4", "--lr", "0.02", "--method", "ode"]
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = [l.split() for l in out.splitlines()]
    assert ["method", "rule", "r", "d", "rel."] == lines[1][:5]
    rows = {(l[0], l[1], l[2]): l for l in lines if l and l[0] == "ode"}
    assert set(rows) == {("ode", "bp", "full"), ("ode", "fa", "full"), ("ode", "fa-lowrank", "2"),
                         ("ode", "raf", "2"), ("ode", "raf", "3"), ("ode", "fa-lowrank", "3"), ("ode", "raf-q", "2")}
    assert rows[("ode", "raf", "2")][5] == "2/3"
    assert (tmp_path / "theory.json").exists() and (tmp_path / "figure2.png").exists()
    (tmp_path / "figure2.png").unlink()
    assert main(["theory", "--redraw", str(tmp_path / "theory.json")]) == 0
    assert (tmp_path / "figure2.png").exists()


def test_cli_reports_bad_parameters_without_a_traceback(capsys):
    from raftorch.cli import main

    assert main(["theory", "--noise", "-1"]) == 2
    assert "noise=-1.0 is the standard deviation of the target noise and must be >= 0" in capsys.readouterr().err
    assert main(["theory", "--rank-low", "7"]) == 2
    assert "need rank_low < d <= rank_high, got rank_low=7, d=5" in capsys.readouterr().err


def test_cli_checks_the_output_folder_before_the_work(tmp_path, capsys, monkeypatch):
    from raftorch.cli import main
    from raftorch.theory import cli as theory_cli

    monkeypatch.setattr(theory_cli, "run_figure2", lambda config: pytest.fail("ran before checking --out"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["theory", "--out", str(blocker / "t")]) == 2
    err = capsys.readouterr().err
    assert "is not a writable folder" in err and "Traceback" not in err
