"""`raftorch reproduce`: specs, the runner (skip, resume after a kill, shards, failures, reuse),
aggregation, claims, figures, report and the command line's messages."""
from __future__ import annotations

import csv
import re
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raftorch.cli import main as cli_main
from raftorch.experiments import runner, spec as S, suite
from raftorch.experiments.spec import SpecError, load_spec

REPO = Path(__file__).resolve().parents[1]

# a toy panel on digits: 2 ranks of RAF and BP, 2 seeds = 6 points of ~1 s each
TOY = {
    "panel": "toy",
    "title": "Toy panel on digits",
    "paper": "none",
    "claim": "RAF at rank 8 is about as good as BP on digits",
    "base": {"data": "digits", "model": "mlp", "model_options": {"hidden": [32, 32]}, "optimizer": "adam",
             "lr": 3e-3, "batch_size": 64, "epochs": 12, "eval_every": 0},
    "seeds": [0, 1],
    "series": [{"name": "RAF", "set": {"rule": "raf"}, "grid": {"rank": [2, 8]}},
               {"name": "BP", "set": {"rule": "bp"}}],
    "figure": {"x": "rank", "xscale": "log"},
    "claims": [{"text": "RAF r=8 within 5 points of BP", "type": "at_least", "a": {"series": "RAF", "rank": 8},
                "b": {"series": "BP"}, "margin": -5.0},
               {"text": "BP beats 100%", "type": "at_least", "a": {"series": "BP"}, "value": 100.0}],
}
UNTIMED = ("seconds",)


