"""Exact oracles for the feedback layers: plain autograd, transposed weights, hand formulas."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import raftorch
from raftorch.functional import OjaOptions, oja_grad

CONV_GEOMETRIES = [
    dict(stride=1, padding=0, dilation=1, groups=1),
    dict(stride=2, padding=1, dilation=1, groups=1),
    dict(stride=1, padding=2, dilation=2, groups=1),
    dict(stride=2, padding=1, dilation=1, groups=2),
    dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=4),
]


def grads(module, x, seed=0):
    """Input and parameter gradients of a fixed random linear functional of the output."""
    torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    out = {"input": x.grad}
    out.update({n: p.grad for n, p in module.named_parameters() if p.grad is not None})
    return y, out


def twin(plain, rule, rank=None, **options):
    return raftorch.convert(plain, rule, rank, **options)


# --------------------------------------------------------------------------- bp is backprop


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 5)], ids=["batch", "tokens"])
def test_bp_linear_gives_exactly_autograd_gradients(shape):
    plain = nn.Linear(5, 6)
    layer = twin(plain, "bp")
    x = torch.randn(*shape)
    y0, g0 = grads(plain, x)
    y1, g1 = grads(layer, x)
    assert torch.equal(y0, y1)
    for k in ("input", "weight", "bias"):
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("geom", CONV_GEOMETRIES, ids=str)
def test_bp_conv_gives_exactly_autograd_gradients(geom):
    plain = nn.Conv2d(4, 8, 3, **geom)
    layer = twin(plain, "bp")
    x = torch.randn(2, 4, 9, 10)
    y0, g0 = grads(plain, x)
    y1, g1 = grads(layer, x)
    assert torch.equal(y0, y1)
    for k in ("input", "weight", "bias"):
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=1e-6)


def test_bp_layers_pass_gradcheck_in_double():
    lin = raftorch.Linear(4, 3, rule="bp", dtype=torch.float64)
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: lin.__class__.forward(lin, x), (x, lin.weight, lin.bias))
    for geom in CONV_GEOMETRIES:
        conv = raftorch.Conv2d(4, 4, 3, rule="bp", dtype=torch.float64, **geom)
        xc = torch.randn(1, 4, 7, 6, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, w, b: conv(x), (xc, conv.weight, conv.bias))


# --------------------------------------------------------------------------- feedback = W^T


def test_fa_with_B_equal_to_W_transpose_gives_bp_grad_input():
    plain = nn.Linear(6, 5)
    fa = twin(plain, "fa")
    with torch.no_grad():
        fa.B.copy_(plain.weight.t())
    x = torch.randn(4, 3, 6)
    _, g0 = grads(plain, x)
    _, g1 = grads(fa, x)
    torch.testing.assert_close(g1["input"], g0["input"], rtol=0, atol=1e-5)
    torch.testing.assert_close(g1["weight"], g0["weight"], rtol=0, atol=1e-5)


def test_raf_with_exact_full_rank_feedback_equals_backprop_linear():
    plain = nn.Linear(6, 4)
    raf = twin(plain, "raf", rank="full")
    assert raf.rank == 4
    with torch.no_grad():  # Q P = W^T with P = I
        raf.P.copy_(torch.eye(4))
        raf.Q.copy_(plain.weight.t())
    raf.Q.requires_grad_(False)
    raf.P.requires_grad_(False)
    x = torch.randn(8, 6)
    _, g0 = grads(plain, x)
    _, g1 = grads(raf, x)
    torch.testing.assert_close(g1["input"], g0["input"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("geom", CONV_GEOMETRIES, ids=str)
def test_fa_and_raf_with_exact_feedback_equal_backprop_conv(geom):
    plain = nn.Conv2d(4, 8, 3, **geom)
    x = torch.randn(2, 4, 9, 10)
    _, g0 = grads(plain, x)

    fa = twin(plain, "fa")
    with torch.no_grad():
        fa.B.copy_(plain.weight)
    _, g1 = grads(fa, x)
    torch.testing.assert_close(g1["input"], g0["input"], rtol=0, atol=1e-5)

    raf = twin(plain, "raf", rank=8)
    with torch.no_grad():  # P = I: z = grad_output, then Q = W transposes it exactly
        raf.P.copy_(torch.eye(8))
        raf.Q.copy_(plain.weight)
    for p in (raf.Q, raf.P):
        p.requires_grad_(False)
    _, g2 = grads(raf, x)
    torch.testing.assert_close(g2["input"], g0["input"], rtol=0, atol=1e-5)
    torch.testing.assert_close(g2["weight"], g0["weight"], rtol=0, atol=1e-5)


def test_feedback_matrix_is_what_the_backward_uses():
    torch.manual_seed(1)
    for rule, rank in [("bp", None), ("fa", None), ("kp", None), ("raf", 3)]:
        lin = raftorch.Linear(6, 5, rule=rule, rank=rank)
        x = torch.randn(4, 6)
        _, g = grads(lin, x, seed=2)
        torch.manual_seed(2)
        w = torch.randn(4, 5)
        torch.testing.assert_close(g["input"], w @ lin.feedback_matrix().t(), rtol=1e-5, atol=1e-6)
    for geom in CONV_GEOMETRIES:
        conv = raftorch.Conv2d(4, 8, 3, rule="raf", rank=4, **geom)
        x = torch.randn(2, 4, 9, 10)
        y, g = grads(conv, x, seed=3)
        torch.manual_seed(3)
        w = torch.randn_like(y)
        ref = torch.ops.aten.convolution_backward(
            w, x, conv.feedback_matrix(), None, list(conv.geometry.stride), list(conv.geometry.padding),
            list(conv.geometry.dilation), False, [0, 0], 1, [True, False, False])[0]
        torch.testing.assert_close(g["input"], ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- local updates


def test_Q_grad_equals_P_times_grad_W_transposed_linear():
    lin = raftorch.Linear(7, 5, rule="raf", rank=3)
    _, g = grads(lin, torch.randn(2, 6, 7))
    torch.testing.assert_close(g["Q"], (lin.P.detach() @ g["weight"]).t(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("geom", CONV_GEOMETRIES, ids=str)
def test_Q_grad_is_the_conv_analogue(geom):
    """grad_Q is the weight gradient of the virtual conv x -> z with z = P * grad_output, i.e.
    grad_Q[k] = sum_o P[k, o] grad_W[o] when groups == 1 (and per group otherwise)."""
    conv = raftorch.Conv2d(4, 8, 3, rule="raf", rank=4, **geom)
    x = torch.randn(2, 4, 9, 10)
    _, g = grads(conv, x)
    gW, P, G = g["weight"], conv.P.detach(), conv.groups
    if G == 1:
        expected = torch.einsum("ko,ochw->kchw", P, gW)
    else:  # recompute from its definition with autograd: d/dQ <z, conv(x, Q)>
        y = F.conv2d(x, conv.weight, conv.bias, **{k: getattr(conv.geometry, k) for k in
                                                   ("stride", "padding", "dilation", "groups")})
        torch.manual_seed(0)
        w = torch.randn_like(y)
        z = torch.einsum("ko,nohw->nkhw", P, w)
        Qv = conv.Q.detach().clone().requires_grad_(True)
        zq = F.conv2d(x, Qv, None, conv.geometry.stride, conv.geometry.padding, conv.geometry.dilation, G)
        (zq * z).sum().backward()
        expected = Qv.grad
    torch.testing.assert_close(g["Q"], expected, rtol=1e-4, atol=1e-5)


def test_kp_B_grad_is_W_grad_transposed():
    lin = raftorch.Linear(5, 4, rule="kp")
    _, g = grads(lin, torch.randn(6, 5))
    torch.testing.assert_close(g["B"], g["weight"].t())
    conv = raftorch.Conv2d(3, 4, 3, rule="kp", padding=1)
    _, g = grads(conv, torch.randn(2, 3, 5, 5))
    torch.testing.assert_close(g["B"], g["weight"])


def test_P_grad_is_ojas_rule_by_hand():
    torch.manual_seed(0)
    lin = raftorch.Linear(5, 6, rule="raf", rank=2, oja_center=False, oja_scale="none", oja_reduce="sum")
    x = torch.randn(4, 5)
    _, g = grads(lin, x)
    torch.manual_seed(0)
    e = torch.randn(4, 6)  # grads() draws the output gradient first with this seed
    P = lin.P.detach()
    z = e @ P.t()
    expected = -(z.t() @ e - z.t() @ z @ P)
    torch.testing.assert_close(g["P"], expected, rtol=1e-5, atol=1e-6)


def test_oja_normalisation_options_match_their_definition():
    torch.manual_seed(0)
    e, P = torch.randn(32, 6) * torch.arange(1.0, 7.0), torch.linalg.qr(torch.randn(6, 3))[0].t()
    ec = e - e.mean(0)
    for scale, s2 in [("maxstd", ec.var(0, unbiased=False).max()), ("rms", ec.pow(2).mean())]:
        en = ec / s2.sqrt()
        zn = en @ P.t()
        expected = -(zn.t() @ en - zn.t() @ zn @ P) / 32
        got = oja_grad(P, e, e @ P.t(), OjaOptions(scale=scale))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_oja_on_targets_uses_the_fed_targets():
    lin = raftorch.Linear(5, 4, rule="raf", rank=2, oja_source="target", oja_center=False,
                          oja_scale="none", oja_reduce="sum")
    net = nn.Sequential(lin)
    y = torch.tensor([0, 3, 1, 3])
    out = net(torch.randn(4, 5))
    with pytest.raises(RuntimeError, match="feed_targets"):
        out.sum().backward(retain_graph=True)
    lin.zero_grad()
    raftorch.feed_targets(net, y)
    out.sum().backward()
    t = F.one_hot(y, 4).float()
    P = lin.P.detach()
    z = t @ P.t()
    torch.testing.assert_close(lin.P.grad, -(z.t() @ t - z.t() @ z @ P))


# --------------------------------------------------------------------------- plumbing


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor a computing (non-view) aten op produces while active."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.__name__.startswith("detach"):
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("rule,rank", [("bp", None), ("fa", None), ("raf", 2)])
def test_input_gradient_is_not_computed_for_an_input_without_grad(rule, rank):
    """The first layer's input needs no gradient: no op of the backward may produce a tensor
    of the input's shape (3, 9) unless the input asks for one."""
    lin = raftorch.Linear(9, 6, rule=rule, rank=rank)
    for needs, expect in [(False, False), (True, True)]:
        y = lin(torch.randn(3, 9, requires_grad=needs))
        with ShapeRecorder() as rec:
            y.sum().backward()
        assert ((3, 9) in rec.shapes) == expect, (needs, rec.shapes)
        assert lin.weight.grad is not None


