"""Convolutional direct feedback (dRAF / DFA from a conv source into earlier conv targets):
the delivered error and the local updates of Q and P against hand formulas, backprop's error
with the transposed path in a linear net, Oja's options and the empty batch as the layer-wise
convolution, the retina net through the API and the training config, clear errors."""
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import raftorch
import raftorch.training.loop as T
from raftorch.training.checkpoint import load_checkpoint
from raftorch.direct import DirectPath, injection_point
from raftorch.direct_conv import ConvDirectPath
from raftorch.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def conv_net(middle: nn.Module, stride: int, c_in=2, c_t=3, c_s=5, seed=0):
    """t (conv) -> act (tanh) -> mid -> s (conv, the source and the output)."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        t=nn.Conv2d(c_in, c_t, 3, padding=1), act=nn.Tanh(), mid=middle,
        s=nn.Conv2d(c_t, c_s, 3, stride=stride, padding=1))).double()


def capture(net: nn.Module, point: str, store: dict):
    """Keep the activity at ``point`` and, after backward, the error delivered to it (a hook
    registered before the conversion sees the activity before it is detached)."""
    def hook(module, args, out):
        store["h"] = out.detach().clone()
        out.register_hook(lambda g: store.__setitem__("delta", g.detach().clone()))
    net.get_submodule(point).register_forward_hook(hook)


def transposed_pool(z: torch.Tensor, size) -> torch.Tensor:
    """``D^T z``: the vector-Jacobian product of adaptive average pooling from ``size`` to
    ``z``'s grid, by autograd (independent of raftorch's matrices)."""
    h = torch.zeros(*z.shape[:2], *size, dtype=z.dtype, requires_grad=True)
    (g,) = torch.autograd.grad(F.adaptive_avg_pool2d(h, z.shape[-2:]), h, z)
    return g


def oja_by_hand(P, e_map):
    """Oja's grad_P with the default options (centred, divided by the largest per-channel
    population std, mean over rows), every pixel one row."""
    rows = e_map.permute(0, 2, 3, 1).reshape(-1, e_map.shape[1])
    ec = rows - rows.mean(0)
    en = ec / (ec.pow(2).mean(0).max()).sqrt()
    zn = en @ P.t()
    return -(zn.t() @ en - zn.t() @ zn @ P) / rows.shape[0]


# --------------------------------------------------------------------------- exact equations

CASES = {  # name: (middle module, source stride, input H x W) -> target / source grids
    "same grid": (nn.Identity(), 1, (6, 5)),                     # 6x5 -> 6x5
    "source 2x smaller": (nn.Identity(), 2, (6, 4)),             # 6x4 -> 3x2
    "source smaller, uneven": (nn.Identity(), 2, (5, 5)),        # 5x5 -> 3x3
    "source larger, uneven": (nn.Upsample(size=(7, 5)), 1, (3, 4)),  # 3x4 -> 7x5
}


@pytest.mark.parametrize("case", list(CASES))
def test_delivered_error_and_local_updates_equal_the_hand_formulas(case):
    """float64: delta_t = Q D^T(P e), grad_Q = sum_{n,p} h (D^T P e)^T, grad_P = Oja per pixel,
    each written with einsum and autograd's transpose of adaptive average pooling."""
    middle, stride, hw = CASES[case]
    net = conv_net(middle, stride)
    plain = conv_net(middle, stride)
    seen = {}
    capture(net, injection_point(net, "t"), seen)
    net = raftorch.convert(net, "draf", 4, source="s", inplace=True)
    (path,) = net.direct_feedback.paths
    assert isinstance(path, ConvDirectPath) and path.Q.shape == (3, 4) and path.P.shape == (4, 5)
    x = torch.randn(7, 2, *hw, dtype=torch.float64)
    out = net(x)
    e = torch.randn_like(out)
    out.backward(e)

    h, Q, P = seen["h"], path.Q.detach(), path.P.detach()
    z = torch.einsum("rc,nchw->nrhw", P, e)
    u = transposed_pool(z, h.shape[-2:])
    if case == "source 2x smaller":  # D^T of 2x2 average pooling: each value over its block, / 4
        torch.testing.assert_close(u, z.repeat_interleave(2, 2).repeat_interleave(2, 3) / 4)
    if case == "same grid":
        assert torch.equal(u, z)
        # stride 1, same grid: grad_Q is P times the gradient of the source kernel's centre tap
        torch.testing.assert_close(path.Q.grad, (P @ net.s.weight.grad[:, :, 1, 1]).t())
    torch.testing.assert_close(seen["delta"], torch.einsum("cr,nrhw->nchw", Q, u))
    torch.testing.assert_close(path.Q.grad, torch.einsum("nchw,nrhw->cr", h, u))
    torch.testing.assert_close(path.P.grad, oja_by_hand(P, e))
    # the source learns from e_s as under backprop (its input is the same, detached)
    plain(x).backward(e)
    torch.testing.assert_close(net.s.weight.grad, plain.s.weight.grad)
    # a different Q gives a different error: the check can fail
    assert not torch.allclose(seen["delta"], torch.einsum("cr,nrhw->nchw", Q + 0.1, u))


