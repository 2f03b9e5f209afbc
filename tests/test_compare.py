"""End to end on scikit-learn's digits, and the `raftorch compare` command."""
import csv
import json

import pytest
import torch

from raftorch.cli import main
from raftorch.compare import plan, run_compare


@pytest.fixture(scope="module")
def digits_runs():
    rows = run_compare(rules=("bp", "raf"), ranks=(10,), epochs=30, seed=0, progress=False)
    return {r.rule: r for r in rows}


def test_raf_rank_10_matches_backprop_on_digits(digits_runs):
    bp, raf = digits_runs["bp"], digits_runs["raf"]
    assert bp.test_accuracy > 0.95, bp
    assert raf.test_accuracy >= bp.test_accuracy - 0.015, (raf, bp)


def test_plan_expands_ranks_only_for_low_rank_rules():
    assert plan(("bp", "fa-lowrank", "raf"), (1, 10)) == [
        ("bp", None), ("fa-lowrank", 1), ("fa-lowrank", 10), ("raf", 1), ("raf", 10)]


def test_compare_cli_prints_the_table_and_writes_json_and_csv(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--rules", "bp,fa-lowrank", "--ranks", "2", "--epochs", "1",
                 "--hidden", "32", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| bp | full |" in text and "| fa-lowrank | 2 |" in text
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert [(r["rule"], r["rank"]) for r in saved["rows"]] == [("bp", None), ("fa-lowrank", 2)]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in saved["rows"])
    assert saved["settings"]["epochs"] == 1
    assert saved["settings"]["threads"] >= 1 and saved["settings"]["torch"] == torch.__version__
    with open(tmp_path / "cmp.csv") as f:
        assert [r["rule"] for r in csv.DictReader(f)] == ["bp", "fa-lowrank"]


@pytest.mark.parametrize("argv,message", [
    (["--rules", "bp,nope"], "unknown rule 'nope'"),
    (["--ranks", "0"], "ranks must be positive integers"),
    (["--ranks", "a"], "comma-separated list of int"),
    (["--epochs", "0"], "--epochs and --batch-size must be positive"),
])
def test_compare_cli_rejects_bad_input_with_one_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--no-progress", *argv])
    assert message in str(exc.value) + capsys.readouterr().err


def test_compare_obeys_threads_and_records_them(tmp_path):
    before = torch.get_num_threads()
    assert main(["compare", "--rules", "bp", "--epochs", "1", "--hidden", "8", "--threads", "1",
                 "--no-progress", "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["settings"]["threads"] == 1
    assert torch.get_num_threads() == before  # the caller's thread count is restored


def test_compare_missing_data_and_unwritable_out_are_one_message_before_any_work(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--data", "cifar10", "--data-dir", str(tmp_path), "--no-progress",
              "--out", str(tmp_path / "c")])
    assert "dataset 'cifar10' not found" in str(exc.value)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--rules", "bp", "--no-progress", "--out", str(blocker / "c")])
    assert "is not a writable folder" in str(exc.value)
