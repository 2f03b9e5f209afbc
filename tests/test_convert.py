"""convert() on arbitrary models, describe(), and every bad-input error message."""
import warnings

import pytest
import torch
from torch import nn

import raftorch
from raftorch import RaftorchConversionWarning


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))            # (N, 8, H, W)
        t = h.flatten(2).transpose(1, 2)                 # tokens (N, HW, 8)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.head(t.mean(1))


@pytest.mark.parametrize("rule,rank", [("bp", None), ("fa", None), ("kp", None), ("raf", 4)])
def test_convert_keeps_the_forward_pass_bit_identical_and_reports_what_it_skipped(rule, rank):
    torch.manual_seed(0)
    model = Mixed()
    x = torch.randn(5, 3, 8, 8)
    model.rnn = nn.GRU(4, 4)  # not called: only there to be reported
    with pytest.warns(RaftorchConversionWarning, match="rnn"):
        conv, report = raftorch.convert(model, rule, rank, report=True)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        getattr(conv, mode)()
        assert torch.equal(model(x), conv(x)), mode
    assert [n for n, *_ in report.converted] == ["conv", "attn", "head.0", "head.2"]
    assert [(n, t) for n, t, _ in report.skipped] == [("rnn", "GRU")]
    assert "recurrent layers" in report.skipped[0][2]
    assert isinstance(conv.conv, raftorch.Conv2d) and isinstance(conv.head[2], raftorch.Linear)
    assert isinstance(conv.attn, raftorch.MultiheadAttention)
    assert type(model.conv) is nn.Conv2d, "convert must not modify its argument by default"
    conv.train()
    conv(x).sum().backward()
    assert conv.conv.weight.grad is not None and conv.bn.weight.grad is not None


def test_convert_strict_raises_and_inplace_modifies():
    model = Mixed()
    model.rnn = nn.LSTM(4, 4)
    with pytest.raises(ValueError, match="LSTM"):
        raftorch.convert(model, "fa", strict=True)
    plain = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    out = raftorch.convert(plain, "fa", inplace=True)
    assert out is plain and isinstance(plain[0], raftorch.Linear)


def test_convert_per_layer_ranks_include_and_exclude():
    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 10))
    conv = raftorch.convert(net, "raf", "full", ranks={"2": 3})
    assert [conv[i].rank for i in (0, 2, 4)] == [20, 3, 10]
    conv = raftorch.convert(net, "raf", 5, ranks={"*": 2, "4": 7})
    assert [conv[i].rank for i in (0, 2, 4)] == [2, 2, 2], "first matching entry wins"
    conv = raftorch.convert(net, "fa", include=["0", "4"])
    assert [type(conv[i]) for i in (0, 2, 4)] == [raftorch.Linear, nn.Linear, raftorch.Linear]
    conv = raftorch.convert(net, "fa", exclude="4")
    assert type(conv[4]) is nn.Linear and type(conv[0]) is raftorch.Linear
    again = raftorch.convert(raftorch.convert(net, "fa"), "raf", 3)
    assert again[0].rule.name == "raf" and torch.equal(again[0].weight, net[0].weight)
    root = raftorch.convert(nn.Linear(3, 2), "kp")
    assert isinstance(root, raftorch.Linear) and root.rule.name == "kp"


def test_describe_lists_rule_rank_shapes_and_feedback():
    net = raftorch.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(),
                                         nn.Linear(8, 10)), "raf-q", 4)
    table = raftorch.describe(net)
    rows = {r["name"]: r for r in table.rows}
    assert rows["0"]["rule"] == "raf-q" and rows["0"]["rank"] == 4
    assert rows["0"]["feedback"] == "Q 4x3x3x3, P 4x8 (fixed)"
    assert rows["3"]["shape"] == "10x8" and rows["3"]["feedback"] == "Q 8x4, P 4x10 (fixed)"
    assert rows["1"]["rule"] == "bp*"
    text = str(table)
    assert text.splitlines()[0].split() == ["name", "type", "rule", "rank", "shape", "feedback"]
    assert len(text.splitlines()) == 2 + len(table)