@pytest.mark.parametrize("rule,rank", [("bp", None), ("fa", None), ("kp", None), ("fa-lowrank", 3),
                                       ("raf-q", 3), ("raf", 3)])
def test_layers_behave_like_torch_modules(rule, rank):
    lin = raftorch.Linear(6, 4, rule=rule, rank=rank)
    assert isinstance(lin, nn.Linear)
    keys = set(lin.state_dict())
    assert {"weight", "bias"} <= keys
    learns = {n for n, p in lin.named_parameters() if p.requires_grad}
    assert learns == {"weight", "bias", *lin.rule.learns}
    clone = copy.deepcopy(lin).to(torch.float64)
    assert clone.weight.dtype == torch.float64 and clone.rule == lin.rule
    clone.load_state_dict({k: v.double() for k, v in lin.state_dict().items()})
    assert f"rule='{rule}'" in repr(lin)
    if rank:
        assert f"rank={rank}" in repr(lin)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    lin(torch.randn(5, 6, requires_grad=True)).pow(2).sum().backward()
    opt.step()


def test_P_starts_orthonormal_and_fixed_feedback_does_not_learn():
    lin = raftorch.Linear(30, 20, rule="raf-q", rank=5)
    torch.testing.assert_close(lin.P @ lin.P.t(), torch.eye(5), atol=1e-5, rtol=0)
    assert not lin.P.requires_grad and lin.Q.requires_grad
    lin(torch.randn(4, 30)).sum().backward()
    assert lin.P.grad is None and lin.Q.grad is not None