def write_spec(folder: Path, spec: dict = TOY, name: str = "toy") -> Path:
    path = folder / "quick" / f"{name}.yaml"  # the folder name is the profile
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def summary(results: Path, panel: str = "toy", profile: str = "quick") -> list[dict]:
    with open(results / profile / panel / "summary.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in UNTIMED} for row in csv.DictReader(f)]


def reproduce_cli(*args) -> int:
    return cli_main(["reproduce", "--no-progress", "--jobs", "1", "--threads", "1", *map(str, args)])


# --------------------------------------------------------------------------- specs

def test_toy_spec_expands_to_series_times_grid_times_seeds(tmp_path):
    panel = load_spec(write_spec(tmp_path))
    points = panel.points()
    assert [p.id for p in points] == ["raf_rank-2_s0", "raf_rank-2_s1", "raf_rank-8_s0", "raf_rank-8_s1",
                                      "bp_s0", "bp_s1"]
    assert points[2].config["rank"] == 8 and points[2].config["rule"] == "raf" and points[2].config["seed"] == 0
    assert points[4].config["rule"] == "bp" and "rank" not in points[4].config


def test_templates_fill_keys_and_values_with_their_types(tmp_path):
    spec = dict(TOY, series=[{"name": "one layer", "set": {"rule": "raf", "rank": "full",
                                                           "ranks": {"{layer}": "{r}"}},
                              "grid": [{"layer": ["fc1"], "r": [1, 3]}, {"layer": ["out"], "r": [2]}]},
                             {"name": "K", "set": {"rule": "bp", "data": "digits:{K}"}, "grid": {"K": [4]}},
                             {"name": "mapped", "set": {"rule": "raf", "rank": "full"},
                              "grid": {"d": [{"value": 2, "set": {"ranks": {"fc2": 5}}}]}}],
                claims=[])
    points = load_spec(write_spec(tmp_path, spec)).points()
    cfgs = {p.id: p.config for p in points}
    assert cfgs["one-layer_layer-fc1_r-3_s0"]["ranks"] == {"fc1": 3}  # an int, not "3"
    assert cfgs["one-layer_layer-out_r-2_s1"]["ranks"] == {"out": 2}
    assert cfgs["k_k-4_s0"]["data"] == "digits:4"
    assert cfgs["mapped_d-2_s0"]["ranks"] == {"fc2": 5}
    assert len(points) == 3 * 2 + 2 + 2


def test_an_empty_mapping_in_a_series_clears_the_base_setting(tmp_path):
    spec = dict(TOY, base=dict(TOY["base"], layer_options={"out": {"oja_source": "target"}}),
                series=[{"name": "RAF", "set": {"rule": "raf", "rank": 4}},
                        {"name": "BP", "set": {"rule": "bp", "layer_options": {}}}], claims=[])
    points = load_spec(write_spec(tmp_path, spec)).points()
    assert points[0].config["layer_options"] == {"out": {"oja_source": "target"}}
    assert points[-1].config["layer_options"] == {}


@pytest.mark.parametrize("change, message", [
    ({"bogus": 1}, "unknown key(s) 'bogus'"),
    ({"base": {"data": "digits", "lrr": 1}}, "base: unknown setting(s) 'lrr'"),
    ({"seeds": [0, 0]}, "seeds must be a list of distinct"),
    ({"series": [{"name": "A", "set": {"rule": "raf"}, "grid": {"wibble": [1]}}]}, "grid variable 'wibble'"),
    ({"series": [{"name": "A", "set": {"rule": "raf"}, "grid": {"rank": [1]}, "colour": "red"}]}, "unknown key(s) 'colour'"),
    ({"claims": [{"text": "x", "type": "bigger"}]}, "unknown claim type 'bigger'"),
    ({"claims": [{"text": "x", "type": "at_least", "a": {"series": "RAF"}, "value": 1}]}, "picks 2 points"),
    ({"claims": [{"text": "x", "type": "at_least", "a": {"series": "RAF", "rank": 3}, "value": 1}]}, "picks 0 points"),
    ({"series": [{"name": "A", "set": {"rule": "raf", "lr": -1}}]}, "lr must be a positive number"),
])
def test_a_malformed_spec_is_one_clear_error(tmp_path, change, message):
    with pytest.raises(SpecError) as err:
        load_spec(write_spec(tmp_path, {**TOY, **change}))
    assert message in str(err.value) and str(tmp_path) in str(err.value)


# --------------------------------------------------------------------------- the shipped specs

# panel -> points, counted by hand from each spec (series x grid x seeds); README lists them too
# (the last 1 of each training panel: the no-feedback control)
QUICK_POINTS = {"fig2": 5, "fig3a": (2 * 2 + 1 + 1 + 1) * 2, "fig3b": (4 + 1 + 2 + 3 + 1) * 3,
                "fig3c": (3 + 4 + 5 + 3 + 3) * 2, "fig3d": (2 + 2 + 1 + 1) * 3, "fig3e": (2 + 1 + 1 + 1) * 2,
                "fig4b": (3 + 1 + 1 + 1) * 2, "fig3f": (2 + 1 + 1) * 2, "fig4cd": (3 + 3 + 3 + 1 + 1) * 2}


def test_every_quick_spec_loads_and_expands_to_its_documented_number_of_points():
    assert S.available("quick") == list(QUICK_POINTS)
    for name, n in QUICK_POINTS.items():
        panel = S.load_panel(name, "quick")
        assert len(panel.points()) == n, name
        assert len(panel.seeds) >= 2 and panel.claims, name
        if panel.kind == "train":  # every training panel has the no-feedback control
            assert panel.series_named(panel.control).set["rule"] == "frozen", name


VARIANT_DIR = REPO / "configs" / "variants"  # panel variants run with --spec (README, "The retina")


def test_the_weight_decay_variant_of_fig4cd_is_the_quick_panel_with_adamw_and_decay_only():
    """configs/variants/fig4cd-weight-decay.yaml (README, "The retina") must stay the quick
    fig4cd panel point for point, with only the optimizer, the decay and the kernel (9 x 9, the
    size its documented runs used) changed."""
    variant = load_spec(VARIANT_DIR / "fig4cd-weight-decay.yaml", "quick")
    quick = S.load_panel("fig4cd", "quick")
    assert variant.id == "fig4cd-weight-decay" and variant.seeds == [0, 1, 2] and quick.seeds == [0, 1]
    quick.seeds = variant.seeds  # the variant runs three seeds of every point
    a, b = quick.points(), variant.points()
    assert [p.id for p in a] == [p.id for p in b]
    assert quick.claims == variant.claims
    for p, q in zip(a, b):
        assert q.config["optimizer"] == "adamw" and q.config["weight_decay"] == 3.0
        assert p.config["optimizer"] == "adam" and not p.config.get("weight_decay")
        assert q.config["model_options"]["kernel"] == 9 and p.config["model_options"]["kernel"] == 5
        rest = lambda c: {**{k: v for k, v in c.items() if k not in ("optimizer", "weight_decay", "out")},  # noqa: E731
                          "model_options": {**c["model_options"], "kernel": None}}
        assert rest(p.config) == rest(q.config)


VARIANTS = sorted(VARIANT_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", VARIANTS, ids=[p.stem for p in VARIANTS])
def test_every_variant_spec_loads_and_its_claims_pick_their_points(path):
    """configs/variants/*.yaml are run with --spec (README): each must load (which checks that
    every claim picks its points) and be named after its file, so results never mix."""
    panel = load_spec(path, "quick")
    assert panel.id == path.stem and panel.claims and len(panel.seeds) >= 3
    assert all(p.config["rule"] for p in panel.points())


def test_the_16_channel_variant_compares_rank_1_with_full_rank_into_the_retina():
    points = load_spec(VARIANT_DIR / "fig4cd-16-channels.yaml", "quick").points()
    assert len(points) == (4 + 1) * 5
    for p in points:
        assert p.config["model_options"]["channels"] == 16 == p.config["model_options"]["bottleneck"]
        assert p.config["optimizer"] == "adamw" and p.config["weight_decay"] == 3.0
    raf = [p for p in points if p.config["rule"] == "raf"]
    assert sorted({p.config["ranks"]["vvs.conv1"] for p in raf}) == [1, 2, 4, 16]


def test_the_bottleneck_control_runs_bp_at_1_and_8_channels_and_draf_at_1():
    points = load_spec(VARIANT_DIR / "fig4cd-bottleneck.yaml", "quick").points()
    got = sorted((p.config["rule"], p.config["model_options"]["bottleneck"], p.seed) for p in points)
    assert got == sorted((r, b, s) for r, b in (("bp", 1), ("bp", 8), ("draf", 1)) for s in (0, 1, 2))
    for p in points:  # the weight-decay variant's net and optimizer
        assert p.config["model_options"] == {"channels": 8, "bottleneck": p.config["model_options"]["bottleneck"],
                                             "fc": 64, "kernel": 9}
        assert p.config["optimizer"] == "adamw" and p.config["weight_decay"] == 3.0


def test_extends_replaces_keys_and_merges_base_into_the_parents(tmp_path):
    parent = write_spec(tmp_path)
    child = tmp_path / "variants" / "child.yaml"
    child.parent.mkdir()
    child.write_text(yaml.safe_dump({
        "extends": "../quick/toy.yaml", "panel": "child",
        "base": {"lr": 1e-3, "model_options": {"dropout": 0.1}},
        "series": [{"name": "BP", "set": {"rule": "bp"}}],
        "claims": [{"text": "BP beats 0", "type": "at_least", "a": {"series": "BP"}, "value": 0.0}]}))
    grandchild = tmp_path / "variants" / "grandchild.yaml"
    grandchild.write_text(yaml.safe_dump({"extends": "child.yaml", "panel": "grandchild", "seeds": [5],
                                          "base": {"model_options": {}}}))
    toy, c, g = load_spec(parent), load_spec(child, "quick"), load_spec(grandchild, "quick")
    assert c.id == "child" and c.title == toy.title and c.seeds == toy.seeds and c.figure == toy.figure
    assert [p.id for p in c.points()] == ["bp_s0", "bp_s1"] and len(c.claims) == 1
    cfg = c.points()[0].config
    assert cfg["lr"] == 1e-3 and cfg["epochs"] == toy.base["epochs"]
    assert cfg["model_options"] == {"hidden": [32, 32], "dropout": 0.1}  # merged one level deep
    assert [p.id for p in g.points()] == ["bp_s5"] and g.points()[0].config["model_options"] == {}
    assert g.points()[0].config["lr"] == 1e-3 and toy.base["lr"] == 3e-3  # the parent file is untouched


@pytest.mark.parametrize("extends, message", [
    ("missing.yaml", "does not exist (the path is relative to"),
    ("me.yaml", "which extends it back (me.yaml -> me.yaml); break the cycle"),
    (7, "extends must be the path of another spec file"),
])
def test_a_bad_extends_is_one_clear_error(tmp_path, extends, message):
    me = tmp_path / "me.yaml"
    me.write_text(yaml.safe_dump({"extends": extends, "panel": "me"}))
    with pytest.raises(SpecError) as err:
        load_spec(me, "quick")
    assert message in str(err.value) and str(me) in str(err.value)


def test_the_first_point_of_every_quick_training_panel_trains_one_step(tmp_path):
    import math

    from test_data import write_fake_fashion_mnist

    from raftorch.training.config import TrainConfig
    from raftorch.training.loop import setup, train_epoch

    folder = write_fake_fashion_mnist(tmp_path / "fashion-mnist", n_train=40, n_test=10)
    for name in QUICK_POINTS:
        panel = S.load_panel(name, "quick")
        if panel.kind != "train":
            continue
        point = panel.points()[0]
        # the fake set has 40 images: the point's train_size (5,000-10,000) would be refused
        cfg = TrainConfig.from_dict({**point.config, "data_dir": str(folder.parent), "device": "cpu", "threads": 1,
                                     "train_size": None})
        record = train_epoch(setup(cfg), progress=False, max_steps=1)
        assert math.isfinite(record["train_loss"]), name


# --------------------------------------------------------------------------- the runner

@pytest.mark.slow
def test_run_then_rerun_skips_finished_points_and_writes_every_result_file(tmp_path):
    spec = write_spec(tmp_path / "specs")
    res = tmp_path / "results"
    assert reproduce_cli("--spec", spec, "--results", res) == 0
    folder = res / "quick" / "toy"
    for name in ("summary.csv", "points.csv", "claims.json", "figure.png", "figure.pdf"):
        assert (folder / name).is_file(), name
    rows = summary(res)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"done"}
    assert {r["threads"] for r in rows} == {"1"} and all(r["torch"] for r in rows)
    final = json.loads((folder / "runs" / "raf_rank-8_s0" / "final.json").read_text())
    assert float(rows[2]["test_accuracy"]) == pytest.approx(100 * final["test_accuracy"])
    claims = json.loads((folder / "claims.json").read_text())
    assert [c["verdict"] for c in claims] == ["holds", "fails"] and all("measured" in c for c in claims)
    mtime = (folder / "runs" / "bp_s0" / "final.json").stat().st_mtime_ns
    assert reproduce_cli("--spec", spec, "--results", res) == 0  # nothing left to train
    assert (folder / "runs" / "bp_s0" / "final.json").stat().st_mtime_ns == mtime
    points = list(csv.DictReader(open(folder / "points.csv")))
    bp = next(p for p in points if p["series"] == "BP")
    accs = [float(r["test_accuracy"]) for r in rows if r["series"] == "BP"]
    assert int(bp["n"]) == 2 and float(bp["test_accuracy_mean"]) == pytest.approx(sum(accs) / 2, abs=1e-3)


@pytest.mark.slow
def test_a_killed_sweep_rerun_gives_the_summary_of_an_uninterrupted_one(tmp_path):
    spec = write_spec(tmp_path / "specs")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert reproduce_cli("--spec", spec, "--results", whole) == 0
    cmd = [sys.executable, "-m", "raftorch", "reproduce", "--spec", str(spec), "--results", str(killed),
           "--jobs", "1", "--threads", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = killed / "quick" / "toy" / "runs"
    deadline = time.time() + 120
    caught = False
    while time.time() < deadline and proc.poll() is None:
        done = list(runs.glob("*/final.json"))
        partial = [d for d in runs.glob("*") if (d / "checkpoint.pt").exists() and not (d / "final.json").exists()]
        if done and partial:
            proc.send_signal(signal.SIGKILL)
            caught = True
            break
        time.sleep(0.005)
    proc.wait()
    assert caught, "the sweep ended before it could be killed mid-point"
    assert reproduce_cli("--spec", spec, "--results", killed) == 0
    assert summary(killed) == summary(whole)


@pytest.mark.slow
def test_two_shards_together_make_the_whole_sweep(tmp_path):
    spec = write_spec(tmp_path / "specs")
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert reproduce_cli("--spec", spec, "--results", whole) == 0
    assert reproduce_cli("--spec", spec, "--results", sharded, "--shard", "1/2") == 0
    first = {r["point"] for r in summary(sharded) if r["status"] == "done"}
    assert 0 < len(first) < 6
    assert reproduce_cli("--spec", spec, "--results", sharded, "--shard", "2/2") == 0
    assert summary(sharded) == summary(whole)


def test_shards_are_disjoint_and_cover_every_point():
    points = S.load_panel("fig3a", "quick").points()
    shards = [runner.select_shard(points, (i, 5)) for i in range(1, 6)]
    ids = [p.id for s in shards for p in s]
    assert sorted(ids) == sorted(p.id for p in points) and len(set(ids)) == len(ids)
    assert [p.id for p in runner.select_shard(points, (2, 5))] == [p.id for p in shards[1]]  # deterministic


@pytest.mark.slow
def test_redraw_makes_the_same_figure_from_the_summary_without_training(tmp_path, monkeypatch):
    spec = write_spec(tmp_path / "specs")
    res = tmp_path / "results"
    assert reproduce_cli("--spec", spec, "--results", res) == 0
    folder = res / "quick" / "toy"
    png = (folder / "figure.png").read_bytes()
    claims = (folder / "claims.json").read_text()
    for f in ("figure.png", "figure.pdf", "claims.json"):
        (folder / f).unlink()
    for ckpt_file in folder.glob("runs/*/checkpoint.pt"):
        ckpt_file.unlink()  # nothing to train from either

    def no_training(*a, **k):
        raise AssertionError("redraw must not train")

    monkeypatch.setattr(runner, "execute", no_training)
    assert reproduce_cli("--spec", spec, "--results", res, "--redraw") == 0
    assert (folder / "figure.png").read_bytes() == png
    assert (folder / "claims.json").read_text() == claims


@pytest.mark.slow
def test_a_failed_point_is_recorded_and_the_others_run(tmp_path, capsys):
    spec = dict(TOY, series=TOY["series"] + [{"name": "diverges", "set": {"rule": "bp", "lr": 1e12}}], claims=[])
    path = write_spec(tmp_path / "specs", spec)
    res = tmp_path / "results"
    assert reproduce_cli("--spec", path, "--results", res) == 0
    rows = summary(res)
    failed = [r for r in rows if r["status"] == "failed"]
    assert {r["series"] for r in failed} == {"diverges"} and len(failed) == 2
    assert "TrainingDiverged" in failed[0]["error"]
    assert sum(r["status"] == "done" for r in rows) == 6
    assert "FAILED" in capsys.readouterr().out
    assert reproduce_cli("--spec", path, "--results", res) == 0  # not retried by default
    assert "failed before and are not run again" in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_folder_with_other_settings_is_refused_before_any_work(tmp_path, capsys):
    path = write_spec(tmp_path / "specs")
    res = tmp_path / "results"
    assert reproduce_cli("--spec", path, "--results", res) == 0
    changed = dict(TOY, base=dict(TOY["base"], lr=1e-3))
    write_spec(tmp_path / "specs", changed)
    assert reproduce_cli("--spec", path, "--results", res) == 2
    err = capsys.readouterr().err
    assert "was run with other settings" in err and "lr: run has 0.003, spec gives 0.001" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_point_identical_to_another_panels_run_is_reused_not_trained(tmp_path, capsys):
    specs = tmp_path / "specs"
    a = write_spec(specs, dict(TOY, panel="a", claims=[]), "a")
    b = write_spec(specs, dict(TOY, panel="b", claims=[], series=[TOY["series"][1]]), "b")
    res = tmp_path / "results"
    assert reproduce_cli("--spec", a, "--results", res) == 0
    capsys.readouterr()
    assert reproduce_cli("--spec", b, "--results", res) == 0
    out = capsys.readouterr().out
    assert "2 point(s) taken from identical finished runs" in out and "[1/" not in out
    assert [r["test_accuracy"] for r in summary(res, "b")] == [r["test_accuracy"] for r in summary(res, "a")
                                                                if r["series"] == "BP"]
    for seed in (0, 1):  # the weights come along (analyses read them), as a link or a copy
        got, source = (res / "quick" / panel / "runs" / f"bp_s{seed}" / "checkpoint.pt" for panel in ("b", "a"))
        assert got.read_bytes() == source.read_bytes()


def test_default_parallelism_never_oversubscribes_the_cores(monkeypatch):
    import raftorch.training.threads as T

    monkeypatch.setattr(T, "usable_cores", lambda: 4)
    monkeypatch.setattr(T, "busy_cores", lambda: 1.2)  # one core busy
    assert T.auto_threads() == 3
    assert runner.parallelism(None, None, 10) == (3, 1)
    assert runner.parallelism(None, None, 2) == (2, 1)  # no more jobs than points
    assert runner.parallelism(1, None, 10) == (1, 3)
    assert runner.parallelism(None, 3, 10) == (1, 3)
    assert runner.parallelism(None, None, 10, "cuda") == (1, 3)
    assert runner.parallelism(None, None, 10, preferred_threads=2) == (1, 3)  # one 2-thread job, cores filled
    monkeypatch.setattr(T, "busy_cores", lambda: 0.0)
    assert runner.parallelism(None, None, 10, preferred_threads=2) == (2, 2)
    with pytest.raises(ValueError, match="--jobs must be a positive"):
        runner.parallelism(0, None, 10)


# --------------------------------------------------------------------------- the command line

@pytest.mark.parametrize("args, message", [
    (["fig9"], "unknown panel 'fig9' in profile 'quick'; choose one of fig2, fig3a"),
    (["fig3b", "--profile", "huge"], "unknown profile 'huge'; choose one of gap, paper, quick"),
    (["fig3b", "--shard", "3"], "--shard must be I/N"),
    (["fig3b", "--shard", "5/4"], "--shard must be I/N"),
    ([], "name a panel"),
    (["fig3b", "--jobs", "0"], "--jobs must be a positive whole number"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, args, message):
    assert cli_main(["reproduce", "--results", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_spec_with_an_unknown_key_is_one_clear_line(tmp_path, capsys):
    path = write_spec(tmp_path, {**TOY, "seedz": [1]})
    assert cli_main(["reproduce", "--spec", str(path), "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) 'seedz'" in err and len(err.strip().splitlines()) == 1


def test_an_unwritable_results_folder_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli_main(["reproduce", "fig3b", "--results", str(blocker)]) == 2
    assert "is not a writable folder" in capsys.readouterr().err


def test_list_and_dry_run_show_points_and_costs(tmp_path, capsys):
    assert cli_main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    for name in QUICK_POINTS:
        assert name in out
    assert "estimated cost" in out and "total: " in out
    assert cli_main(["reproduce", "fig3a", "--dry-run", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{QUICK_POINTS['fig3a']} points" in out and "new    raf_layer-fc2_r-1_s0" in out and "estimated cost" in out
    # the settings the points share, then each series' own: a paper spec's corrected settings show
    assert cli_main(["reproduce", "fig4cd", "--profile", "paper", "--dry-run", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    shared = next(line for line in out.splitlines() if line.startswith("  settings of every point: "))
    for item in ("optimizer=rmsprop", "weight_decay=0.0", "batch_size=64", "crop_padding=3", "flip=True"):
        assert item in shared.split(": ", 1)[1].split(", "), item
    assert "series 'dRAF from the VVS into the retina, bottleneck 4': rule=draf, rank={r}" in out


@pytest.mark.slow
def test_all_writes_one_report_with_every_claim_and_figure(tmp_path):
    specs = tmp_path / "specs"
    control = {"name": "no feedback", "set": {"rule": "frozen"}}
    a = write_spec(specs, dict(TOY, panel="a", series=TOY["series"] + [control], control="no feedback"), "a")
    b = write_spec(specs, dict(TOY, panel="b", series=[TOY["series"][1]],
                               claims=[dict(TOY["claims"][1], source="ours")]), "b")
    res = tmp_path / "results"
    assert reproduce_cli("--spec", a, "--spec", b, "--results", res) == 0
    report = (res / "quick" / "REPORT.md").read_text()
    assert "| panel | claim | paper | ours: difference [95% interval] | line | n | verdict |" in report
    assert report.count("| **holds**") == 1 and report.count("| **fails**") == 2
    assert "![a](a/figure.png)" in report and "![b](b/figure.png)" in report
    assert "**1 hold, 2 fail, 0 undecided, 0 not evaluated (of 3 claims).**" in report
    assert "1 job(s) x 1 thread(s)" in report
    ours = report.index("## Our own claims")
    assert report.index("| b | BP beats 100%") > ours > report.index("| a | BP beats 100%")
    # the control: its accuracy and chance in the report, every point's paired gain in points.csv
    rows = summary(res, "a")
    assert {r["chance"] for r in rows} == {"10.0"}
    acc = {(r["series"], r["rank"], r["seed"]): float(r["test_accuracy"]) for r in rows}
    points = {(p["series"], p["rank"]): p for p in csv.DictReader(open(res / "quick" / "a" / "points.csv"))}
    gain = sum(acc[("RAF", "8", s)] - acc[("no feedback", "", s)] for s in "01") / 2
    assert float(points[("RAF", "8")]["gain_over_control"]) == pytest.approx(gain, abs=1e-3)
    assert float(points[("no feedback", "")]["gain_over_control"]) == 0.0
    ctrl = (acc[("no feedback", "", "0")] + acc[("no feedback", "", "1")]) / 2
    assert f"No-feedback control: {ctrl:.2f}" in report and "chance 10.0%" in report
    assert f"RAF (rank = 8) {gain:+.2f} [" in report  # every point's gain over the control
    # --export copies the small files (redrawn: nothing trains), never a run folder
    docs = tmp_path / "docs"
    assert reproduce_cli("--spec", a, "--spec", b, "--results", res, "--redraw", "--export", docs) == 0
    got = sorted(str(p.relative_to(docs)) for p in docs.rglob("*") if p.is_file())
    assert got == ["REPORT.md"] + [f"{x}/{n}" for x in "ab" for n in sorted(
        ["claims.json", "figure.png", "points.csv", "summary.csv"])]
    assert (docs / "a" / "claims.json").read_text() == (res / "quick" / "a" / "claims.json").read_text()


@pytest.mark.slow
def test_a_paper_panel_runs_end_to_end_on_fake_cifar(tmp_path, capsys):
    from test_data import write_fake_cifar

    write_fake_cifar(tmp_path / "data", "cifar10", per_batch=16)
    panel = S.load_panel("fig3b", "paper")
    panel.base = dict(panel.base, epochs=1)  # the paper's 160 epochs, cut for the test
    for p in panel.series:
        p.set = dict(p.set, epochs=1)
    n = len(panel.points())
    results = suite.reproduce([panel], tmp_path / "results", jobs=1, threads=1, shard=(1, n // 2),
                              data_dir=str(tmp_path / "data"), progress=False)
    rows = summary(tmp_path / "results", "fig3b", "paper")
    done = [r for r in rows if r["status"] == "done"]
    assert len(rows) == n and len(done) == 2  # shard 1 of n/2: two points
    assert {r["epochs"] for r in done} == {"1"} and all(0 <= float(r["test_accuracy"]) <= 100 for r in done)
    assert all(c["verdict"] == "not evaluated" for c in results[0].claims)  # the other points are missing
    assert (tmp_path / "results" / "paper" / "fig3b" / "figure.png").is_file()


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_keeps_the_checkpoint_and_says_how_to_resume(tmp_path):
    spec = write_spec(tmp_path / "specs")
    res = tmp_path / "results"
    cmd = [sys.executable, "-m", "raftorch", "reproduce", "--spec", str(spec), "--results", str(res),
           "--jobs", "1", "--threads", "1", "--no-progress"]
    # Ctrl-C's default action in the child even where the tests themselves run in the
    # background (`cmd &` ignores SIGINT, and a child inherits that)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    runs = res / "quick" / "toy" / "runs"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(runs.glob("*/checkpoint.pt")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "run the same command again" in err and "Traceback" not in err
    assert list(runs.glob("*/checkpoint.pt"))


# --------------------------------------------------------------------------- --decide

ONE_SEED = dict(TOY, seeds=[0], claims=[{"text": "RAF r=8 within 50 points of BP", "type": "at_least",
                                         "a": {"series": "RAF", "rank": 8}, "b": {"series": "BP"}, "margin": -50.0}])


def run_folders(res: Path) -> set[str]:
    return {d.name for d in (res / "quick" / "toy" / "runs").iterdir()}


@pytest.mark.slow
def test_decide_adds_seeds_to_exactly_the_points_an_undecided_claim_needs(tmp_path, capsys):
    spec = write_spec(tmp_path / "specs", ONE_SEED)
    res = tmp_path / "results"
    assert reproduce_cli("--spec", spec, "--results", res) == 0
    claims = json.loads((res / "quick" / "toy" / "claims.json").read_text())
    assert claims[0]["verdict"] == "undecided" and claims[0]["seeds_needed"] == 2  # one seed: no interval
    assert claims[0]["points"] == ["bp", "raf_rank-8"]
    assert reproduce_cli("--spec", spec, "--results", res, "--decide", "--max-seeds", "2") == 0
    assert "--decide round 1: 2 more run(s)" in capsys.readouterr().out
    assert run_folders(res) == {"raf_rank-2_s0", "raf_rank-8_s0", "raf_rank-8_s1", "bp_s0", "bp_s1"}
    claims = json.loads((res / "quick" / "toy" / "claims.json").read_text())
    assert claims[0]["verdict"] == "holds" and claims[0]["n"] == 2 and claims[0]["method"] == "paired"
    rows = summary(res)
    assert len(rows) == 5
    for extra in ([], ["--redraw"]):  # later runs and redraws count the added seeds
        assert reproduce_cli("--spec", spec, "--results", res, *extra) == 0
        assert summary(res) == rows
    points = list(csv.DictReader(open(res / "quick" / "toy" / "points.csv")))
    assert {p["series"]: p["n"] for p in points if p["series"] != "RAF" or p["rank"] == "8"} == {"RAF": "2", "BP": "2"}


@pytest.mark.parametrize("args, message", [
    (["--decide", "--redraw"], "--decide trains extra seeds and --redraw trains nothing"),
    (["--decide", "--max-seeds", "0"], "--max-seeds must be a positive whole number"),
    (["--decide", "--max-seeds", "1"], "--max-seeds 1 is below the seeds the spec of toy already runs (2)"),
    (["--max-seeds", "4"], "--max-seeds caps the seeds --decide adds; give --decide too"),
])
def test_decide_refuses_settings_it_cannot_honour_in_one_line(tmp_path, capsys, args, message):
    spec = write_spec(tmp_path / "specs")
    assert reproduce_cli("--spec", spec, "--results", tmp_path / "results", *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "results" / "quick" / "toy" / "runs").exists()  # nothing trained


@pytest.mark.parametrize("change, message", [
    ({"max_seeds": 1}, "max_seeds must be a whole number at least the number of seeds (2)"),
    ({"control": "nobody"}, "'nobody' is not one of"),
    ({"claims": [dict(TOY["claims"][0], confidence=0.9)]}, "unknown key(s) 'confidence'"),
    ({"claims": [dict(TOY["claims"][0], paired="yes")]}, "paired must be true"),
    ({"claims": [dict(TOY["claims"][0], source="mine")]}, "source must be 'paper'"),
])
def test_bad_statistical_settings_in_a_spec_are_one_clear_error(tmp_path, change, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        load_spec(write_spec(tmp_path, dict(TOY, **change)))


def test_seeds_wanted_grows_at_most_twofold_up_to_the_cap(tmp_path):
    panel = load_spec(write_spec(tmp_path, TOY))
    undecided = {"verdict": "undecided", "points": ["raf_rank-8", "bp"]}
    want = suite._seeds_wanted(panel, [dict(undecided, seeds_needed=9)], cap=10)
    assert want == {("RAF", (("rank", 8),)): [2, 3], ("BP", ()): [2, 3]}  # 2 seeds -> at most 4
    assert suite._seeds_wanted(panel, [dict(undecided, seeds_needed=3)], cap=8)[("BP", ())] == [2]
    assert suite._seeds_wanted(panel, [dict(undecided, seeds_needed=3)], cap=3)[("BP", ())] == [2]
    # beyond the cap, or the mean on the line: twofold towards the cap all the same
    assert suite._seeds_wanted(panel, [dict(undecided, seeds_needed=20)], cap=8)[("BP", ())] == [2, 3]
    assert suite._seeds_wanted(panel, [dict(undecided, seeds_needed=None)], cap=3)[("BP", ())] == [2]
    assert suite._seeds_wanted(panel, [dict(undecided, seeds_needed=20)], cap=2) == {}  # at the cap
    assert suite._seeds_wanted(panel, [dict(undecided, verdict="holds", seeds_needed=3)], cap=8) == {}


def test_a_sweep_loads_each_dataset_once_and_drops_it_afterwards(tmp_path, monkeypatch):
    """The points of a sweep in one process share one load of their dataset (the runner's
    DatasetCache, passed to train), and the cache is gone when the sweep ends."""
    import raftorch.training.data as D

    spec = dict(TOY, base={**TOY["base"], "epochs": 1}, claims=[])
    path = write_spec(tmp_path / "specs", spec)
    loads = []
    real = D.load_dataset
    monkeypatch.setattr(D, "load_dataset", lambda name, **kw: loads.append(name) or real(name, **kw))
    assert reproduce_cli("--spec", path, "--results", tmp_path / "results") == 0
    # six points, two seeds: one load per seed (the seed draws the split and subsets)
    assert len(summary(tmp_path / "results")) == 6 and loads == ["digits", "digits"]
    assert runner._DATASETS is None