def test_conv_dfa_delivers_B_applied_per_pixel_after_the_transposed_pooling():
    net = conv_net(nn.Identity(), 2)
    seen = {}
    capture(net, injection_point(net, "t"), seen)
    net = raftorch.convert(net, "dfa", source="s", inplace=True)
    (path,) = net.direct_feedback.paths
    assert isinstance(path, ConvDirectPath) and path.B.shape == (3, 5) and not path.B.requires_grad
    out = net(torch.randn(4, 2, 5, 6, dtype=torch.float64))
    e = torch.randn_like(out)
    out.backward(e)
    want = torch.einsum("cd,ndhw->nchw", path.B, transposed_pool(e, seen["h"].shape[-2:]))
    torch.testing.assert_close(seen["delta"], want)


# --------------------------------------------------------------------------- the linear case


def linear_pair(pool: bool, seed=0):
    """t -> tanh [-> 2x2 average pooling] -> s (1x1 conv, the source) -> relu -> linear."""
    torch.manual_seed(seed)
    hw = 3 if pool else 6
    mods = [("t", nn.Conv2d(2, 3, 3, padding=1)), ("act", nn.Tanh())]
    mods += [("pool", nn.AvgPool2d(2))] if pool else []
    mods += [("s", nn.Conv2d(3, 5, 1)), ("relu", nn.ReLU()), ("flat", nn.Flatten()),
             ("fc", nn.Linear(5 * hw * hw, 4))]
    return nn.Sequential(OrderedDict(mods)).double()


