"""Front-door details: messages during a progress bar get their own line; Figure 2's legend
covers no curve and explains the P-alignment lines."""
from __future__ import annotations

import io
import json
import logging
import sys

import pytest
from tqdm import tqdm

from raftorch.cli import _show_progress_messages


def test_a_message_during_a_progress_bar_gets_its_own_line(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    _show_progress_messages()
    with tqdm(total=3, file=err, ascii=True) as bar:
        bar.update(1)
        logging.getLogger("raftorch").info("loading the fast path")
        bar.update(1)
    lines = err.getvalue().replace("\r", "\n").split("\n")
    msg = [line for line in lines if "loading the fast path" in line]
    assert msg == ["raftorch: loading the fast path"]  # nothing of the bar on the message's line


@pytest.mark.slow
def test_figure_2_has_one_legend_below_the_panels_with_the_alignment_lines_explained(tmp_path):
    from raftorch.theory import figure as F
    from raftorch.theory.result import load_results
    import raftorch.cli as cli

    out = tmp_path / "th"
    assert cli.main(["theory", "--out", str(out), "--method", "ode", "--t-end", "2"]) == 0
    meta, results = load_results(out / "theory.json")
    fig = F.build_figure(meta, results)
    assert all(ax.get_legend() is None for ax in fig.axes)  # nothing drawn over the curves
    assert len(fig.legends) == 1
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert [lab for lab in labels if lab.startswith("mode ")] == [f"mode {i}" for i in range(1, 6)]
    assert any("P alignment" in lab and "colour" in lab for lab in labels)
    assert fig.legends[0].get_window_extent(fig.canvas.get_renderer()).y1 < min(
        ax.get_window_extent().y0 for ax in fig.axes)  # below every panel


def _tiny(tmp_path, name, **kw):
    return {"data": "digits", "model": "mlp", "model_options": {"hidden": [8]}, "rule": "raf", "rank": 2,
            "epochs": 2, "batch_size": 64, "threads": 1, "eval_every": 1, "out": str(tmp_path / name), **kw}


def test_tensorboard_writes_every_epoch_number_as_a_scalar(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from raftorch.training.loop import train

    train(_tiny(tmp_path, "tb", tensorboard=True), progress=False)
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train_loss", "test_accuracy", "lr"} <= set(tags)
    assert any(t.startswith("alignment/") for t in tags)
    history = [json.loads(line) for line in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    events = acc.Scalars("train_loss")
    assert [e.step for e in events] == [1, 2]
    assert [e.value for e in events] == pytest.approx([h["train_loss"] for h in history], rel=1e-6)


def test_tensorboard_needs_a_run_folder_and_is_off_by_default(tmp_path):
    from raftorch.training.loop import train

    with pytest.raises(ValueError, match="tensorboard writes into the run folder"):
        train({**_tiny(tmp_path, "x", tensorboard=True), "out": None}, progress=False)
    train(_tiny(tmp_path, "plain"), progress=False)
    assert not (tmp_path / "plain" / "tensorboard").exists()


def test_a_run_folder_from_before_a_new_setting_is_neither_stale_nor_unresumable(tmp_path):
    """Fields added later (accumulate, output_init, tensorboard, ...) default to the earlier
    behaviour: a folder whose config lacks them is the same run."""
    import yaml

    from raftorch.training.checkpoint import load_checkpoint, save_checkpoint
    from raftorch.training.config import TrainConfig
    from raftorch.training.loop import train

    cfg = _tiny(tmp_path, "old", epochs=1)
    train({**cfg, "epochs": 2}, progress=False, stop_after=1)
    folder = tmp_path / "old"
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    for k in ("accumulate", "output_init", "tensorboard"):
        saved.pop(k, None)
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))
    state = load_checkpoint(folder / "checkpoint.pt")
    for k in ("accumulate", "output_init", "tensorboard"):
        state["config"].pop(k, None)
    save_checkpoint(folder / "checkpoint.pt", state)
    assert TrainConfig.completed(saved) == TrainConfig.from_dict({**cfg, "epochs": 2}).to_dict() | {
        "threads": saved["threads"]}
    done = train({**cfg, "epochs": 2}, resume=True, progress=False)  # resumes, no "different settings"
    assert done["epochs"] == 2


def test_reproduce_does_not_call_a_folder_from_before_a_new_setting_stale(tmp_path):
    import yaml

    from raftorch.cli import main

    spec = {"panel": "tiny", "title": "tiny", "seeds": [0],
            "base": {"data": "digits", "model": "mlp", "model_options": {"hidden": [8]}, "epochs": 1,
                     "batch_size": 64, "eval_every": 0},
            "series": [{"name": "BP", "set": {"rule": "bp"}}]}
    path = tmp_path / "quick" / "tiny.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(spec))
    args = ["reproduce", "--spec", str(path), "--results", str(tmp_path / "res"), "--no-progress",
            "--jobs", "1", "--threads", "1"]
    assert main(args) == 0
    cfg_file = tmp_path / "res" / "quick" / "tiny" / "runs" / "bp_s0" / "config.yaml"
    saved = yaml.safe_load(cfg_file.read_text())
    del saved["accumulate"], saved["output_init"]
    cfg_file.write_text(yaml.safe_dump(saved))
    assert main(args) == 0  # skipped as finished, not refused as stale
    saved["lr"] = 0.5  # a real difference still is
    cfg_file.write_text(yaml.safe_dump(saved))
    assert main(args) == 2
