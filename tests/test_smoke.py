"""`raftorch reproduce all --profile paper --smoke`, run here on the CPU at tiny size: the device
checks, one short point of every panel, one table row per panel; synthetic data announced
where a dataset is missing; a failed check or point makes the exit status non-zero; nothing
is written."""
from __future__ import annotations

import math

import pytest

from raftorch.training import data as D
from raftorch import functional as RF
from raftorch.cli import main as cli_main
from raftorch.experiments.spec import available, load_panel
from raftorch.experiments.smoke import steps_per_point
from test_data import write_fake_cifar

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ("--smoke", "--smoke-scale", "tiny", "--smoke-steps", "2", "--device", "cpu", "--threads", "1")


def smoke_cli(*args) -> int:
    return cli_main(["reproduce", "--profile", "paper", *TINY, *map(str, args)])


def table_rows(out: str) -> dict[str, list[str]]:
    """The smoke table's rows by panel (columns split on runs of two or more spaces)."""
    import re

    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("panel ") and "s/step" in line)
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith("total"):
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells
    return rows


@pytest.fixture
def cifar10_only(tmp_path, monkeypatch):
    """A data folder with (fake) CIFAR-10 and no CIFAR-100; the test runs in an empty folder."""
    data = tmp_path / "data"
    write_fake_cifar(data, "cifar10", per_batch=8)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return data


@pytest.mark.slow
def test_paper_smoke_has_one_row_per_panel_and_announces_synthetic_data_where_cifar_is_missing(
        cifar10_only, capsys):
    rc = smoke_cli("all", "--data-dir", cifar10_only)
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = table_rows(out)
    assert list(rows) == available("paper"), out
    assert rows["fig2"][2] == "theory"
    assert rows["fig3c"][2] == "synthetic"  # CIFAR-100 is missing
    assert all(rows[p][2] == "real" for p in available("paper") if p not in ("fig2", "fig3c")), out
    announced = [line for line in out.splitlines() if "SYNTHETIC" in line]
    assert announced == [f"fig3c: cifar100:50 not found under {cifar10_only}: SYNTHETIC data of its shape "
                         f"(3x16x16, 50 classes) stands in (--smoke only)"], out
    assert "--smoke-scale tiny: models shrunk" in out
    assert all(float(rows[p][4]) > 0 for p in rows), out  # seconds per step
    # points x steps per point from the spec: epochs x ceil(train images / batch), CIFAR-10 50,000
    # training images, the first K classes of CIFAR-100 500 each (paper: fig3a 220 x 160 x 1,563)
    for name in ("fig3a", "fig3c"):
        points = load_panel(name, "paper").points()
        images = [50_000 if p.config["data"] == "cifar10" else 500 * int(p.config["data"].split(":")[1])
                  for p in points]
        steps = [p.config["epochs"] * math.ceil(n / p.config["batch_size"]) for p, n in zip(points, images)]
        span = f"{min(steps):,}" + (f"-{max(steps):,}" if max(steps) != min(steps) else "")
        assert rows[name][6] == f"{len(points)} x {span}", (name, rows[name])
    assert "PASS  (iii) low-rank Conv2d" in out and "FAIL" not in out
    assert out.rstrip().splitlines()[-1].startswith("smoke: OK: ")
    assert list((cifar10_only.parent / "work").iterdir()) == []  # nothing written


