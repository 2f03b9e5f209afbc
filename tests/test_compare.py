"""End to end on scikit-learn's digits, and the `raftorch compare` command."""
import csv
import json

import pytest
import torch

from raftorch.cli import main
from raftorch.training.compare import plan, run_compare


@pytest.fixture(scope="module")
def digits_runs():
    rows = run_compare(rules=("bp", "raf"), ranks=(10,), epochs=30, seed=0, progress=False)
    return {r.rule: r for r in rows}


@pytest.mark.slow
def test_raf_rank_10_matches_backprop_on_digits(digits_runs):
    bp, raf = digits_runs["bp"], digits_runs["raf"]
    assert bp.test_accuracy > 0.95, bp
    assert raf.test_accuracy >= bp.test_accuracy - 0.015, (raf, bp)


def test_plan_expands_ranks_only_for_low_rank_rules():
    assert plan(("bp", "fa-lowrank", "raf"), (1, 10)) == [
        ("bp", None), ("fa-lowrank", 1), ("fa-lowrank", 10), ("raf", 1), ("raf", 10)]


def test_compare_cli_prints_the_table_and_writes_json_and_csv(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--data", "digits", "--rules", "bp,fa-lowrank", "--ranks", "2", "--epochs", "1", "--seeds", "0",
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


def compare_status(argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of ``raftorch compare ARGV``, whether it returns or exits (argparse)."""
    try:
        code = main(["compare", "--data", "digits", "--no-progress", *argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--rules", "bp,nope"], "unknown rule 'nope'"),
    (["--ranks", "0"], "ranks must be positive integers, got --ranks 0; e.g. --ranks 1,10"),
    (["--ranks", "a"], "comma-separated list of int"),
    (["--epochs", "0"], "--epochs and --batch-size must be positive, got --epochs 0"),
])
def test_compare_cli_rejects_bad_input_with_one_message(argv, message, capsys):
    code, err = compare_status(argv, capsys)
    assert code == 2 and message in err


@pytest.mark.parametrize("argv,message", [
    (["--rules", ""], "raftorch compare: error: --rules is empty (it names no rule); give at least one, "
                      "e.g. --rules bp,fa-lowrank,raf,frozen"),
    (["--rules", ","], "--rules is empty"),
    (["--ranks", ""], "raftorch compare: error: --ranks is empty (it names no rank); give at least one, "
                      "e.g. --ranks 1,10"),
    (["--hidden", "0"], "raftorch compare: error: hidden widths must be positive whole numbers, got --hidden 0; "
                        "e.g. --hidden 256,256"),
    (["--hidden", "32,-1"], "got --hidden 32,-1"),
    (["--hidden", ""], "raftorch compare: error: --hidden is empty"),
])
def test_an_empty_or_impossible_list_is_one_line_with_exit_status_2_and_writes_nothing(argv, message, tmp_path,
                                                                                         capsys):
    """These used to write an empty table (--rules "", --ranks "") or print a traceback (--hidden 0)."""
    code, err = compare_status([*argv, "--epochs", "1", "--seeds", "0", "--out", str(tmp_path / "c")], capsys)
    assert code == 2
    assert err.startswith("raftorch compare: error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_compare_obeys_threads_and_records_them(tmp_path):
    before = torch.get_num_threads()
    assert main(["compare", "--data", "digits", "--rules", "bp", "--epochs", "1", "--hidden", "8", "--threads", "1",
                 "--no-progress", "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["settings"]["threads"] == 1
    assert torch.get_num_threads() == before  # the caller's thread count is restored


def test_compare_missing_data_and_unwritable_out_are_one_message_before_any_work(tmp_path, capsys):
    code, err = compare_status(["--data", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "c")],
                               capsys)
    assert code == 1 and "dataset 'cifar10' not found" in err and "Traceback" not in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = compare_status(["--rules", "bp", "--out", str(blocker / "c")], capsys)
    assert code == 1 and "is not a writable folder" in err


def test_compare_reports_mean_and_std_over_seeds(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--data", "digits", "--rules", "bp,raf", "--ranks", "4", "--epochs", "2", "--seeds", "0,1,2",
                 "--hidden", "16", "--no-progress", "--out", str(out)]) == 0
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert [(r["rule"], r["seed"]) for r in saved["rows"]] == [("bp", 0), ("raf", 0), ("bp", 1), ("raf", 1),
                                                                ("bp", 2), ("raf", 2)]
    import statistics
    for g in saved["summary"]:
        accs = [100 * r["test_accuracy"] for r in saved["rows"] if r["rule"] == g["rule"]]
        assert g["n"] == 3 and g["test_accuracy_mean"] == pytest.approx(statistics.fmean(accs))
        assert g["test_accuracy_std"] == pytest.approx(statistics.stdev(accs))
    bp = next(g for g in saved["summary"] if g["rule"] == "bp")
    assert f"| bp | full | {bp['test_accuracy_mean']:.2f} ± {bp['test_accuracy_std']:.2f} | 3 |" in capsys.readouterr().out
    # seeds differ (else the spread would say nothing): the three bp runs are not all equal
    assert len({r["train_loss"] for r in saved["rows"] if r["rule"] == "bp"}) == 3


@pytest.mark.slow
def test_compare_names_its_output_by_the_settings_and_never_overwrites_others(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = ["compare", "--data", "digits", "--rules", "bp", "--epochs", "1", "--seeds", "0", "--hidden", "8", "--no-progress"]
    assert main(base) == 0 and main([*base[:-1], "--lr", "0.01", "--no-progress"]) == 0
    files = sorted(p.name for p in (tmp_path / "results").glob("compare-digits-mlp-*.json"))
    assert len(files) == 2  # two settings, two files
    again = capsys.readouterr()
    assert main(base) == 0 and len(list((tmp_path / "results").glob("*.json"))) == 2  # same settings: same file
    out = str(tmp_path / "mine")
    assert main([*base, "--out", out]) == 0
    capsys.readouterr()
    assert main([*base, "--lr", "0.5", "--out", out]) == 1
    assert "other settings; choose another --out, or --force" in capsys.readouterr().err
    assert json.loads((tmp_path / "mine.json").read_text())["settings"]["lr"] == 1e-3  # untouched
    assert main([*base, "--lr", "0.5", "--out", out, "--force"]) == 0
    assert json.loads((tmp_path / "mine.json").read_text())["settings"]["lr"] == 0.5
    del again


def test_compare_takes_any_model(tmp_path):
    out = tmp_path / "ret"
    assert main(["compare", "--data", "digits", "--model", "retina", "--model-option", "channels=2", "--model-option", "bottleneck=2",
                 "--model-option", "kernel=3", "--model-option", "vvs_layers=1", "--model-option", "fc=8",
                 "--rules", "bp,raf", "--ranks", "1", "--epochs", "1", "--seeds", "0", "--no-progress",
                 "--out", str(out)]) == 0
    saved = json.loads((tmp_path / "ret.json").read_text())
    assert saved["settings"]["model"] == "retina" and saved["settings"]["model_option"]["channels"] == 2
    assert [r["rule"] for r in saved["rows"]] == ["bp", "raf"]


@pytest.mark.parametrize("argv,message", [
    (["--model", "vgg", "--hidden", "8"], "--hidden sets the MLP's widths"),
    (["--model-option", "nope=1"], "has no option(s) 'nope'"),
    (["--seeds", "1,1"], "--seeds must be distinct"),
])
def test_compare_rejects_settings_it_cannot_honour(argv, message, tmp_path, capsys):
    code, err = compare_status(["--epochs", "1", *argv, "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and message in err and list(tmp_path.iterdir()) == []


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, capfd):
    """Captured output (a log, CI, a pipe) gets the table, not a bar redrawn per epoch."""
    assert main(["compare", "--data", "digits", "--rules", "bp", "--epochs", "2", "--seeds", "0", "--hidden", "8",
                 "--out", str(tmp_path / "c")]) == 0
    out, err = capfd.readouterr()
    assert "| bp | full |" in out
    assert "epoch/s" not in err and "compare:" not in err


def test_without_data_it_compares_on_fashion_mnist_with_its_preset_else_on_digits_saying_so(tmp_path, monkeypatch,
                                                                                              capsys):
    import raftorch.training.compare as C
    import raftorch.training.data as D

    seen = {}

    def fake_run_compare(**kw):
        seen.update(kw)
        return [C.Row("bp", None, 0.5, 1.0, 0.1, None, 0)]

    monkeypatch.setattr(C, "run_compare", fake_run_compare)
    monkeypatch.setattr(D, "find_fashion_mnist", lambda data_dir=None: tmp_path)  # "found"
    assert main(["compare", "--rules", "bp", "--seeds", "0", "--no-progress", "--out", str(tmp_path / "a")]) == 0
    assert (seen["dataset"], seen["train_size"], seen["epochs"], seen["batch_size"]) == ("fashion-mnist", 10000, 10, 64)
    assert json.loads((tmp_path / "a.json").read_text())["settings"]["data"] == "fashion-mnist"
    assert "not installed" not in capsys.readouterr().err
    # an explicit setting wins over the preset
    assert main(["compare", "--rules", "bp", "--seeds", "0", "--epochs", "3", "--train-size", "500",
                 "--no-progress", "--out", str(tmp_path / "b")]) == 0
    assert (seen["epochs"], seen["train_size"], seen["batch_size"]) == (3, 500, 64)

    monkeypatch.setattr(D, "find_fashion_mnist", lambda data_dir=None: None)  # not installed
    capsys.readouterr()
    assert main(["compare", "--rules", "bp", "--seeds", "0", "--no-progress", "--out", str(tmp_path / "c")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["raftorch compare: Fashion-MNIST is not installed, so this compares on scikit-learn's digits "
                   "(install Debian's dataset-fashion-mnist, or give --data fashion-mnist --download)"]
    assert (seen["dataset"], seen["train_size"], seen["epochs"], seen["batch_size"]) == ("digits", None, 30, 32)
