"""The training command: determinism, resume after a kill, divergence, run folder, CLI, DDP."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import raftorch.training.cli as train_cli
import raftorch.training.loop as T
from raftorch.training.checkpoint import load_checkpoint
from raftorch.cli import main as cli_main
from raftorch.training.config import TrainConfig

# a tiny run on digits: an MLP with dropout and BatchNorm, RAF with the output layer's P on the
# targets, augmentation: every source of randomness a resumed run must reproduce
TINY = dict(data="digits", model="mlp", model_options={"hidden": [24, 24], "dropout": 0.1, "batchnorm": True},
            rule="raf", rank=4, layer_options={"out": {"oja_source": "target"}}, crop_padding=1, flip=True,
            optimizer="adam", amsgrad=True, lr=3e-3, weight_decay=1e-4, lr_decay=0.9, batch_size=128,
            epochs=4, seed=3, val_fraction=0.1, device="cpu", threads=1)
TIMING = {"seconds", "eval_seconds", "seconds_per_epoch", "seconds_total"}


def untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoint.pt")["model"]


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_same_seed_gives_the_same_numbers(tmp_path):
    a = T.train(dict(TINY, epochs=2, out=str(tmp_path / "a")), progress=False)
    b = T.train(dict(TINY, epochs=2, out=str(tmp_path / "b")), progress=False)
    c = T.train(dict(TINY, epochs=1, seed=4), progress=False)
    assert untimed(a) == untimed(b)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    first_epoch_a = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0])
    assert c["test_loss"] != first_epoch_a["test_loss"]  # another seed, other numbers


def test_resume_after_a_stop_and_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    full = T.train(dict(TINY, out=str(tmp_path / "full")), progress=False)

    # stopped after epoch 2 of 4 (as a job killed between epochs), then resumed
    part = T.train(dict(TINY, out=str(tmp_path / "stopped")), progress=False, stop_after=2)
    assert part["stopped_after_epoch"] == 2 and not (tmp_path / "stopped" / "final.json").exists()
    resumed = T.train(dict(TINY, out=str(tmp_path / "stopped")), resume=True, progress=False)
    assert untimed(resumed) == untimed(full)
    assert_same_weights(weights(tmp_path / "stopped"), weights(tmp_path / "full"))

    # killed in the middle of epoch 3: the process dies after the epoch-2 checkpoint
    calls = {"n": 0}
    real_step = torch.optim.Adam.step
    steps_per_epoch = -(-len(T.load_dataset("digits", val_fraction=0.1).x_train) // TINY["batch_size"])

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * steps_per_epoch + 5:  # step 5 of epoch 3
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        T.train(dict(TINY, out=str(tmp_path / "crashed")), progress=False)
    assert load_checkpoint(tmp_path / "crashed" / "checkpoint.pt")["epoch"] == 2
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    resumed = T.train(dict(TINY, out=str(tmp_path / "crashed")), resume=True, progress=False)
    assert untimed(resumed) == untimed(full)
    lines = (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
    full_lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    assert [untimed(json.loads(x)) for x in lines] == [untimed(json.loads(x)) for x in full_lines]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    T.train(dict(TINY, out=str(out)), progress=False, stop_after=1)
    good = weights(out)
    real_load = T.load_dataset

    def poisoned(*args, **kwargs):
        splits = real_load(*args, **kwargs)
        splits.x_train[0, 0, 0, 0] = float("nan")
        return splits

    with pytest.raises(T.TrainingDiverged, match=r"loss is nan at epoch 2.*last good checkpoint.*epoch 1"):
        T.train(dict(TINY, out=str(out)), resume=True, progress=False, load=poisoned)
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert_same_weights(weights(out), good)
    assert not (out / "final.json").exists()


def test_cli_writes_config_metrics_checkpoint_and_final(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"model": "mlp", "model_options": {"hidden": [16]}, "epochs": 5,
                                   "lr": 0.01, "optimizer": "sgd", "momentum": 0.9, "rule": "kp"}))
    out = tmp_path / "run"
    threads_before = torch.get_num_threads()
    rc = cli_main(["train", "--config", str(cfg), "--epochs", "2", "--model-option", "batchnorm=true",
                   "--val-fraction", "0.2", "--feedback-lr", "0.001", "--threads", "1", "--out", str(out),
                   "--no-progress"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.yaml", "final.json", "metrics.csv", "metrics.jsonl"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epochs"] == 2 and saved["lr"] == 0.01 and saved["optimizer"] == "sgd"  # flags over file
    assert saved["model_options"] == {"hidden": [16], "batchnorm": True} and saved["feedback_lr"] == 0.001
    final = json.loads((out / "final.json").read_text())
    assert 0.0 <= final["test_accuracy"] <= 1.0 and final["epochs"] == 2
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"train_loss", "train_accuracy", "val_accuracy", "test_accuracy", "alignment", "seconds"} <= records[0].keys()
    assert set(records[0]["alignment"]) == {"fc1", "out"}
    assert records[1]["test_accuracy"] == final["test_accuracy"]
    # a second run into the same folder is refused; --resume of a finished run changes nothing
    assert cli_main(["train", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 2  # bad input
    assert "already holds a run" in capsys.readouterr().err
    assert cli_main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0
    assert saved["threads"] == 1 and torch.get_num_threads() == threads_before  # restored after the run
    assert json.loads((out / "final.json").read_text())["test_loss"] == final["test_loss"]


def test_resuming_with_other_settings_is_refused(tmp_path):
    T.train(dict(TINY, out=str(tmp_path)), progress=False, stop_after=1)
    with pytest.raises(ValueError, match="cannot resume.*lr: run has 0.003, given 0.1"):
        T.train(dict(TINY, lr=0.1, out=str(tmp_path)), resume=True, progress=False)


def test_feedback_parameters_get_their_own_learning_rate():
    cfg = TrainConfig.from_dict(dict(TINY, rule="kp", rank=None, layer_options={}, feedback_lr=0.5,
                                     feedback_weight_decay=0.0))
    model = T.convert_model(T.build_model("mlp", (1, 8, 8), 10, hidden=[8]), cfg)
    opt = T.make_optimizer(model, cfg, torch.device("cpu"))
    assert [len(g["params"]) for g in opt.param_groups] == [4, 2]  # fc1/out W, b | fc1.B, out.B
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["weight_decay"] == 0.0
    assert opt.param_groups[0]["lr"] == cfg.lr and opt.param_groups[0]["amsgrad"] is True


@pytest.mark.parametrize("args, fragment", [
    (["--model", "resnet"], "unknown model 'resnet'"),
    (["--data", "mnist"], "unknown dataset 'mnist'"),
    (["--optimizer", "lion"], "unknown optimizer 'lion'"),
    (["--rule", "magic"], "unknown rule 'magic'"),
    (["--model-option", "depth=3"], "no option(s) 'depth'"),
    (["--lr-decay", "1.5"], "lr_decay"),
    (["--momentum", "0.9"], "momentum applies to sgd / rmsprop"),
    (["--data", "cifar10", "--data-dir", "/nonexistent"], "the data folder /nonexistent (data_dir / --data-dir) does not exist"),
])
def test_bad_input_is_one_clear_error(tmp_path, capsys, args, fragment):
    rc = cli_main(["train", *args, "--epochs", "1", "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and fragment in err and "Traceback" not in err  # bad input: exit status 2


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """torchrun, 2 gloo processes, each taking half of every global batch of 16."""
    torchrun = Path(sys.executable).with_name("torchrun")
    common = ["--data", "digits", "--model", "mlp", "--model-option", "hidden=[32]", "--rule", "raf-q",
              "--rank", "4", "--batch-size", "16", "--epochs", "1", "--lr", "0.01", "--seed", "1",
              "--device", "cpu", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "raftorch", "train",
                           *common, "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = T.train(train_cli.config_from_args(_parse(common + ["--out", str(tmp_path / "one")])), progress=False)
    ddp, one = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    assert ddp.keys() == one.keys()
    for k in one:
        assert torch.allclose(ddp[k], one[k], rtol=1e-4, atol=1e-5), k
    assert not torch.equal(one["fc1.weight"], load_checkpoint(tmp_path / "one" / "checkpoint.pt")["model"]["fc1.Q"])
    final = json.loads((tmp_path / "ddp" / "final.json").read_text())
    assert final["world_size"] == 2 and abs(final["test_accuracy"] - single["test_accuracy"]) <= 1 / 360


def test_every_example_config_is_valid_and_takes_flag_overrides():
    root = Path(__file__).resolve().parents[1] / "configs"
    # panel specs (configs/experiments, configs/variants: a top-level "panel" key) are test_experiments'
    files = sorted(f for f in root.rglob("*.yaml")
                   if "experiments" not in f.parts and "panel" not in (yaml.safe_load(f.read_text()) or {}))
    assert len(files) >= 8
    for f in files:
        cfg = train_cli.config_from_args(_parse(["--config", str(f), "--rule", "bp", "--rank", "none", "--out", "x"]))
        assert cfg.rule == "bp" and cfg.rank is None and cfg.out == "x"
        assert TrainConfig.from_dict(yaml.safe_load(f.read_text()), source=str(f)).epochs >= 1


def _parse(argv):
    import argparse

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_resume_of_a_folder_that_holds_no_run_stops_with_one_line(tmp_path, capsys):
    missing = tmp_path / "typo"
    assert cli_main(["train", "--resume", "--out", str(missing), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "does not exist" in err and "Traceback" not in err
    assert not missing.exists()  # no new default run was started there
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no checkpoint.pt"):
        T.train(dict(TINY, out=str(empty)), resume=True, progress=False)


def test_eval_every_skips_evaluation_but_never_the_last_epoch(tmp_path):
    final = T.train(dict(TINY, epochs=3, eval_every=0, out=str(tmp_path)), progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert ["test_accuracy" in r for r in lines] == [False, False, True]
    full = T.train(dict(TINY, epochs=3), progress=False)
    assert final["test_accuracy"] == full["test_accuracy"]  # evaluation does not change training


def test_the_thread_count_used_is_recorded_and_an_explicit_one_obeyed(tmp_path, monkeypatch):
    final = T.train(dict(TINY, epochs=1, threads=1, out=str(tmp_path / "one")), progress=False)
    assert final["threads"] == 1 and final["torch"] == torch.__version__
    monkeypatch.setattr(T, "auto_threads", lambda: 2)
    final = T.train(dict(TINY, epochs=1, threads=None, out=str(tmp_path / "auto")), progress=False)
    assert final["threads"] == 2
    assert yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["threads"] == 2  # a resume uses it too


@pytest.mark.parametrize("argv, message", [
    (["--lr", "nan"], "lr (--lr) must be a finite number, got nan"),
    (["--rank", "0"], "rank must be a positive whole number"),
])
def test_bad_flags_get_one_line_with_one_prefix(tmp_path, capsys, argv, message):
    assert cli_main(["train", *argv, "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("raftorch train") == 1 and len(err.splitlines()) == 1


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("raftorch ")


def test_an_unknown_rule_lists_the_direct_rules_too():
    from raftorch.rules import get_rule

    with pytest.raises(ValueError, match=r"'raf', or a direct rule \('dfa', 'draf'\)"):
        get_rule("magic")


def test_metrics_csv_is_the_jsonl_as_a_table(tmp_path):
    T.train(dict(TINY, epochs=2, out=str(tmp_path)), progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    import csv

    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert len(rows) == 2 and float(rows[1]["test_accuracy"]) == lines[1]["test_accuracy"]
    assert float(rows[0]["alignment.fc1"]) == pytest.approx(lines[0]["alignment"]["fc1"])


def test_an_unwritable_out_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli_main(["train", "--out", str(blocker / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is not a writable folder" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_corrupt_checkpoint_is_one_line(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError) as err:
        load_checkpoint(tmp_path / "checkpoint.pt")
    assert "is corrupt" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_ctrl_c_keeps_the_last_epoch_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "raftorch", "train", "--data", "digits", "--model", "mlp", "--rule", "raf",
           "--rank", "4", "--epochs", "500", "--threads", "1", "--device", "cpu", "--no-progress",
           "--out", str(out)]
    # Ctrl-C's default action in the child even where the tests themselves run in the
    # background (`cmd &` ignores SIGINT, and a child inherits that)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / "checkpoint.pt").exists():
        time.sleep(0.01)

    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"raftorch train --resume --out {out}" in err and "Traceback" not in err
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] >= 1