# --------------------------------------------------------------------------- bad input

BAD_LAYER_ARGS = [
    (dict(rule="sgd"), "unknown rule 'sgd'; choose one of 'bp', 'fa', 'kp', 'fa-lowrank', 'raf-q', 'raf'"),
    (dict(rule="raf"), "rule 'raf' needs a rank"),
    (dict(rule="raf", rank=0), r"rank must be a positive integer \(>= 1\), got 0"),
    (dict(rule="raf", rank=-3), r"rank must be a positive integer \(>= 1\), got -3"),
    (dict(rule="raf", rank=2.5), "rank must be a positive integer or 'full', got 2.5"),
    (dict(rule="raf", rank=True), "rank must be a positive integer or 'full', got True"),
    (dict(rule="fa", rank=4), "rule 'fa' uses full-rank feedback and takes no rank"),
    (dict(rule="raf", rank=2, oja_scal="rms"), r"unknown option\(s\) \['oja_scal'\]; valid options are"),
    (dict(rule="raf", rank=2, oja_scale="max"), "oja_scale='max' is not valid; choose one of"),
    (dict(rule="raf-q", rank=2, oja_scale="rms"), "does not learn P; use rule='raf'"),
]


@pytest.mark.parametrize("kwargs,message", BAD_LAYER_ARGS, ids=[m[:30] for _, m in BAD_LAYER_ARGS])
def test_bad_layer_arguments_raise_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        raftorch.Linear(8, 4, **kwargs)


def test_bad_conv_arguments_raise_one_clear_error():
    with pytest.raises(ValueError, match="rank 3 does not fit groups=2: .* must be a multiple of 2"):
        raftorch.Conv2d(4, 8, 3, groups=2, rule="raf", rank=3)
    with pytest.raises(ValueError, match="padding_mode='zeros' only, got 'reflect'"):
        raftorch.Conv2d(4, 8, 3, padding_mode="reflect", rule="fa")
    with pytest.raises(ValueError, match="even kernel needs asymmetric padding"):
        raftorch.Conv2d(4, 8, 2, padding="same", rule="fa")
    with pytest.raises(ValueError, match="only meaningful for a Linear"):
        raftorch.Conv2d(4, 8, 3, rule="raf", rank=2, oja_source="target")
    same = raftorch.Conv2d(2, 3, 3, padding="same", dilation=2, rule="bp")
    assert same(torch.randn(1, 2, 7, 7)).shape == (1, 3, 7, 7)


def test_bad_convert_arguments_name_the_problem():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"ranks entry 'fc1' matches no convertible module; the convertible modules are: '0', '2'"):
        raftorch.convert(net, "raf", 2, ranks={"fc1": 1})
    with pytest.raises(ValueError, match="include entry 'x' matches no convertible module"):
        raftorch.convert(net, "fa", include=["x"])
    with pytest.raises(ValueError, match=r"cannot convert '0' \(Linear\): rule 'raf' needs a rank"):
        raftorch.convert(net, "raf")
    with pytest.raises(ValueError, match="unknown rule 'rafx'"):
        raftorch.convert(net, "rafx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped: no warning
        raftorch.convert(net, "fa")


@pytest.mark.parametrize("rule", ["raf", "fa", "draf", "frozen"])
def test_convert_of_something_that_is_not_a_module_is_a_clear_value_error(rule):
    with pytest.raises(ValueError, match="convert needs the model to convert \\(an nn.Module\\), got str 'hello'"):
        raftorch.convert("hello", rule, rank=2 if rule in ("raf", "draf") else None)


def test_convert_names_a_zero_width_layer_it_cannot_give_a_feedback_rule():
    net = nn.Sequential(nn.Linear(4, 0), nn.Linear(0, 2))
    with pytest.raises(ValueError, match=r"cannot convert '0' \(Linear\): .*out_features must be at least 1"):
        raftorch.convert(net, "fa")
    assert raftorch.convert(net, "bp")(torch.randn(3, 4)).shape == (3, 2)
