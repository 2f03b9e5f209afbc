"""The no-feedback control ``frozen``: hidden layers frozen at initialisation, only the output
layer learns (a linear head on the initial net's random features)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import raftorch
import raftorch.training.loop as T
from raftorch.training.checkpoint import load_checkpoint
from raftorch.cli import main as cli_main
from raftorch.training.compare import format_table, plan, run_compare
from raftorch.training.config import TrainConfig
from raftorch.control import output_layer
from raftorch.training.data import load_dataset
from raftorch.direct import DirectFeedback, weight_layer_names
from raftorch.models import MODELS, build_model

TINY_MODELS = {
    "mlp": dict(hidden=(16, 16), batchnorm=True, dropout=0.1),
    "vgg": dict(width_mult=1 / 16),
    "vit": dict(dim=16, depth=2, heads=2),
    "retina": dict(channels=4, bottleneck=2, kernel=3, fc=16),
}


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return build_model("mlp", (1, 8, 8), 10, hidden=(16, 16), batchnorm=True).to(dtype)


def learning(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


# ---------------------------------------------------------------- convert(model, "frozen")

def test_get_rule_knows_frozen_and_unknown_rules_list_it():
    rule = raftorch.get_rule("frozen")
    assert rule.name == "frozen" and not rule.low_rank and rule.learns == () and rule.feedback_names == ()
    with pytest.raises(ValueError, match=r"or the no-feedback control 'frozen'"):
        raftorch.get_rule("magic")
    with pytest.raises(ValueError, match="not a per-layer rule.*raftorch.convert"):
        raftorch.Linear(4, 3, rule="frozen")


def test_frozen_leaves_the_forward_bit_identical_and_only_the_output_layer_learning():
    model = mlp()
    x = torch.randn(32, 1, 8, 8)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        frozen = raftorch.convert(model, "frozen")
        getattr(frozen, mode)()
        with torch.no_grad():
            assert torch.equal(frozen(x), model(x)), mode
    assert learning(frozen) == ["out.bias", "out.weight"]
    assert all(p.requires_grad for p in model.parameters())  # a deep copy: the original untouched
    assert all(type(a) is type(b) for a, b in zip(model.modules(), frozen.modules()))  # no module swapped


def test_frozen_inplace_and_report():
    model = mlp()
    same, report = raftorch.convert(model, "frozen", inplace=True, report=True)
    assert same is model and learning(model) == ["out.bias", "out.weight"]
    assert report.output == ("out", "Linear") and report.learning == ["out.weight", "out.bias"]
    assert report.frozen == [n for n, _ in model.named_parameters() if not n.startswith("out.")]
    assert "bn1.weight" in report.frozen and report.converted == []
    text = str(report)
    assert "only the output layer out (Linear) learns" in text and "frozen at initialisation" in text
    rows = {r["name"]: r["rule"] for r in raftorch.describe(model)}
    assert rows == {"fc1": "frozen", "bn1": "frozen", "fc2": "frozen", "bn2": "frozen", "out": "bp*"}
    # the Rule object works as the name does
    assert learning(raftorch.convert(mlp(), raftorch.get_rule("frozen"))) == ["out.bias", "out.weight"]


@pytest.mark.parametrize("kwargs, name", [
    (dict(rank=3), "rank=3"),
    (dict(rank="full"), "rank='full'"),
    (dict(ranks={"fc1": 2}), "ranks="),
    (dict(exclude=["fc1"]), "exclude="),
    (dict(include=["fc1"]), "include="),
    (dict(source="output"), "source="),
    (dict(targets=["fc1"]), "targets="),
    (dict(oja_center=False), "oja_center="),
])
def test_frozen_rejects_feedback_settings_with_one_message(kwargs, name):
    with pytest.raises(ValueError, match="rule 'frozen' takes no rank, ranks, include, exclude") as exc:
        raftorch.convert(mlp(), "frozen", **kwargs)
    assert name in str(exc.value)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_frozen_on_the_repo_models_trains_only_the_last_weight_layer(name):
    torch.manual_seed(0)
    model = build_model(name, (1, 8, 8), 5, **TINY_MODELS[name]).eval()
    x = torch.randn(4, 1, 8, 8)
    frozen = raftorch.convert(model, "frozen")
    last = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))][-1]
    assert output_layer(model) == last
    layer = frozen.get_submodule(last)
    assert learning(frozen) == sorted(f"{last}.{p}" for p, _ in layer.named_parameters())
    assert sum(1 for p in frozen.parameters() if not p.requires_grad) > 2  # the rest (cls token, norms, ...)
    with torch.no_grad():
        assert torch.equal(frozen(x), model(x))
    # one backward: only the output layer gets a gradient
    frozen.train()
    F.cross_entropy(frozen(x), torch.arange(4) % 5).backward()
    assert sorted(n for n, p in frozen.named_parameters() if p.grad is not None) == learning(frozen)


def test_the_output_layer_is_the_direct_rules_source_output():
    model = mlp()
    df = DirectFeedback(raftorch.convert(model, "bp"), "dfa")
    assert output_layer(model) == "out" == weight_layer_names(model)[-1]
    assert df.source == "output"


def test_a_tied_output_weight_learns_under_every_name():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 5)
            self.mix = nn.Linear(5, 5)
            self.out = nn.Linear(5, 7, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, i):
            return self.out(torch.relu(self.mix(self.emb(i))))

    _, report = raftorch.convert(Tied(), "frozen", report=True)
    assert report.learning == ["emb.weight", "out.weight"]
    assert report.frozen == ["mix.weight", "mix.bias"]


def test_frozen_on_a_converted_model_freezes_its_feedback_parameters_too():
    net = raftorch.convert(raftorch.convert(mlp(), "raf", 2), "frozen")
    assert learning(net) == ["out.bias", "out.weight"]
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-2)
    F.cross_entropy(net(torch.randn(8, 1, 8, 8)), torch.arange(8)).backward()
    opt.step()
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]) != (n in ("out.weight", "out.bias")), n  # out.Q, out.P stay


def test_a_model_without_weight_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="the model has none"):
        raftorch.convert(nn.Sequential(nn.ReLU()), "frozen")


# ---------------------------------------------------------------- the exact oracles

def _batches(n, batch, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=gen)[:batch] for _ in range(steps)]


def test_training_equals_a_linear_head_on_the_initial_features():
    """Adam with weight decay on the frozen net = the same Adam on an nn.Linear head with the
    output layer's initial weights, trained on the initial net's penultimate activations."""
    torch.manual_seed(1)
    x, y = torch.randn(96, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (96,))
    init = mlp(torch.float64).train()
    net = raftorch.convert(init, "frozen")
    batches = _batches(len(x), 16, 12, seed=2)

    # the features: what the output layer reads in the initial net (train mode: BatchNorm on
    # the batch's statistics, as in the training forward), computed once per batch
    feats = []
    probe = copy.deepcopy(init)
    hook = probe.out.register_forward_hook(lambda m, a, o: feats.append(a[0].detach().clone()))
    with torch.no_grad():
        for idx in batches:
            probe(x[idx])
    hook.remove()

    head = nn.Linear(16, 10, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(init.out.weight)
        head.bias.copy_(init.out.bias)
    opt_net = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-2)  # every parameter, as a user would
    opt_head = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-2)
    for idx, h in zip(batches, feats):
        opt_net.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt_net.step()
        opt_head.zero_grad()
        F.cross_entropy(head(h), y[idx]).backward()
        opt_head.step()

    assert not torch.equal(net.out.weight, init.out.weight)  # the output layer learned
    torch.testing.assert_close(net.out.weight, head.weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net.out.bias, head.bias, rtol=1e-12, atol=1e-12)
    for (name, p), p0 in zip(net.named_parameters(), init.parameters()):
        if not name.startswith("out."):
            assert torch.equal(p, p0), name  # hidden: bit-identical to the initialisation
    # BatchNorm statistics are buffers: they did follow the batches
    assert not torch.equal(net.bn1.running_mean, init.bn1.running_mean)


TRAIN = dict(data="digits", model="mlp", model_options={"hidden": [24, 24], "batchnorm": True, "dropout": 0.1},
             rule="frozen", optimizer="adam", amsgrad=True, lr=1e-2, weight_decay=1e-3, batch_size=128,
             epochs=2, seed=3, device="cpu", threads=1)


def test_raftorch_train_keeps_every_hidden_parameter_bit_identical(tmp_path):
    final = T.train(dict(TRAIN, out=str(tmp_path / "run")), progress=False)
    assert 0.0 <= final["test_accuracy"] <= 1.0
    trained = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    cfg = TrainConfig.from_dict(TRAIN)
    data = load_dataset("digits")
    initial = dict(T.initial_model(cfg, data.input_shape, data.num_classes).named_parameters())
    for name, p0 in initial.items():
        if name.startswith("out."):
            assert not torch.equal(trained[name], p0), name  # the output layer learned
        else:
            assert torch.equal(trained[name], p0), name  # frozen, weight decay and all


@pytest.mark.parametrize("setting, value, flag", [
    ("rank", 4, "--rank"),
    ("ranks", {"fc1": 2}, "--layer-rank"),
    ("rule_options", {"oja_center": False}, "--rule-option"),
    ("layer_options", {"out": {"oja_source": "target"}}, "--layer-option"),
])
def test_train_names_a_feedback_setting_given_with_frozen(setting, value, flag):
    cfg = TrainConfig.from_dict({**TRAIN, setting: value})
    with pytest.raises(ValueError, match=f"{setting} \\({flag}\\) does not apply"):
        T.convert_model(build_model("mlp", (1, 8, 8), 10, hidden=(8,)), cfg)


def test_cli_train_rule_frozen_finishes(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["train", "--rule", "frozen", "--model-option", "hidden=[16]", "--epochs", "1",
                     "--threads", "1", "--out", str(out), "--no-progress"]) == 0
    final = json.loads((out / "final.json").read_text())
    assert 0.0 <= final["test_accuracy"] <= 1.0
    assert yaml.safe_load((out / "config.yaml").read_text())["rule"] == "frozen"
    # a YAML config with rule: frozen; a rank with it is one clear error
    spec = tmp_path / "frozen.yaml"
    spec.write_text(yaml.safe_dump({"rule": "frozen", "model_options": {"hidden": [16]}, "epochs": 1}))
    assert cli_main(["train", "--config", str(spec), "--threads", "1", "--out", str(tmp_path / "y"),
                     "--no-progress"]) == 0
    capsys.readouterr()
    assert cli_main(["train", "--config", str(spec), "--rank", "3", "--out", str(tmp_path / "z"),
                     "--no-progress"]) == 2  # bad input
    err = capsys.readouterr().err
    assert "rank (--rank) does not apply" in err and "Traceback" not in err


# ---------------------------------------------------------------- raftorch compare

def test_compare_runs_frozen_once_and_shows_no_rank():
    assert plan(("bp", "frozen", "raf"), (1, 10)) == [("bp", None), ("frozen", None), ("raf", 1), ("raf", 10)]
    rows = run_compare(rules=("bp", "frozen"), ranks=(2,), epochs=1, hidden=(8,), progress=False)
    assert [(r.rule, r.rank) for r in rows] == [("bp", None), ("frozen", None)]
    table = format_table(rows)
    assert "| bp | full |" in table and "| frozen | - |" in table
