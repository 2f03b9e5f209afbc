"""Study panels (raftorch.experiments.study): the gap table, the differences table and the
history figure from saved run folders, checked against hand-computed statistics."""
import json
import math

import pytest
import yaml

from raftorch.experiments import stats
from raftorch.experiments.spec import SpecError, load_spec
from raftorch.experiments.study import difference_rows, gap_rows, histories, write_study

SPEC = {
    "panel": "toy-study", "title": "t", "paper": "-", "claim": "-",
    "base": {"data": "digits", "model": "mlp", "epochs": 4, "eval_every": 2},
    "seeds": [0, 1, 2],
    "series": [{"name": "A", "set": {"rule": "raf"}, "grid": {"train_size": [100, 200]}},
               {"name": "B", "set": {"rule": "bp"}, "grid": {"train_size": [100, 200]}}],
    "figure": {"x": "train_size", "history": {"gaps": [["A", "B"]]},
               "table": {"against": [{"series": "B", "train_size": 200}]}},
}
# test accuracy (%) at epochs 2 and 4 per (series, train_size, seed)
ACC = {("A", 100): [(60, 70), (62, 71), (61, 75)], ("B", 100): [(65, 72), (66, 74), (64, 73)],
       ("A", 200): [(70, 80), (71, 82), (69, 81)], ("B", 200): [(72, 83), (75, 84), (71, 85)]}


def make(tmp_path, spec=SPEC):
    path = tmp_path / "spec" / "toy-study.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    panel = load_spec(path, "toy")
    root = tmp_path / "results"
    for p in panel.points():
        folder = root / "toy" / panel.id / "runs" / p.id
        folder.mkdir(parents=True)
        accs = ACC[(p.series, p.values["train_size"])][p.seed]
        records = []
        for epoch in (1, 2, 3, 4):
            r = {"epoch": epoch, "train_loss": 1.0}
            if epoch % 2 == 0:
                r["test_accuracy"] = accs[epoch // 2 - 1] / 100
            if p.series == "A":
                r["error_alignment"] = {"fc1": 40.0 - epoch, "out": 0.0}
            records.append(r)
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (folder / "final.json").write_text(json.dumps({"test_accuracy": accs[1] / 100,
                                                       "alignment": {"fc1": 50.0, "out": 30.0} if p.series == "A" else {}}))
    return panel, root


def test_gaps_are_paired_intervals_at_every_scored_epoch(tmp_path):
    panel, root = make(tmp_path)
    rows = gap_rows(panel, histories(root, panel, panel.points()), [["A", "B"]])
    assert [(r["train_size"], r["epoch"]) for r in rows] == [("100", 2), ("100", 4), ("200", 2), ("200", 4)]
    d = [a[1] - b[1] for a, b in zip(ACC[("A", 100)], ACC[("B", 100)])]  # -2, -3, 2 at epoch 4
    mean, sd = sum(d) / 3, math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    half = stats.t_quantile(0.975, 2) * sd / math.sqrt(3)
    row = rows[1]
    assert row["difference"] == pytest.approx(mean, abs=1e-3) and row["method"] == "paired" and row["n"] == 3
    assert row["lo"] == pytest.approx(mean - half, abs=1e-3) and row["hi"] == pytest.approx(mean + half, abs=1e-3)


def test_differences_against_a_reference_point_and_the_final_alignment(tmp_path):
    panel, root = make(tmp_path)
    rows = {(r["series"], r["train_size"]): r for r in difference_rows(root, panel, panel.points(),
                                                                        [{"series": "B", "train_size": 200}])}
    a = rows[("A", "200")]
    iv = stats.difference({s: v[1] for s, v in enumerate(ACC[("A", 200)])}, {s: v[1] for s, v in enumerate(ACC[("B", 200)])})
    assert a["test_accuracy_mean"] == pytest.approx(81.0) and a["n"] == 3
    assert a["minus B 200"] == pytest.approx(iv.estimate, abs=1e-3) and a["minus B 200 lo"] == pytest.approx(iv.lo, abs=1e-3)
    assert a["alignment_deg"] == pytest.approx(40.0)  # mean over layers of the final angles
    assert "minus B 200" not in rows[("B", "200")] and rows[("B", "200")]["alignment_deg"] == ""


def test_write_study_draws_the_history_and_writes_both_tables(tmp_path):
    panel, root = make(tmp_path)
    written = write_study(root, panel, panel.points())
    assert sorted(p.name for p in written) == ["differences.csv", "gaps.csv", "history.png"]
    assert all(p.stat().st_size > 0 for p in written)


@pytest.mark.parametrize("figure, message", [
    ({"history": {"gaps": [["A", "C"]]}}, "names no series 'C'"),
    ({"history": {"gaps": ["A"]}}, "figure.history must be a mapping"),
    ({"history": {"pairs": []}}, "figure.history must be a mapping"),
    ({"table": {"against": [{"variant": "x"}]}}, "figure.table must be a mapping"),
    ({"table": {"against": [{"series": "Z"}]}}, "names no series 'Z'"),
])
def test_bad_study_keys_are_one_clear_spec_error(tmp_path, figure, message):
    spec = {**SPEC, "figure": {"x": "train_size", **figure}}
    with pytest.raises(SpecError, match=message):
        make(tmp_path, spec)


def test_the_report_lines_show_the_gap_per_epoch_and_the_differences(tmp_path):
    from raftorch.experiments.study import study_lines
    panel, root = make(tmp_path)
    write_study(root, panel, panel.points())
    text = "\n".join(study_lines(panel, root / "toy" / panel.id))
    assert "![toy-study history](toy-study/history.png)" in text
    assert "| A - B | train_size | epoch 2 | epoch 4 |" in text
    assert "| A - B | 100 | -4.00 [" in text  # epoch 2, 100 images: differences -5, -4, -3
    assert "| A | 200 | 3 | 81.00 ± 1.00 | -3.00 [" in text and "| 40.0 |" in text


def test_the_gap_profile_specs_load_and_every_point_is_a_valid_run():
    from raftorch.training.config import TrainConfig
    from raftorch.experiments import spec as S
    names = S.available("gap")
    assert names == ["vgg-ablations", "vit-ablations", "vgg-convergence", "vit-convergence"]
    for name in names:
        panel = S.load_panel(name, "gap")
        assert panel.control == "no feedback" and (panel.figure.get("history") or panel.figure.get("table"))
        for p in panel.points():
            TrainConfig.from_dict(p.config)
