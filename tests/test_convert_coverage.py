"""convert() on the layers real models use: weight sharing, grouped convolutions with one
global rank, nn.MultiheadAttention (and so nn.TransformerEncoder), nn.Conv1d; direct rules on
such models; error_alignment. Exact oracles: equality with plain autograd."""
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import raftorch
from raftorch import RaftorchConversionWarning
from raftorch.attention import MultiheadAttention
from raftorch.convert import plain_copy


pytestmark = pytest.mark.usefixtures("one_thread")


def grads(model, params, loss):
    return torch.autograd.grad(loss, params, allow_unused=True)


# --------------------------------------------------------------------------- weight sharing


class Tied(nn.Module):
    """A language-model head: the output Linear shares the embedding's weight."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.hidden = nn.Linear(6, 6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.hidden(self.emb(tokens))))


@pytest.mark.parametrize("inplace", [False, True])
def test_a_tied_embedding_and_output_keep_one_parameter_through_training(inplace):
    torch.manual_seed(0)
    model = Tied()
    with pytest.warns(RaftorchConversionWarning, match="emb"):
        conv = raftorch.convert(model, "raf", 3, inplace=inplace)
    assert isinstance(conv.out, raftorch.Linear)
    assert conv.out.weight is conv.emb.weight
    if inplace:  # the optimizer a user already built still owns the parameters
        assert conv.out.weight is model.emb.weight
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    tokens = torch.randint(0, 10, (8,))
    before = conv.emb.weight.detach().clone()
    F.cross_entropy(conv(tokens), tokens).backward()
    opt.step()
    assert conv.out.weight is conv.emb.weight and not torch.equal(conv.emb.weight, before)
    assert len([p for p in conv.parameters() if p.shape == (10, 6)]) == 1
    plain = plain_copy(conv)
    assert type(plain.out) is nn.Linear and plain.out.weight is plain.emb.weight


def test_a_module_used_twice_is_converted_once_and_learns_like_autograd():
    torch.manual_seed(0)
    shared = nn.Linear(5, 5)
    net = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(5, 3))
    conv, report = raftorch.convert(net, "bp", report=True)
    assert conv[0] is conv[2] and isinstance(conv[0], raftorch.Linear)
    assert [n for n, *_ in report.converted] == ["0", "4"]
    assert report.shared == [("2", "0")] and "2 is 0" in str(report)
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    assert torch.equal(net(x), conv(x))
    want = grads(net, list(net.parameters()), F.cross_entropy(net(x), y))
    got = grads(conv, [conv[0].weight, conv[0].bias, conv[4].weight, conv[4].bias],
                F.cross_entropy(conv(x), y))
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    raf = raftorch.convert(net, "raf", 2)
    assert raf[0] is raf[2] and raf[0].Q is raf[2].Q
    plain = plain_copy(raf)
    assert type(plain[0]) is nn.Linear and plain[0] is plain[2]


# --------------------------------------------------------------------------- grouped convs


def grouped_net():
    return nn.Sequential(nn.Conv2d(4, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                         nn.ReLU(), nn.Conv2d(16, 32, 3, groups=4))


def test_one_global_rank_is_rounded_per_grouped_conv_and_reported():
    torch.manual_seed(0)
    net = grouped_net()
    conv, report = raftorch.convert(net, "raf", 10, report=True)
    assert [conv[i].rank for i in (0, 2, 4)] == [4, 16, 8]
    assert [(n, a, u) for n, a, u, _ in report.adjusted] == [("2", 10, 16), ("4", 10, 8)]
    assert "rank 10 -> 16 (groups=16: the rank must be a multiple of 16, at least 16)" in str(report)
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(net(x), conv(x))
    conv(x).sum().backward()
    assert conv[2].P.grad.shape == (16, 16) and conv[4].Q.grad.shape == (8, 4, 3, 3)
    _, fits = raftorch.convert(net, "raf", 24, report=True)  # 24 fits groups=4, 16 is the limit of '2'
    assert [(n, u) for n, _, u, _ in fits.adjusted] == []
    _, full = raftorch.convert(net, "raf", "full", report=True)
    assert full.adjusted == []


def test_an_explicit_per_layer_rank_that_does_not_fit_the_groups_still_raises():
    with pytest.raises(ValueError, match=r"cannot convert '2' \(Conv2d\): rank 10 does not fit groups=16"):
        raftorch.convert(grouped_net(), "raf", 8, ranks={"2": 10})


# --------------------------------------------------------------------------- attention

ATTN = [dict(batch_first=True), dict(), dict(kdim=5, vdim=7, batch_first=True),
        dict(add_bias_kv=True, add_zero_attn=True), dict(bias=False, batch_first=True),
        dict(dropout=0.3, batch_first=True)]


def attention_inputs(kw, L=6, S=5, N=4, E=8):
    sh = (lambda T, d: (N, T, d)) if kw.get("batch_first") else (lambda T, d: (T, N, d))
    x = torch.randn(*sh(L, E), requires_grad=True)
    kv = torch.randn(*sh(S, E), requires_grad=True)
    k = torch.randn(*sh(S, kw.get("kdim", E)), requires_grad=True)
    v = torch.randn(*sh(S, kw.get("vdim", E)), requires_grad=True)
    same = "kdim" not in kw
    return ([("self", (x, x, x), L), ("cross", (x, kv, kv), S)] if same else []) + [("qkv", (x, k, v), S)]


@pytest.mark.parametrize("kw", ATTN, ids=[",".join(k for k in kw) or "default" for kw in ATTN])
def test_attention_forward_and_bp_gradients_equal_torch_bit_for_bit(kw):
    torch.manual_seed(0)
    old = nn.MultiheadAttention(8, 2, **kw)
    new = raftorch.convert(old, "bp", inplace=True)
    assert type(new) is MultiheadAttention and new.in_proj_weight is old.in_proj_weight
    for (_, args, s), need, use_mask, use_pad in itertools.product(
            attention_inputs(kw), (True, False), (False, True), (False, True)):
        mask = torch.randn(6, s) if use_mask else None
        pad = torch.rand(4, s) < 0.3 if use_pad else None
        if pad is not None:
            pad[:, 0] = False
        params = list({id(t): t for t in args}.values()) + list(old.parameters())
        res = []
        for module in (old, new):
            torch.manual_seed(1)  # the same dropout mask
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # float mask with bool padding: torch's deprecation
                out, weights = module(*args, need_weights=need, attn_mask=mask, key_padding_mask=pad)
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
            res.append((out, weights, torch.autograd.grad(out, params, g, allow_unused=True)))
        (o1, w1, g1), (o2, w2, g2) = res
        assert torch.equal(o1, o2)
        assert (w1 is None and w2 is None) or torch.equal(w1, w2)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g1, g2))
    x = attention_inputs(kw)[-1][1]
    old.eval(), new.eval()
    with torch.no_grad():  # inference is torch's own forward (fast path included)
        assert torch.equal(old(*x)[0], new(*x)[0])


@pytest.mark.parametrize("need", [True, False])
def test_attention_is_causal_and_frozen_parameters_match_torch(need):
    torch.manual_seed(0)
    old = nn.MultiheadAttention(8, 2, batch_first=True)
    new = raftorch.convert(old, "bp", inplace=True)
    x = torch.randn(3, 5, 8, requires_grad=True)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    outs = [m(x, x, x, attn_mask=mask, is_causal=True, need_weights=need)[0] for m in (old, new)]
    assert torch.equal(*outs)
    g = torch.randn(3, 5, 8)
    assert torch.equal(*[torch.autograd.grad(o, new.in_proj_weight, g)[0] for o in outs])
    old.eval(), new.eval()  # frozen and in eval: torch's fast path, which the converted module takes too
    for p in new.parameters():
        p.requires_grad_(False)
    x = x.detach()
    assert torch.equal(old(x, x, x)[0], new(x, x, x)[0])


def test_attention_loads_the_original_state_dict_and_gives_the_plain_module_back():
    torch.manual_seed(0)
    old = nn.MultiheadAttention(8, 2, batch_first=True)
    fresh = MultiheadAttention(8, 2, batch_first=True, rule="raf", rank=3)
    result = fresh.load_state_dict(old.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(
        [f"{p}_feedback.{n}" for p in "qkv" for n in "QP"] + ["out_proj.Q", "out_proj.P"])
    x = torch.randn(3, 5, 8)
    assert torch.equal(old(x, x, x)[0], fresh(x, x, x)[0])
    keys = set(fresh.state_dict())
    assert set(old.state_dict()) <= keys
    plain = fresh.to_torch()
    assert type(plain) is nn.MultiheadAttention and plain.in_proj_weight is fresh.in_proj_weight
    assert list(plain.state_dict()) == list(old.state_dict())
    assert torch.equal(plain(x, x, x)[0], old(x, x, x)[0])


def test_q_k_and_v_each_send_the_error_through_their_own_feedback_path():
    """fa with B_q = W_q^T, B_k = B_v = 0 (and out_proj's B = W^T): the error at the input is backprop's through
    the query alone (k and v detached); likewise for each part."""
    torch.manual_seed(0)
    old = nn.MultiheadAttention(8, 2, batch_first=True)
    new = raftorch.convert(old, "fa")
    x = torch.randn(3, 5, 8, requires_grad=True)
    g = torch.randn(3, 5, 8)
    for i, part in enumerate("qkv"):
        with torch.no_grad():
            new.out_proj.B.copy_(new.out_proj.weight.t())
            for j, (p, fb, w) in enumerate(new.projection_feedback()):
                fb.B.copy_(w.t() if i == j else torch.zeros_like(fb.B))
        got, = torch.autograd.grad(new(x, x, x, need_weights=False)[0], x, g)
        args = [x if j == i else x.detach() for j in range(3)]
        want, = torch.autograd.grad(old(*args, need_weights=False)[0], x, g)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert [fb.part for _, fb, _ in new.projection_feedback()] == ["q", "k", "v"]


def encoder(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=dropout, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten(),
                         nn.Linear(5 * 8, 3))


def test_transformer_encoder_bp_equals_autograd_and_eval_is_unchanged():
    net = encoder()
    conv, report = raftorch.convert(net, "bp", report=True)
    assert report.skipped == []
    assert sum(isinstance(m, MultiheadAttention) for m in conv.modules()) == 2
    x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    net.train(), conv.train()
    assert torch.equal(net(x), conv(x))
    names = [n for n, _ in net.named_parameters()]
    want = grads(net, list(net.parameters()), F.cross_entropy(net(x), y))
    conv_params = dict(conv.named_parameters())
    got = grads(conv, [conv_params[n] for n in names], F.cross_entropy(conv(x), y))
    for n, a, b in zip(names, want, got):
        assert torch.equal(a, b), n  # in_proj_weight (q, k, v) included
    net.eval(), conv.eval()
    with torch.no_grad():  # nn.TransformerEncoderLayer's fused inference path reads the same weights
        assert torch.equal(net(x), conv(x))
    assert torch.equal(net(x), conv(x))


def test_raf_trains_a_transformer_encoder():
    torch.manual_seed(0)
    x = torch.randn(64, 5, 8)
    y = (x[:, :, 0].sum(1) > 0).long() + (x[:, 0, 1] > 0).long()
    conv = raftorch.convert(encoder(seed=1), "raf", 2)
    rows = {r["name"]: r for r in raftorch.describe(conv).rows}
    assert rows["0.layers.0.self_attn"]["rule"] == "raf"
    assert rows["0.layers.0.self_attn.k_feedback"]["feedback"] == "Q 8x2, P 2x8 (k projection)"
    opt = torch.optim.Adam(conv.parameters(), lr=3e-3)
    P0 = conv[0].layers[0].self_attn.v_feedback.P.detach().clone()
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.cross_entropy(conv(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert not torch.equal(P0, conv[0].layers[0].self_attn.v_feedback.P)


# --------------------------------------------------------------------------- Conv1d and the rest


def test_conv1d_converts_bit_for_bit_and_bp_equals_autograd():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 4, 3, stride=2, dilation=2,
                                                                            groups=4), nn.Flatten())
    x = torch.randn(5, 3, 17)
    conv = raftorch.convert(net, "bp")
    assert all(isinstance(conv[i], raftorch.Conv1d) for i in (0, 2))
    assert torch.equal(net(x), conv(x))
    want = grads(net, list(net.parameters()), net(x).square().sum())
    got = grads(conv, list(conv.parameters()), conv(x).square().sum())
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    raf = raftorch.convert(net, "raf", 6)
    assert raf[0].Q.shape == (6, 3, 3) and raf[2].rank == 4  # clamped to 4, a multiple of groups=4
    raf(x).sum().backward()
    assert raf[0].P.grad is not None and raf[0].feedback_matrix().shape == (8, 3, 3)
    assert type(plain_copy(raf)[0]) is nn.Conv1d


@pytest.mark.parametrize("module,match", [
    (nn.LSTM(4, 4), "recurrent layers"), (nn.Embedding(5, 4), "Embedding is a lookup"),
    (nn.ConvTranspose2d(2, 2, 3), "transposed"), (nn.Bilinear(2, 2, 2), "Bilinear")])
def test_modules_that_remain_unsupported_are_named_in_the_warning(module, match):
    with pytest.warns(RaftorchConversionWarning, match=match):
        raftorch.convert(nn.Sequential(module, nn.Linear(4, 4)), "fa")


# --------------------------------------------------------------------------- direct rules


class AttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.out(h.mean(1))


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.lstm(torch.relu(self.inp(x)))[0][:, -1])


@pytest.mark.parametrize("rule,rank", [("dfa", None), ("draf", 2)])
def test_direct_rules_on_attention_conv1d_and_lstm_models(rule, rank):
    torch.manual_seed(0)
    x = torch.randn(4, 5, 8)
    net = raftorch.convert(AttnNet(), rule, rank, example_input=x)
    assert [(p.target, p.n_target) for p in net.direct_feedback.paths] == [("inp", 40)]
    F.cross_entropy(net(x), torch.tensor([0, 1, 2, 0])).backward()
    assert net.attn.in_proj_weight.grad is not None and net.inp.weight.grad is not None
    for target, match in (("attn.out_proj", "lies inside the attention module 'attn'"),
                          ("attn", "is a MultiheadAttention module, whose output is a tuple")):
        with pytest.raises(ValueError, match=f"target '{target}' {match}"):
            raftorch.convert(AttnNet(), rule, rank, example_input=x, targets=target)
    with pytest.warns(RaftorchConversionWarning, match="recurrent"):
        with pytest.raises(ValueError, match="target 'lstm' is a LSTM module"):
            raftorch.convert(LSTMNet(), rule, rank, example_input=x, targets="lstm")
    seq = nn.Sequential(nn.Conv1d(4, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3))
    net = raftorch.convert(seq, rule, rank, example_input=torch.randn(2, 4, 8))
    assert [(p.target, p.point, p.n_target) for p in net.direct_feedback.paths] == [("0", "1", 36)]


def test_direct_targets_are_labelled_by_the_direct_rule_and_its_rank():
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 5))
    conv, report = raftorch.convert(net, "draf", 3, report=True)
    assert report.converted == [("0", "Linear", 3), ("2", "Linear", 3), ("4", "Linear", None)]
    assert report.direct == [("0", "draf", 3), ("2", "draf", 3)]
    assert "0 (draf path), rank=3" in str(report)
    rows = {r["name"]: r for r in raftorch.describe(conv).rows}
    assert (rows["0"]["rule"], rows["0"]["rank"]) == ("draf", 3)
    assert rows["0"]["feedback"] == "error from direct_feedback.paths.0; sends it down by bp"
    assert rows["4"]["rule"] == "bp"
    assert list(raftorch.metrics.alignment_angles(conv)) == ["4"], "direct targets have no B vs W^T"


def test_error_alignment_is_the_angle_to_the_backprop_error_under_every_rule():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 5))
    x, y = torch.randn(32, 6), torch.randint(0, 5, (32,))
    with torch.no_grad():  # the oracle by hand: pre-activations, output error, backprop errors
        a0 = net[0](x)
        a2 = net[2](torch.tanh(a0))
        e = (torch.softmax(net[4](torch.tanh(a2)), 1) - F.one_hot(y, 5)) / 32
        bp2 = (e @ net[4].weight) * (1 - torch.tanh(a2) ** 2)
        bp0 = (bp2 @ net[2].weight) * (1 - torch.tanh(a0) ** 2)
    bp = raftorch.metrics.error_alignment(raftorch.convert(net, "bp"), x, y)
    assert set(bp) == {"0", "2", "4"} and all(v < 1e-4 for v in bp.values())

    fa = raftorch.convert(net, "fa")
    with torch.no_grad():
        fa2 = (e @ fa[4].B.t()) * (1 - torch.tanh(a2) ** 2)
        fa0 = (fa2 @ fa[2].B.t()) * (1 - torch.tanh(a0) ** 2)
    got = raftorch.metrics.error_alignment(fa, x, y)
    assert got["4"] < 1e-4
    assert got["2"] == pytest.approx(raftorch.metrics.angle_degrees(fa2, bp2), abs=1e-4)
    assert got["0"] == pytest.approx(raftorch.metrics.angle_degrees(fa0, bp0), abs=1e-4)

    dfa = raftorch.convert(net, "dfa")
    B = [p.B for p in dfa.direct_feedback.paths]
    with torch.no_grad():
        d0 = (e @ B[0].t()) * (1 - torch.tanh(a0) ** 2)
        d2 = (e @ B[1].t()) * (1 - torch.tanh(a2) ** 2)
    got = raftorch.metrics.error_alignment(dfa, x, y)
    assert got["0"] == pytest.approx(raftorch.metrics.angle_degrees(d0, bp0), abs=1e-4)
    assert got["2"] == pytest.approx(raftorch.metrics.angle_degrees(d2, bp2), abs=1e-4)
    assert all(p.grad is None for p in dfa.parameters()), "the measurement leaves .grad alone"


def test_error_alignment_reaches_the_attention_output_projection():
    torch.manual_seed(0)
    net = raftorch.convert(AttnNet(), "fa")
    x, y = torch.randn(4, 5, 8), torch.tensor([0, 1, 2, 0])
    got = raftorch.metrics.error_alignment(net, x, y)
    assert set(got) == {"inp", "attn.out_proj", "out"} and got["out"] < 1e-4
    assert 0 < got["inp"] < 180
    bp = raftorch.metrics.error_alignment(raftorch.convert(AttnNet(), "bp"), x, y)
    assert all(v < 1e-4 for v in bp.values())
    assert set(raftorch.metrics.alignment_angles(net)) == {"inp", "attn.q", "attn.k", "attn.v",
                                                          "attn.out_proj", "out"}


# --------------------------------------------------------------------------- loss scale, torch version


def test_loss_scale_reaches_the_attention_and_conv1d_feedback_paths():
    """With raftorch.loss_scale(model, 4) around the backward of 4 * loss every gradient,
    P's of q, k, v, out_proj and Conv1d included, is exactly 4 times the unscaled one (a
    power of two scales exactly)."""
    torch.manual_seed(0)
    net = raftorch.convert(nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=True), "raf", 3)
    conv = raftorch.convert(nn.Sequential(nn.Conv1d(4, 6, 3), nn.Tanh(), nn.Conv1d(6, 2, 3)), "raf", 2)
    src, tgt, seq = torch.randn(2, 5, 8), torch.randn(2, 4, 8), torch.randn(3, 4, 9)
    for model, run in ((net, lambda: net(src, tgt).square().sum()), (conv, lambda: conv(seq).square().sum())):
        with raftorch.loss_scale(model, 4.0):
            (4 * run()).backward()
        scaled = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        run().backward()
        assert any(n.endswith("v_feedback.P") for n in scaled) or model is conv
        for n, p in model.named_parameters():
            if p.grad is not None:
                assert torch.equal(scaled[n], 4 * p.grad), n


def test_pyproject_states_the_torch_version_the_code_needs():
    """functional.autocast_inputs calls torch.is_autocast_enabled(device_type) and
    torch.get_autocast_dtype, both new in torch 2.4."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text()
    major, minor = map(int, re.search(r'"torch>=(\d+)\.(\d+)"', text).groups())
    assert (major, minor) >= (2, 4)
    assert hasattr(torch, "get_autocast_dtype")


def test_attention_second_derivatives_are_torchs_for_bp_and_refused_for_feedback_rules():
    torch.manual_seed(0)
    old = nn.MultiheadAttention(8, 2, batch_first=True)
    new = raftorch.convert(old, "bp", inplace=True)
    x = torch.randn(2, 4, 8, requires_grad=True)
    second = []
    for m in (old, new):
        gx, = torch.autograd.grad(m(x, x, x)[0].square().sum(), x, create_graph=True)
        second.append(torch.autograd.grad(gx.square().sum(), old.in_proj_weight)[0])
    assert torch.equal(*second)
    for rule, rank in (("fa", None), ("raf", 2)):
        fb = raftorch.convert(old, rule, rank)
        with pytest.raises(RuntimeError, match="create_graph=True"):
            torch.autograd.grad(fb(x, x, x)[0].sum(), x, create_graph=True)