@pytest.mark.parametrize("pool", [False, True], ids=["no resampling", "2x2 average pooling"])
def test_full_rank_path_set_to_the_transposed_1x1_conv_gives_backprop(pool):
    """Between the target's activity and the source: a 1x1 convolution W (and 2x2 average
    pooling D). Backprop's error is D^T(W^T e_s); with r = C_s and Q = W^T P^T, Q P = W^T and
    the delivered error, hence every weight gradient, is backprop's. The Kolen-Pollack-like
    grad_Q is exactly (P grad_W)^T."""
    plain = linear_pair(pool)
    x, y = torch.randn(8, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    plain.zero_grad()
    F.cross_entropy(plain(x), y).backward()
    bp = {n: p.grad.clone() for n, p in plain.named_parameters()}

    net = raftorch.convert(plain, "draf", "full", source="s", targets=["act"], example_input=x[:2])
    (path,) = net.direct_feedback.paths
    assert isinstance(path, ConvDirectPath) and path.rank == 5 and path.point == "act"
    W = plain.s.weight.detach()[:, :, 0, 0]  # (C_s, C_t)
    with torch.no_grad():
        path.Q.copy_(W.t() @ path.P.t())
    F.cross_entropy(net(x), y).backward()
    for name in ("t.weight", "t.bias", "s.weight", "s.bias", "fc.weight"):
        torch.testing.assert_close(net.get_parameter(name).grad, bp[name])
    grad_W = net.s.weight.grad[:, :, 0, 0]
    torch.testing.assert_close(path.Q.grad, (path.P.detach() @ grad_W).t())
    # a random Q is not the transposed path: the oracle can fail
    net.zero_grad()
    with torch.no_grad():
        path.Q.normal_()
    F.cross_entropy(net(x), y).backward()
    assert not torch.allclose(net.t.weight.grad, bp["t.weight"], atol=1e-4)


# --------------------------------------------------------------------------- Oja options, empty batch

OJA = [dict(), dict(oja_scale="rms"), dict(oja_scale="std", oja_ddof=1), dict(oja_scale="none"),
       dict(oja_center=False, oja_reduce="sum"), dict(oja_scale="maxstd", oja_center=False, oja_ddof=1)]


@pytest.mark.parametrize("options", OJA, ids=lambda o: "-".join(f"{v}" for v in o.values()) or "default")
def test_P_learns_as_the_layerwise_conv_raf_on_the_same_error_map(options):
    """Every Oja option: the path's grad_P equals that of a layer-wise raftorch.Conv2d (rule
    raf) whose output error is the same source error map, with the same P."""
    net = raftorch.convert(conv_net(nn.Identity(), 2), "draf", 3, source="s", inplace=True, **options)
    (path,) = net.direct_feedback.paths
    out = net(torch.randn(5, 2, 6, 6, dtype=torch.float64))
    e = torch.randn_like(out) + 0.3  # a mean, so that centring matters
    out.backward(e)

    layer = raftorch.Conv2d(4, 5, 3, padding=1, rule="raf", rank=3, dtype=torch.float64, **options)
    with torch.no_grad():
        layer.P.copy_(path.P)
    layer(torch.randn(5, 4, *e.shape[-2:], dtype=torch.float64)).backward(e)
    torch.testing.assert_close(path.P.grad, layer.P.grad)
    assert path.P.grad.abs().sum() > 0


def test_loss_scale_treats_the_conv_path_as_a_layer():
    """Under raftorch.loss_scale(c) with a loss c times larger, grad_P is c times the unscaled
    one (the step after unscaling is the same), as for a layer's P."""
    grads = []
    for c in (1.0, 8.0):
        net = raftorch.convert(conv_net(nn.Identity(), 1), "draf", 3, source="s", inplace=True)
        out = net(torch.randn(4, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
        e = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2))
        with raftorch.loss_scale(net, c):
            out.backward(c * e)
        grads.append(net.direct_feedback.paths[0].P.grad / c)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("options", [dict(), dict(oja_scale="std", oja_ddof=1), dict(oja_scale="none")])
def test_empty_batch_gives_zero_updates_and_no_nan(options):
    net = raftorch.convert(conv_net(nn.Identity(), 2), "draf", 3, source="s", inplace=True, **options)
    out = net(torch.zeros(0, 2, 6, 6, dtype=torch.float64))
    assert out.shape == (0, 5, 3, 3)
    out.sum().backward()
    (path,) = net.direct_feedback.paths
    for p in (path.Q, path.P, net.t.weight, net.t.bias):
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


# --------------------------------------------------------------------------- the retina net


def tiny_retina():
    torch.manual_seed(0)
    return build_model("retina", (1, 16, 16), 10, channels=8, bottleneck=4, fc=16, kernel=5)


@pytest.mark.parametrize("rank", [2, "full"])
def test_retina_from_the_first_vvs_conv_trains_with_few_feedback_parameters(rank):
    """Source vvs.conv1 (8 channels), targets the two retina convolutions (8 and 4 channels):
    per-pixel paths (no example_input needed) with C_s r + r C_t parameters each, not sized by
    the 16 x 16 maps; a few Adam steps give finite losses and move the retina and Q, P."""
    net = raftorch.convert(tiny_retina(), "draf", rank, source="vvs.conv1",
                           targets=["retina.conv1", "retina.conv2"])
    paths = net.direct_feedback.paths
    r = 8 if rank == "full" else rank
    assert [(type(p), p.point, tuple(p.Q.shape), tuple(p.P.shape)) for p in paths] == [
        (ConvDirectPath, "retina.relu1", (8, r), (r, 8)), (ConvDirectPath, "retina.relu2", (4, r), (r, 8))]
    n_feedback = sum(p.numel() for p in net.direct_feedback.parameters())
    assert n_feedback == (8 * r + r * 8) + (8 * r + r * 4)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 1, 16, 16, generator=g), torch.randint(0, 10, (24,), generator=g)
    for _ in range(4):
        loss = F.cross_entropy(net(x), y)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name in ("retina.conv1.weight", "retina.conv2.weight", "direct_feedback.paths.0.Q",
                 "direct_feedback.paths.1.P"):
        assert not torch.equal(net.get_parameter(name), before[name]), name
    # the dense form stays available: one (C_t H W) x r matrix per target
    dense = raftorch.convert(tiny_retina(), "draf", 2, source="vvs.conv1", path="dense",
                             targets=["retina.conv1", "retina.conv2"], example_input=x[:2])
    assert [type(p) for p in dense.direct_feedback.paths] == [DirectPath, DirectPath]
    assert dense.direct_feedback.paths[0].Q.shape == (8 * 16 * 16, 2)


