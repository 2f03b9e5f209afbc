"""The retina fix (``output_init: zero``) and the receptive-field analysis wired into
``raftorch reproduce`` (a panel's ``analysis``: scores per run, summary columns, claims on
them, the fields figures, redraw)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from raftorch.cli import main as cli_main
from raftorch.training.config import TrainConfig
from raftorch.experiments.spec import SpecError, load_spec
from raftorch.models import build_model, zero_output_layer_
from raftorch.training.loop import train

TINY_RETINA = {"channels": 3, "bottleneck": 3, "kernel": 3, "vvs_layers": 1, "fc": 8}


def test_zero_output_layer_zeroes_the_last_weight_layer_only():
    torch.manual_seed(0)
    net = build_model("retina", (1, 8, 8), 10, **TINY_RETINA)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert zero_output_layer_(net) == "classifier.fc2"
    for k, v in net.state_dict().items():
        if k.startswith("classifier.fc2."):
            assert torch.count_nonzero(v) == 0
        else:
            assert torch.equal(v, before[k]), k
    mlp = build_model("mlp", (64,), 10, hidden=[16])
    assert zero_output_layer_(mlp) == [n for n, m in mlp.named_modules() if isinstance(m, nn.Linear)][-1]
    with pytest.raises(ValueError, match="no Linear / Conv2d"):
        zero_output_layer_(nn.Sequential(nn.ReLU()))


def test_output_init_is_validated_and_applied_before_the_rule(tmp_path):
    with pytest.raises(ValueError, match="output_init must be null"):
        TrainConfig.from_dict({"output_init": "ones"})
    common = dict(data="digits", model="retina", model_options=TINY_RETINA, rule="raf", rank="full",
                  epochs=1, batch_size=64, threads=1, eval_every=0)
    # zero init: after one step from W = 0 the output layer holds exactly minus its first updates
    run = train({**common, "output_init": "zero", "out": str(tmp_path / "z")}, progress=False)
    cfg = yaml.safe_load((tmp_path / "z" / "config.yaml").read_text())
    assert cfg["output_init"] == "zero" and run["test_accuracy"] > 0
    # without: the same run differs (the option did something), and old configs (no key) load as None
    assert TrainConfig.from_dict({}).output_init is None
    other = train({**common, "out": str(tmp_path / "n")}, progress=False)
    assert other["test_accuracy"] != run["test_accuracy"] or other["train_loss"] != run["train_loss"]


def test_train_flag_output_init(tmp_path):
    out = tmp_path / "run"
    rc = cli_main(["train", "--data", "digits", "--model", "mlp", "--model-option", "hidden=[8]",
                   "--epochs", "1", "--threads", "1", "--no-progress", "--output-init", "zero", "--out", str(out)])
    assert rc == 0 and yaml.safe_load((out / "config.yaml").read_text())["output_init"] == "zero"
    state = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    assert any(k.startswith("out.") for k in state)


# --------------------------------------------------------------------------- the panel

PANEL = {
    "panel": "fields",
    "title": "tiny retina, fields",
    "base": {"data": "digits", "model": "retina", "model_options": TINY_RETINA, "output_init": "zero",
             "optimizer": "adam", "lr": 3e-3, "batch_size": 64, "epochs": 2, "eval_every": 0},
    "seeds": [0, 1],
    "analysis": {"layer": "retina.conv2", "method": "gradient"},
    "series": [{"name": "RAF", "set": {"rule": "raf", "rank": "full", "ranks": {"vvs.conv1": "{r}"}},
                "grid": {"r": [1, 3]}},
               {"name": "BP", "set": {"rule": "bp"}}],
    "figure": {"x": "r"},
    "claims": [{"text": "orientedness is a number in [0, 1]", "type": "at_least", "metric": "orientedness",
                "a": {"series": "BP"}, "value": 0.0},
               {"text": "orientedness above 1 (impossible)", "type": "at_least", "metric": "orientedness",
                "a": {"series": "RAF", "r": 3}, "value": 1.0001}],
}


def _write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "specs" / "quick" / f"{spec['panel']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _rows(results: Path) -> list[dict]:
    with open(results / "quick" / "fields" / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_analysis_panel_scores_every_run_and_claims_read_them(tmp_path, capsys):
    spec = _write(tmp_path, PANEL)
    results = tmp_path / "results"
    rc = cli_main(["reproduce", "--spec", str(spec), "--results", str(results), "--no-progress",
                   "--jobs", "1", "--threads", "1"])
    assert rc == 0  # a failed claim is a result, not an error of the command
    rows = _rows(results)
    assert len(rows) == 6 and all(r["status"] == "done" for r in rows)
    runs = results / "quick" / "fields" / "runs"
    scored = 0
    for r in rows:
        scores = json.loads((runs / r["point"] / "scores.json").read_text())
        assert scores["layer"] == "retina.conv2" and len(scores["orientedness"]) == 3
        if not scores["live_channels"]:  # every field zero (gates closed at the blank image)
            assert r["orientedness"] == r["centre_surround_index"] == "" and scores["orientedness_mean"] is None
            continue
        scored += 1
        assert float(r["orientedness"]) == pytest.approx(scores["orientedness_mean"], abs=1e-6)
        assert 0.0 <= float(r["orientedness"]) <= 1.0
        assert float(r["centre_surround_index"]) == pytest.approx(scores["centre_surround_index_mean"], abs=1e-6)
        assert float(r["field_dimensionality"]) == pytest.approx(scores["field_dimensionality"], abs=1e-6)
        assert 1.0 <= float(r["field_dimensionality"]) <= len(scores["live_channels"])
    assert scored >= 4
    # the baseline: every series starts from its seed's net (same model options), so the runs
    # of one seed share their init scores and the two seeds differ (seed 0's tiny initial net
    # has every gate closed at the blank image: no live field, no score)
    by_seed = {}
    for r in rows:
        by_seed.setdefault(r["seed"], set()).add(r["init_orientedness"])
    assert sorted(by_seed) == ["0", "1"] and all(len(v) == 1 for v in by_seed.values())
    assert by_seed["0"] == {""} and 0 < float(*by_seed["1"]) < 1
    claims = json.loads((results / "quick" / "fields" / "claims.json").read_text())
    assert claims[0]["metric"] == "orientedness" and 0 <= claims[0]["estimate"] <= 1  # BP's mean orientedness
    assert claims[0]["verdict"] != "fails" and claims[1]["verdict"] != "holds"  # never above 1
    with open(results / "quick" / "fields" / "points.csv", newline="") as f:
        points = list(csv.DictReader(f))
    assert all(p["orientedness_mean"] != "" and p["centre_surround_index_std"] != "" for p in points)
    assert all(float(p["init_orientedness_mean"]) == pytest.approx(float(*by_seed["1"]), abs=1e-4)
               and float(p["init_orientedness_std"]) == 0.0 for p in points)  # n = 1: seed 1's
    for name in ("figure.png", "fields.png", "orientedness.png", "dimensionality.png"):
        assert (results / "quick" / "fields" / name).stat().st_size > 1000
    # redraw: scores deleted from one run are recomputed from its checkpoint, identically
    victim = runs / rows[0]["point"] / "scores.json"
    before = json.loads(victim.read_text())
    victim.unlink()
    (results / "quick" / "fields" / "fields.png").unlink()
    cli_main(["reproduce", "--spec", str(spec), "--results", str(results), "--no-progress", "--redraw"])
    after = json.loads(victim.read_text())
    assert after["orientedness"] == before["orientedness"]
    assert (results / "quick" / "fields" / "fields.png").exists()
    # a run whose checkpoint is gone loses its scores with a warning; the panel is still reported
    live = [i for i, r in enumerate(_rows(results)) if r["orientedness"] != ""]
    gone = runs / rows[live[0]]["point"]
    (gone / "scores.json").unlink()
    (gone / "checkpoint.pt").unlink()
    assert cli_main(["reproduce", "--spec", str(spec), "--results", str(results), "--no-progress", "--redraw"]) == 0
    err = capsys.readouterr().err
    assert f"warning: no receptive fields for {gone}" in err and "Traceback" not in err
    after = _rows(results)
    assert after[live[0]]["orientedness"] == "" and all(after[i]["orientedness"] != "" for i in live[1:])


def test_analysis_spec_errors(tmp_path):
    with pytest.raises(SpecError, match="analysis must be a mapping"):
        load_spec(_write(tmp_path, {**PANEL, "analysis": {"layer": "retina.conv2", "colour": 1}}))
    with pytest.raises(SpecError, match="method must be one of"):
        load_spec(_write(tmp_path, {**PANEL, "analysis": {"method": "psychic"}}))
    assert load_spec(_write(tmp_path, PANEL)).analysis == {"layer": "retina.conv2", "method": "gradient"}


def test_the_init_baseline_is_one_line_per_model_and_one_value_per_initial_net():
    """fig4cd-bottleneck's series use bottleneck 1 and 8: two initial nets per seed, so two
    baseline lines, each with one value per seed (runs of one seed and model share their net)."""
    from raftorch.experiments.figures import _baselines
    from raftorch.experiments.spec import load_spec

    panel = load_spec(Path(__file__).resolve().parents[1] / "configs" / "variants" / "fig4cd-bottleneck.yaml",
                      "quick")
    rows = [{"point": p.id, "seed": p.seed, "status": "done",
             "init_orientedness": 0.1 * p.seed + (0.5 if p.config["model_options"]["bottleneck"] == 8 else 0.0)}
            for p in panel.points()]
    rows[0]["status"] = "failed"  # bp_b-1_s0: its net is still counted through dRAF's seed-0 run
    options = {p.id: p.config["model_options"] for p in panel.points()}
    lines = sorted(_baselines(options, rows, "init_orientedness"), key=lambda d: d["series"])
    assert [d["series"] for d in lines] == ["at initialisation, bottleneck 1 (3 nets)",
                                            "at initialisation, bottleneck 8 (3 nets)"]
    assert sorted(lines[0]["values"]) == pytest.approx([0.0, 0.1, 0.2])
    assert sorted(lines[1]["values"]) == pytest.approx([0.5, 0.6, 0.7])
    assert all(d["rank"] is None for d in lines)


def test_fields_rows_and_score_lines_split_a_series_by_its_other_grid_variables(tmp_path, monkeypatch):
    """fig4cd-28px draws x = r, but its BP series has a grid over the bottleneck b: each b is
    its own fields row and its own score line, never folded into the first b's."""
    import numpy as np

    import raftorch.analysis.figure as AF
    from raftorch.experiments import figures
    from raftorch.experiments.spec import load_spec

    panel = load_spec(Path(__file__).resolve().parents[1] / "configs" / "variants" / "fig4cd-28px.yaml", "quick")
    rows = []
    for p in panel.points():
        folder = tmp_path / "runs" / p.id
        folder.mkdir(parents=True)
        np.savez(folder / "receptive_fields.npz", fields=np.ones((2, 3, 3), dtype=np.float32),
                 init_fields=np.full((2, 3, 3), float(p.seed), dtype=np.float32),
                 init_orientedness=np.zeros(2), init_centre_surround_index=np.zeros(2),
                 orientedness=np.zeros(2), centre_surround_index=np.zeros(2), label=np.asarray(p.id))
        rows.append({"point": p.id, "series": p.series, "seed": p.seed, "status": "done",
                     **{k: p.values.get(k, "") for k in panel.variables},
                     "orientedness": 0.1 * p.values.get("b", p.values.get("r")), "field_dimensionality": 1.0})
    drawn = {}
    monkeypatch.setattr(AF, "draw_fields", lambda source, out, **kw: drawn.setdefault("fields", source) and out)
    monkeypatch.setattr(AF, "draw_orientedness_vs_rank",
                        lambda pts, out, **kw: drawn.setdefault(Path(out).name, pts) and out)
    figures._draw_fields(panel, rows, tmp_path)
    labels = list(drawn["fields"][0])
    assert all(row["fields"].shape == (2, 3, 3) for row in drawn["fields"][0].values())
    assert labels == ["BP, b = 1", "BP, b = 8", "RAF, into the retina, r = 1", "RAF, into the retina, r = 8"]
    assert len(drawn["fields"]) == 1 + 1  # the trained rows, then the first seed's initial net (one here)
    lines = {(d["series"], d["rank"]): d["values"] for d in drawn["orientedness.png"]}
    assert lines[("BP, b = 1", None)] == pytest.approx([0.1] * 3)
    assert lines[("BP, b = 8", None)] == pytest.approx([0.8] * 3)
    assert lines[("RAF, into the retina", 8)] == pytest.approx([0.8] * 3)
