"""Misuse, as a new user commits it: every bad setting is caught where it enters.

Each case runs the command line with one thing wrong and checks the standard: exit status 2
for bad input (1 for a run that fails: a corrupt checkpoint, a diverging loss), exactly one
line on stderr, ``raftorch CMD: error: ...``, that names what was wrong, no traceback, and
nothing (half-)written in the output folder. Most cases call :func:`raftorch.cli.main` in this
process; a handful run ``python -m raftorch`` in a subprocess, as a user does.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raftorch.cli import main

TRAIN = ["--epochs", "1", "--threads", "1", "--batch-size", "64", "--no-progress"]


def _inputs(tmp: Path) -> None:
    """The broken files the cases name: an empty folder, a binary, a broken and a misspelled config."""
    (tmp / "empty").mkdir(exist_ok=True)
    (tmp / "binary.yaml").write_bytes(bytes(range(128, 256)) * 4)
    (tmp / "broken.yaml").write_text("model_options: {hidden: [8\n")
    (tmp / "typo.yaml").write_text("lrr: 0.001\nepochs: 1\n")
    (tmp / "badlr.yaml").write_text("lr: fast\n")


def _argv(args: list[str], tmp: Path) -> list[str]:
    argv = [a.replace("{tmp}", str(tmp)) for a in args]
    if argv[0] == "train":
        argv += TRAIN + ([] if "--out" in argv else ["--out", str(tmp / "run")])
    return argv


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` (hidden and temporary ones too)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _one_error_line(err: str, command: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"raftorch {command}: error: "), lines[0]
    return lines[0]


def _main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse
        return exc.code


# (id, command line with {tmp} for the test's folder, a fragment of the one line)
BAD_INPUT = [
    # silently ignored or degenerate before
    ("out-empty", ["train", "--out", ""], "out (--out) must name a folder, got ''"),
    ("train-size-above-the-data", ["train", "--train-size", "100000"],
     "train_size 100000 (--train-size) is more than the 1438 training images of digits; use at most 1438"),
    ("vgg-width-mult-0", ["train", "--model", "vgg", "--model-option", "width_mult=0"],
     "vgg: model option width_mult must be a finite number > 0, got 0"),
    ("vgg-width-mult-negative", ["train", "--model", "vgg", "--model-option", "width_mult=-1"], "got -1"),
    ("mlp-hidden-0", ["train", "--model-option", "hidden=[0]"],
     "mlp: model option hidden must be a list of positive whole numbers, got [0]"),
    ("fashion-mnist-not-in-the-named-folder", ["train", "--data", "fashion-mnist", "--data-dir", "{tmp}/empty"],
     "is not in the folder given as data_dir / --data-dir"),
    # tracebacks before
    ("mlp-hidden-negative", ["train", "--model-option", "hidden=[-3]"], "got [-3]"),
    ("vgg-image-too-small", ["train", "--model", "vgg", "--image-size", "4"],
     "4x4 images are too small for its 3 max-pools of 2x2 (each halves the image); the smallest size that works is 8x8"),
    ("validation-takes-everything", ["train", "--val-fraction", "0.999"], "leaving none to train on"),
    ("validation-takes-nothing", ["train", "--val-fraction", "0.001"], "holds out no image of digits"),
    ("config-is-a-folder", ["train", "--config", "{tmp}/empty"], "is a folder, not a YAML file"),
    ("config-is-binary", ["train", "--config", "{tmp}/binary.yaml"], "is not a text file"),
    ("config-is-broken-yaml", ["train", "--config", "{tmp}/broken.yaml"], "broken.yaml is not valid YAML"),
    ("vit-patch-0", ["train", "--model", "vit", "--model-option", "patch=0"],
     "vit: model option patch must be a positive whole number, got 0"),
    ("vit-patch-not-dividing", ["train", "--model", "vit", "--model-option", "patch=3"],
     "patch=3 does not divide the 8x8 images; choose a patch that does (1, 2, 4, 8)"),
    ("vgg-width-mult-not-a-number", ["train", "--model", "vgg", "--model-option", "width_mult=abc"], "got 'abc'"),
    ("theory-t-end-inf", ["theory", "--t-end", "inf"], "--t-end must be a finite number, got inf"),
    ("theory-t-end-nan", ["theory", "--t-end", "nan"], "--t-end must be a finite number, got nan"),
    # unclear before
    ("mlp-hidden-not-a-list", ["train", "--model-option", "hidden=abc"], "model option hidden must be a list"),
    ("layer-option-names-no-layer", ["train", "--rule", "raf", "--rank", "2", "--layer-option",
                                     "nope={oja_source: target}"],
     "layer_options (--layer-option) names 'nope', which is no layer of model 'mlp'"),
    ("layer-rank-names-no-layer", ["train", "--rule", "raf", "--layer-rank", "fc9=2"],
     "ranks (--layer-rank) names 'fc9'"),
    ("config-key-misspelled", ["train", "--config", "{tmp}/typo.yaml"],
     "typo.yaml: unknown setting 'lrr' (did you mean 'lr'?)"),
    ("config-value-bad", ["train", "--config", "{tmp}/badlr.yaml"], "badlr.yaml: lr (--lr) must be a finite number"),
    # more of the same kind
    ("lr-infinite", ["train", "--lr", "inf"], "lr (--lr) must be a finite number, got inf"),
    ("lr-not-a-number", ["train", "--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    ("data-dir-empty", ["train", "--data-dir", ""], "data_dir (--data-dir) must name a folder"),
    ("model-option-without-key", ["train", "--model-option", "=3"], "--model-option expects KEY=VALUE"),
    ("layer-option-broken-yaml", ["train", "--layer-option", "out={oja_source: target"], "is not valid YAML"),
    ("misspelled-flag", ["train", "--epocs", "3"], "unrecognized arguments: --epocs 3 (did you mean --epochs?)"),
    ("theory-out-empty", ["theory", "--out", ""], "argument --out: is empty; give a path"),
    ("analyze-steps-0", ["analyze", "{tmp}/run", "--steps", "0"], "argument --steps: must be a whole number > 0"),
    # the README's commands, each with one argument broken
    ("readme-train-rank", ["train", "--data", "fashion-mnist", "--model", "mlp", "--rule", "raf", "--rank", "ten",
                           "--seed", "0", "--out", "{tmp}/run"], "a rank is a positive whole number or 'full'"),
    ("readme-train-seed", ["train", "--data", "fashion-mnist", "--model", "mlp", "--rule", "raf", "--rank", "10",
                           "--seed", "-1", "--out", "{tmp}/run"], "seed (--seed) must be a non-negative whole number"),
    ("readme-train-config-path", ["train", "--config", "configs/paper/mlp-cifar10.yml", "--seed", "1"],
     "config file configs/paper/mlp-cifar10.yml does not exist"),
    ("readme-retina-lr-decay", ["train", "--data", "cifar10", "--grayscale", "--model", "retina", "--output-init",
                                "zero", "--rule", "raf", "--rank", "full", "--layer-rank", "vvs.conv1=4",
                                "--optimizer", "rmsprop", "--lr-decay", "1.5"], "lr_decay is the per-epoch factor"),
    ("readme-vit-heads", ["train", "--data", "fashion-mnist", "--model", "vit", "--model-option", "dim=64",
                          "--model-option", "depth=2", "--model-option", "heads=5"],
     "model option dim=64 must be divisible by heads=5"),
    ("readme-resume", ["train", "--resume", "--out", "{tmp}/run"], "nothing to resume: run folder"),
    ("readme-analyze", ["analyze", "{tmp}/run"], "does not exist"),
    ("readme-analyze-method", ["analyze", "{tmp}/run", "--method", "ascnt"], "argument --method: invalid choice"),
    ("readme-plot", ["plot", "{tmp}/run", "--out", "{tmp}/curves.png"], "does not exist"),
    ("readme-reproduce-panel", ["reproduce", "fig3z", "--profile", "quick"], "unknown panel 'fig3z'"),
    ("readme-reproduce-profile", ["reproduce", "--list", "--profile", "quik"], "unknown profile 'quik'"),
    ("readme-reproduce-shard", ["reproduce", "fig3a", "--profile", "paper", "--shard", "41/40"], "--shard must be I/N"),
    ("readme-reproduce-spec", ["reproduce", "--spec", "{tmp}/my_panel.yaml"], "my_panel.yaml does not exist"),
    ("readme-theory-redraw", ["theory", "--redraw", "{tmp}/theory.json"], "cannot redraw"),
]


@pytest.mark.parametrize("args, fragment", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, fragment, tmp_path, capsys, monkeypatch):
    _inputs(tmp_path)
    monkeypatch.chdir(tmp_path)  # anything written by mistake to a relative path lands here
    rc = _main(_argv(args, tmp_path))
    out, err = capsys.readouterr()
    line = _one_error_line(err, args[0])
    assert rc == 2, err
    assert fragment in line, line
    assert _files(tmp_path / "run") == [] and not (tmp_path / "curves.png").exists()
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()


def _corrupt_run(tmp: Path) -> Path:
    run = tmp / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"epochs": 1, "model_options": {"hidden": [8]}, "threads": 1}))
    (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    return run


def test_a_corrupt_checkpoint_is_a_failure_of_the_run_in_one_whole_sentence(tmp_path, capsys):
    run = _corrupt_run(tmp_path)
    rc = _main(["train", "--resume", "--out", str(run), "--no-progress"])
    line = _one_error_line(capsys.readouterr().err, "train")
    assert rc == 1
    assert line.endswith("delete it (or the whole run folder) and start the run again")
    assert "is corrupt, truncated or not a raftorch checkpoint" in line
    assert _files(run) == ["checkpoint.pt", "config.yaml"]


def test_a_diverging_run_fails_with_exit_1_and_keeps_only_whole_files(tmp_path, capsys):
    run = tmp_path / "run"
    rc = _main(["train", "--optimizer", "sgd", "--lr", "1e30", "--model-option", "hidden=[8]", *TRAIN,
                "--out", str(run)])
    line = _one_error_line(capsys.readouterr().err, "train")
    assert rc == 1 and "training diverged" in line and "lower learning rate" in line
    assert all(not name.startswith(".") and not name.endswith((".tmp", ".part")) for name in _files(run))


def test_yaml_exponents_without_a_dot_are_numbers(tmp_path):
    from raftorch.cli import build_parser
    from raftorch.training.cli import config_from_args

    (tmp_path / "c.yaml").write_text("lr: 1e-3\nweight_decay: 5E-4\nmodel_options: {hidden: [8]}\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--model-option", "dropout=1e-1",
                                      "--out", str(tmp_path / "run")])
    cfg = config_from_args(args)
    assert (cfg.lr, cfg.weight_decay, cfg.model_options["dropout"]) == (0.001, 0.0005, 0.1)


def test_a_bad_setting_a_flag_replaced_does_not_blame_the_file(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("lr: fast\n")
    assert _main(["train", "--config", str(tmp_path / "c.yaml"), "--lr", "0.01", "--epochs", "0",
                  "--out", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert line == "raftorch train: error: epochs must be a positive number, got 0 (--epochs)"


# As a user runs them: a new process, the real stderr and exit status.
SUBPROCESS = [
    ("out-empty", ["train", "--out", ""], 2),
    ("mlp-hidden-negative", ["train", "--model-option", "hidden=[-3]"], 2),
    ("config-is-a-folder", ["train", "--config", "{tmp}/empty"], 2),
    ("theory-t-end-inf", ["theory", "--t-end", "inf"], 2),
    ("corrupt-checkpoint", ["train", "--resume", "--out", "{tmp}/run"], 1),
]


@pytest.mark.slow
@pytest.mark.parametrize("args, status", [c[1:] for c in SUBPROCESS], ids=[c[0] for c in SUBPROCESS])
def test_python_dash_m_raftorch_gives_one_line_and_the_exit_status(args, status, tmp_path):
    _inputs(tmp_path)
    if status == 1:
        _corrupt_run(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if argv[0] == "train" and "--resume" not in argv:
        argv += TRAIN + ([] if "--out" in argv else ["--out", str(tmp_path / "run")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "raftorch", *argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == status, proc.stderr
    _one_error_line(proc.stderr, argv[0])
    assert "Traceback" not in proc.stdout
    assert _files(tmp_path / "run") == ([] if status == 2 else ["checkpoint.pt", "config.yaml"])