def test_training_config_with_a_conv_source_builds_the_conv_paths(tmp_path):
    """rule: draf, rule_options: {source: vvs.conv1, targets: [...]} through raftorch.training.loop: one
    epoch on 200 digits at 16 x 16, finite results, per-pixel paths in the checkpoint."""
    cfg = dict(data="digits", image_size=16, train_size=200, model="retina",
               model_options={"channels": 8, "bottleneck": 4, "fc": 16, "kernel": 5},
               rule="draf", rank=4, rule_options={"source": "vvs.conv1",
                                                   "targets": ["retina.conv1", "retina.conv2"]},
               optimizer="adam", lr=1e-3, batch_size=50, epochs=1, device="cpu", threads=1,
               out=str(tmp_path / "run"))
    result = T.train(cfg, progress=False)
    assert torch.isfinite(torch.tensor([result["test_loss"], result["test_accuracy"]])).all()
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    assert state["direct_feedback.paths.0.Q"].shape == (8, 4)
    assert state["direct_feedback.paths.1.Q"].shape == (4, 4)
    assert state["direct_feedback.paths.1.P"].shape == (4, 8)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, match", [
    (dict(path="pixel"), r"path must be one of \['auto', 'conv', 'dense'\], got 'pixel'"),
    (dict(source="output", path="conv"),
     r"path='conv' needs \(N, C, H, W\) maps .* the source 'output' gives \(10,\)"),
    (dict(rank=0), "rank must be a positive integer"),
    (dict(path="dense"), "pass example_input"),
])
def test_bad_path_options_raise_one_clear_value_error(kwargs, match):
    kwargs = {"rank": 2, "source": "vvs.conv1", "targets": ["retina.conv1", "retina.conv2"], **kwargs}
    with pytest.raises(ValueError, match=match):
        raftorch.convert(tiny_retina(), "draf", **kwargs)


def test_a_map_of_other_channels_at_run_time_is_a_clear_error():
    net = raftorch.convert(conv_net(nn.Identity(), 1), "draf", 2, source="s", inplace=True)
    net(torch.randn(2, 2, 4, 4, dtype=torch.float64)).sum().backward()
    net.direct_feedback.paths[0].c_target = 4  # as if built for another net
    with pytest.raises(RuntimeError, match=r"target 't': expected an activity map \(N=2, C=4, H, W\)"):
        net(torch.randn(2, 2, 4, 4, dtype=torch.float64))


def test_subspace_tracking_measures_a_conv_path_per_pixel():
    # track_subspace compares a conv path's P (r, C_s) with the source map's pixels as samples
    from raftorch.subspace import capture_errors, subspace_overlap, track_subspace

    torch.manual_seed(0)
    net = build_model("retina", (1, 16, 16), 10, channels=8, bottleneck=4, fc=16, kernel=5)
    model = raftorch.convert(net, "draf", 4, source="vvs.conv3", targets=["retina.conv1", "retina.conv2"],
                             example_input=torch.randn(2, 1, 16, 16))
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
    got = track_subspace(model, x, y)["subspace"]
    e = capture_errors(model, x, y, F.cross_entropy, ["vvs.conv3"])["vvs.conv3"]
    for i, path in enumerate(model.direct_feedback.paths):
        pixels = e.permute(0, 2, 3, 1).reshape(-1, e.shape[1])  # (N H W, C_s) by hand
        want = subspace_overlap(path.P, errors=pixels, center=True)
        assert got[f"direct_feedback.paths.{i}"] == pytest.approx(want, rel=1e-9)