def test_rank_is_clamped_to_the_layer():
    assert raftorch.Linear(30, 7, rule="raf", rank=50).rank == 7
    assert raftorch.Linear(3, 70, rule="raf", rank=50).rank == 3
    assert raftorch.Conv2d(3, 16, 3, rule="raf", rank=64).rank == 16
    assert raftorch.Conv2d(1, 16, 2, rule="raf", rank=64).rank == 4


def test_bf16_autocast_runs_every_rule():
    for rule, rank in [("bp", None), ("fa", None), ("raf", 3)]:
        net = nn.Sequential(raftorch.Conv2d(2, 3, 3, padding=1, rule=rule, rank=rank), nn.ReLU(),
                            nn.Flatten(), raftorch.Linear(48, 3, rule=rule, rank=rank))
        x = torch.randn(4, 2, 4, 4, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(x)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        for p in net.parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("kernel, rank, expected", [(1, 1, 1), (1, 3, 3), (3, 1, 9), (3, 2, 16), (5, 1, 16)])
def test_a_rank_r_conv_sends_below_an_error_of_at_most_r_k2_channel_directions(kernel, rank, expected):
    """The conv rank limits the channels of the error map z = P g (r of them); the error sent
    below, conv_transpose(z, Q), mixes those r maps through k x k kernels, so at each pixel its
    channel vector lies in the span of Q's r * k^2 columns: exactly rank r for 1 x 1 kernels,
    min(C_in, r k^2) otherwise (a 9 x 9 retina conv at r = 1 gets full-rank errors). This is
    what "rank r into the retina" limits (README, the retina)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, kernel, padding=kernel // 2)
    layer = raftorch.convert(nn.Sequential(conv), rule="raf", rank=rank)
    x = torch.randn(32, 16, 12, 12, dtype=torch.float64, requires_grad=True)
    layer = layer.double()
    out = layer(x)
    out.backward(torch.randn_like(out))
    per_pixel = x.grad.permute(0, 2, 3, 1).reshape(-1, 16)
    s = torch.linalg.svdvals(per_pixel)
    assert int((s > 1e-9 * s[0]).sum()) == expected


# --------------------------------------------------------------------------- argument checks, meta


ZERO_FEATURES = {  # name: (layer, positional arguments, keywords, message)
    "linear-in": ("Linear", (0, 3), {}, r"Linear\(in_features=0, out_features=3\).*in_features must be at least 1"),
    "linear-out": ("Linear", (4, 0), {}, r"out_features must be at least 1"),
    "conv2d-in": ("Conv2d", (0, 3, 3), {}, r"Conv2d\(in_channels=0, out_channels=3\).*in_channels must"),
    "conv2d-out": ("Conv2d", (3, 0, 3), {}, r"out_channels must be at least 1"),
    "conv1d-in": ("Conv1d", (0, 3, 3), {}, r"Conv1d\(in_channels=0.*in_channels must"),
    "attention-kdim": ("MultiheadAttention", (8, 2), dict(kdim=0, vdim=4), r"the k projection \(0 -> 8"),
}


@pytest.mark.parametrize("case", list(ZERO_FEATURES))
@pytest.mark.parametrize("rule", ["fa", "kp", "fa-lowrank", "raf"])
def test_zero_features_are_refused_for_a_feedback_rule(case, rule):
    """A feedback rule on a layer with no inputs or outputs is a ValueError naming the argument
    (it used to be a ZeroDivisionError from the feedback scale, or an IndexError)."""
    layer, args, kwargs, message = ZERO_FEATURES[case]
    rank = None if rule in ("fa", "kp") else 2
    with pytest.raises(ValueError, match=message):
        getattr(raftorch, layer)(*args, rule=rule, rank=rank, **kwargs)


@pytest.mark.parametrize("shape", [(0, 3), (4, 0)])
def test_bp_accepts_zero_features_as_torch_does(shape):
    """``rule="bp"`` is ``nn.Linear``: 0 features work (an empty weight; with no inputs the
    output is the bias)."""
    torch.manual_seed(0)
    plain = nn.Linear(*shape)
    ours = raftorch.convert(plain, "bp")
    x = torch.randn(2, shape[0], requires_grad=True)
    assert torch.equal(ours(x), plain(x))
    ours(x).sum().backward()
    assert x.grad.shape == x.shape
    assert raftorch.Conv2d(shape[0], shape[1], 3, rule="bp").weight.numel() == 0


@pytest.mark.parametrize("rule,rank,options", [("bp", None, {}), ("fa", None, {}), ("kp", None, {}),
                                               ("raf-q", 2, {}), ("raf", 2, {}),
                                               ("raf", 2, dict(oja_scale="std", oja_ddof=1)),
                                               ("raf", 2, dict(oja_scale="none", oja_center=False))])
def test_a_model_on_the_meta_device_runs_forward_and_backward(rule, rank, options):
    """As with ``nn.Linear``, a model built on (or moved to) the ``meta`` device runs: shapes
    only, no data (used to size a model before allocating it). The layers' autocast check used
    to fail there (PyTorch has no autocast for ``meta``)."""
    with torch.device("meta"):
        net = nn.Sequential(raftorch.Conv2d(3, 4, 3, rule=rule, rank=rank, **options), nn.ReLU(),
                            raftorch.Conv1d(4, 4, 3, rule=rule, rank=rank, **options), nn.Flatten(),
                            raftorch.Linear(4 * 3, 5, rule=rule, rank=rank, **options))
        attn = raftorch.MultiheadAttention(8, 2, rule=rule, rank=rank, batch_first=True, **options)
    assert all(p.device.type == "meta" for p in [*net.parameters(), *attn.parameters()])
    x = torch.randn(2, 3, 3, 7, device="meta", requires_grad=True)
    y = net[:2](x).flatten(2)  # (2, 4, 5)
    y = net[2:](y)
    assert y.shape == (2, 5) and y.device.type == "meta"
    y.sum().backward()
    assert x.grad.shape == x.shape and x.grad.device.type == "meta"
    q, k = torch.randn(2, 3, 8, device="meta"), torch.randn(2, 5, 8, device="meta", requires_grad=True)
    out = attn(q, k, k)[0]
    assert out.shape == (2, 3, 8)
    out.sum().backward()
    for p in [*net.parameters(), *attn.parameters()]:
        assert not p.requires_grad or (p.grad is not None and p.grad.device.type == "meta")
    moved = raftorch.convert(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), rule, rank).to("meta")
    assert moved(torch.randn(3, 4, device="meta")).shape == (3, 2)