def test_a_failing_check_or_a_failing_point_makes_the_exit_status_non_zero(cifar10_only, capsys, monkeypatch):
    # the low-rank conv's input gradient 0.1% off: the device checks that compare it fail
    real = RF.ConvGeometry.input_grad
    monkeypatch.setattr(RF.ConvGeometry, "input_grad", lambda self, z, x, k: 1.001 * real(self, z, x, k))
    rc = smoke_cli("fig3b", "--data-dir", cifar10_only)
    out = capsys.readouterr().out
    assert rc == 1, out
    assert any(line.startswith("FAIL  (iii) low-rank Conv2d") for line in out.splitlines()), out
    assert out.rstrip().splitlines()[-1].startswith("smoke: FAILED: "), out
    monkeypatch.undo()

    # a point that diverges: its FAIL line, FAILED in the table, exit status 1
    import raftorch.training.loop as T

    def diverge(run, **kw):
        raise T.TrainingDiverged("loss is nan at epoch 1, step 1: training diverged\nsecond line")
    monkeypatch.setattr(T, "train_epoch", diverge)
    rc = smoke_cli("fig3b", "--data-dir", cifar10_only)
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "FAIL  fig3b raf_rank-1_s0: TrainingDiverged: loss is nan at epoch 1, step 1: training diverged" in out
    assert "second line" not in out
    assert table_rows(out)["fig3b"][4] == "FAILED"
    assert out.rstrip().splitlines()[-1] == "smoke: FAILED: 0 check(s) and 1 of 1 point(s) (the FAIL lines above)"


@pytest.mark.parametrize("args,message", [
    (("fig3b", "--smoke", "--smoke-steps", "0"), "--smoke-steps must be a positive whole number"),
    (("fig3b", "--smoke-steps", "3"), "give --smoke too"),
    (("fig3b", "--smoke", "--dry-run"), "--dry-run does not apply"),
    (("fig3b", "--smoke", "--device", "gpu0"), "--device must be cpu, cuda or cuda:N"),
])
def test_bad_smoke_arguments_are_one_line_errors(args, message, capsys):
    assert cli_main(["reproduce", "--profile", "paper", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_train_images_counts_what_load_dataset_keeps_without_loading_it():
    for kw in ({}, {"val_fraction": 0.15}, {"val_fraction": 0.15, "train_size": 500}):
        assert D.train_images("digits", **kw) == len(D.load_dataset("digits", **kw).x_train), kw
    assert D.train_images("cifar10") == 50_000
    assert D.train_images("cifar10", val_fraction=0.1) == 45_000
    assert D.train_images("cifar100:50") == 25_000
    assert D.train_images("fashion-mnist", train_size=6000) == 6000
    point = load_panel("fig3e", "paper").points()[0]  # batch 64, 250 epochs
    assert steps_per_point(point.config) == 250 * 782


def test_synthetic_data_has_the_shape_and_classes_of_the_dataset_it_stands_in_for():
    s = D.synthetic_like("cifar100:50", n_train=120, n_test=10, grayscale=True, image_size=16)
    assert s.name == "synthetic:cifar100:50"
    assert s.input_shape == (1, 16, 16) and s.num_classes == 50
    assert len(s.x_train) == 120 and len(s.x_test) == 10
    assert set(s.y_train.tolist()) <= set(range(50)) and len(set(s.y_train.tolist())) == 50
    with pytest.raises(D.DatasetNotFoundError):  # load_dataset never falls back to it
        D.load_dataset("cifar10", data_dir=D.Path("/nonexistent-raftorch-data"))


def test_time_steps_times_the_optimizer_steps_after_the_warm_up_across_epochs(monkeypatch):
    import raftorch.training.loop as T
    from raftorch.training.config import TrainConfig
    from raftorch.experiments.smoke import time_steps

    forwards = []
    real_setup = T.setup

    def counting_setup(cfg, **kw):
        run = real_setup(cfg, **kw)
        run.model.register_forward_hook(lambda *a: forwards.append(1))
        return run
    monkeypatch.setattr(T, "setup", counting_setup)
    # 64 images in batches of 8, two per optimizer step: 4 steps per epoch, so 3 + 3 steps take two epochs
    cfg = TrainConfig.from_dict({"data": "digits", "model": "mlp", "model_options": {"hidden": [16]},
                                 "rule": "raf", "rank": 2, "train_size": 64, "batch_size": 8, "accumulate": 2,
                                 "device": "cpu", "threads": 1})
    data = D.load_dataset("digits", train_size=64)
    seconds, peak = time_steps(cfg, data, steps=3, warmup=3)
    assert len(seconds) == 3 and all(s > 0 for s in seconds) and peak is None
    assert len(forwards) == 6 * 2
