"""Numerics of the feedback paths in real training set-ups: loss scaling and
gradient accumulation (``raftorch.loss_scale``), float16 / bfloat16 Oja statistics, double
backward, the authors' options (``oja_scale="std"``, ``oja_ddof``, ``error_clamp``), and exact
oracles for the floors and branches of ``oja_grad``."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import raftorch
from raftorch import extension
from raftorch import functional as RF
from raftorch.functional import OjaOptions, oja_grad


def hand_oja(P, e, *, center=True, scale="maxstd", ddof=0, reduce="mean"):
    """grad_P = -(z_n^T e_n - z_n^T z_n P) / reduce, e_n formed explicitly in float64."""
    P, e = P.double(), e.double()
    M = e.shape[0]
    ec = e - e.mean(0) if center else e
    var = ec.pow(2).sum(0) / (M - ddof)
    if scale == "maxstd":
        en = ec / var.max().sqrt()
    elif scale == "rms":
        en = ec / var.mean().sqrt()
    elif scale == "std":
        en = ec / var.sqrt()
    else:
        en = ec
    zn = en @ P.t()
    g = -(zn.t() @ en - zn.t() @ zn @ P)
    return g / M if reduce == "mean" else g


def orthonormal(r, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, r, generator=gen))[0].t().contiguous()


# --------------------------------------------------------------------------- models for item 1


def raf_mlp(path="python", **options):
    torch.manual_seed(0)
    net = nn.Sequential(raftorch.Linear(6, 8, rule="raf", rank=3, **options), nn.Tanh(),
                        raftorch.Linear(8, 5, rule="raf", rank=3, **options))
    return net


def raf_conv(**options):
    torch.manual_seed(0)
    return nn.Sequential(raftorch.Conv2d(2, 4, 3, padding=1, rule="raf", rank=2, **options), nn.Tanh(),
                         nn.Flatten(), raftorch.Linear(4 * 25, 5, rule="raf", rank=3, **options))


def draf_mlp(**options):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 5))
    return raftorch.convert(net, "draf", 3, **options)


MODELS = {
    "linear-python": (lambda **o: raf_mlp(**o), (6,), "python"),
    "linear-cpp": (lambda **o: raf_mlp(**o), (6,), "cpp"),
    "conv": (lambda **o: raf_conv(**o), (2, 5, 5), "python"),
    "draf": (lambda **o: draf_mlp(**o), (6,), "python"),
}


def backward(net, x, y, factor=1.0, path="python", use_scale=True, feed=False):
    """Backward of ``factor * loss`` inside ``loss_scale(net, factor)``."""
    ctx = extension.disabled() if path == "python" else _nullctx()
    with ctx:
        loss = F.cross_entropy(net(x), y) * factor
        if feed:
            raftorch.feed_targets(net, y)
        if use_scale:
            with raftorch.loss_scale(net, factor):
                loss.backward()
        else:
            loss.backward()


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


OPTION_SETS = [{}, {"oja_scale": "none"}, {"oja_scale": "rms", "oja_reduce": "sum"},
               {"oja_scale": "std", "oja_ddof": 1}]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("model", list(MODELS))
def test_grad_scaler_step_of_P_equals_the_unscaled_step(model, options):
    """GradScaler backpropagates s*loss and unscale_ divides every .grad by s: inside
    loss_scale(net, s) P.grad after unscale_ equals the unscaled loss's P.grad, like W.grad
    (without the correction it is 1/s of it for the scale-invariant scales)."""
    if model == "draf" and options.get("oja_reduce") == "sum":
        options = {"oja_scale": "rms"}
    build, shape, path = MODELS[model]
    torch.manual_seed(1)
    x, y = torch.randn(7, *shape), torch.randint(0, 5, (7,))
    ref = build(**options)
    backward(ref, x, y, 1.0, path)
    expected = grads(ref)

    net = build(**options)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with extension.disabled() if path == "python" else _nullctx():
        loss = F.cross_entropy(net(x), y)
        with raftorch.loss_scale(net, scaler.get_scale()):
            scaler.scale(loss).backward()
    scaler.unscale_(opt)
    got = grads(net)
    assert set(got) == set(expected)
    assert any(n.endswith("P") for n in got)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-7, msg=n)


def test_loss_scale_on_targets_multiplies_by_the_factor():
    """oja_source='target': the targets do not scale with the loss, so P.grad = c G(t)."""
    torch.manual_seed(1)
    x, y = torch.randn(7, 6), torch.randint(0, 5, (7,))
    build = lambda: nn.Sequential(raftorch.Linear(6, 5, rule="raf", rank=3, oja_source="target",  # noqa: E731
                                                  oja_scale="none"))
    torch.manual_seed(0)
    ref = build()
    backward(ref, x, y, 1.0, feed=True)
    torch.manual_seed(0)
    net = build()
    backward(net, x, y, 8.0, feed=True)
    torch.testing.assert_close(net[0].P.grad, 8.0 * ref[0].P.grad)
    torch.testing.assert_close(net[0].weight.grad, 8.0 * ref[0].weight.grad)


@pytest.mark.parametrize("model", list(MODELS))
def test_k_accumulated_micro_batches_give_the_mean_of_their_P_grads(model):
    """Accumulating k micro-batches of loss_i / k inside loss_scale(net, 1/k) gives
    P.grad = mean_i P.grad_i, as W.grad = mean_i W.grad_i (without it: k times the mean)."""
    build, shape, path = MODELS[model]
    k = 3
    torch.manual_seed(2)
    xs, ys = torch.randn(k, 6, *shape), torch.randint(0, 5, (k, 6))
    each = []
    for i in range(k):
        net = build()
        backward(net, xs[i], ys[i], 1.0, path)
        each.append(grads(net))
    net = build()
    for i in range(k):
        backward(net, xs[i], ys[i], 1.0 / k, path)
    got = grads(net)
    for n in each[0]:
        torch.testing.assert_close(got[n], sum(g[n] for g in each) / k, rtol=1e-5, atol=1e-7, msg=n)


def test_loss_scale_nests_restores_and_rejects_bad_factors():
    net = raf_mlp()
    holder = net[0].scale_slot
    with raftorch.loss_scale(net, 4.0):
        with raftorch.loss_scale(net, 0.5):
            assert holder.value == 2.0
        assert holder.value == 4.0
    assert holder.value == 1.0
    for bad in (0, -1.0, float("inf"), float("nan"), "2", True, torch.ones(2)):
        with pytest.raises(ValueError, match="loss_scale"):
            with raftorch.loss_scale(net, bad):
                pass
    assert copy.deepcopy(net)[0].scale_slot is not holder


# --------------------------------------------------------------------------- item 2: fp16 / bf16


def test_float16_oja_is_finite_and_matches_float32_at_gradscaler_scale():
    """A float16 error at GradScaler's default scale 65536: sums of squares overflow in
    half precision; computed in float32 P.grad is finite and equals the float32 result."""
    torch.manual_seed(0)
    P = orthonormal(3, 6)
    e32 = torch.randn(64, 6) * 65536.0 / 64 + 50.0  # |e| ~ 1000: e^2 summed > 65504
    e16 = e32.half()
    e = e16.float()  # the same numbers in float32
    want = oja_grad(P, e, e @ P.t(), OjaOptions())
    got = oja_grad(P.half(), e16, (e16 @ P.half().t()), OjaOptions())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-3 * want.abs().max().item())
    got32 = oja_grad(P, e16, (e16 @ P.half().t()), OjaOptions())  # float32 P, half signal
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_half_layer_backward_under_a_large_loss_scale_is_finite():
    torch.manual_seed(0)
    lin = raftorch.Linear(6, 8, rule="raf", rank=3, dtype=torch.half)
    ref = raftorch.Linear(6, 8, rule="raf", rank=3)
    ref.load_state_dict({k: v.float() for k, v in lin.state_dict().items()})
    x = torch.randn(32, 6)
    g = torch.randn(32, 8) * 2000.0
    lin(x.half()).backward(g.half())
    ref(x.half().float()).backward(g.half().float())
    assert torch.isfinite(lin.P.grad).all()
    torch.testing.assert_close(lin.P.grad.float(), ref.P.grad, rtol=1e-2, atol=1e-2 * ref.P.grad.abs().max().item())


def test_bfloat16_centres_explicitly_when_the_mean_dwarfs_the_std():
    """mean/std = 5: the rank-one centring correction loses every digit in bfloat16; explicit
    centring in float32 gives the float32 answer for the same (bf16-rounded) signal."""
    torch.manual_seed(0)
    P = orthonormal(3, 6)
    e = (torch.randn(256, 6) + 5.0).bfloat16()
    want = hand_oja(P, e.float()).float()
    got = oja_grad(P, e, (e @ P.bfloat16().t()), OjaOptions())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_float16_floor_does_not_underflow_on_the_device_branch(monkeypatch):
    monkeypatch.setattr(RF, "HOST_SCALARS", False)
    P = orthonormal(2, 4).half()
    e = torch.full((16, 4), 0.3, dtype=torch.half)  # a constant signal: no direction
    got = oja_grad(P, e, e @ P.t(), OjaOptions())
    assert torch.equal(got, torch.zeros_like(got))


# --------------------------------------------------------------------------- item 3: double backward


def test_bp_equals_nn_layers_in_double_backward():
    """A gradient penalty (create_graph=True): bp's second derivatives are nn.Linear's and
    nn.Conv2d's exactly."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 4))
    ours = raftorch.convert(copy.deepcopy(plain), "bp")
    assert isinstance(ours[0], raftorch.Conv2d) and isinstance(ours[3], raftorch.Linear)
    x = torch.randn(5, 2, 4, 4)
    out = {}
    for name, net in (("plain", plain), ("ours", ours)):
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(net(xi).pow(2).sum(), xi, create_graph=True)
        gx.pow(2).sum().backward()
        out[name] = [p.grad for p in net.parameters()]
    for a, b in zip(out["plain"], out["ours"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("build", [
    lambda: raftorch.Linear(4, 3, rule="fa"),
    lambda: raftorch.Linear(4, 3, rule="kp"),
    lambda: raftorch.Linear(4, 3, rule="raf", rank=2),
    lambda: raftorch.Linear(4, 3, rule="raf", rank=2, oja_scale="std"),
    lambda: raftorch.Conv2d(4, 3, 1, rule="raf", rank=2),
    lambda: raftorch.Conv2d(4, 3, 1, rule="fa"),
], ids=["fa", "kp", "raf", "raf-python", "conv-raf", "conv-fa"])
@pytest.mark.parametrize("path", ["python", "cpp"])
def test_feedback_rules_refuse_create_graph(build, path):
    layer = build()
    x = torch.randn(2, 4, 1, 1) if isinstance(layer, nn.Conv2d) else torch.randn(2, 4)
    x.requires_grad_()
    with extension.disabled() if path == "python" else _nullctx():
        y = layer(x).pow(2).sum()
        with pytest.raises(RuntimeError, match="create_graph=True"):
            torch.autograd.grad(y, x, create_graph=True)


def test_direct_feedback_refuses_create_graph():
    net = draf_mlp()
    x = torch.randn(3, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(net(x).pow(2).sum(), x, create_graph=True)


# --------------------------------------------------------------------------- item 4: authors' options


@pytest.mark.parametrize("scale", ["maxstd", "rms", "std", "none"])
@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("center", [True, False])
def test_oja_scale_and_ddof_match_their_definition(scale, ddof, center):
    torch.manual_seed(0)
    e = torch.randn(9, 5) * torch.arange(1.0, 6.0) + 0.5
    P = orthonormal(2, 5)
    opts = OjaOptions(scale=scale, ddof=ddof, center=center, reduce="sum")
    got = oja_grad(P, e, e @ P.t(), opts)
    want = hand_oja(P, e, center=center, scale=scale, ddof=ddof if scale != "none" else 0, reduce="sum")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", ["maxstd", "rms", "std"])
@pytest.mark.parametrize("ddof", [0, 1])
def test_a_one_row_batch_gives_a_zero_oja_update(scale, ddof):
    lin = raftorch.Linear(4, 3, rule="raf", rank=2, oja_scale=scale, oja_ddof=ddof)
    lin(torch.randn(1, 4)).sum().backward()
    assert torch.equal(lin.P.grad, torch.zeros_like(lin.P.grad))


@pytest.mark.parametrize("rule", ["fa", "kp", "raf"])
def test_error_clamp_clamps_the_error_sent_down(rule):
    torch.manual_seed(0)
    kw = {"rank": 3} if rule == "raf" else {}
    lin = raftorch.Linear(5, 4, rule=rule, error_clamp=0.5, **kw)
    x = torch.randn(6, 5, requires_grad=True)
    g = torch.randn(6, 4) * 3
    lin(x).backward(g)
    B = lin.feedback_matrix()
    torch.testing.assert_close(x.grad, (g @ B.t()).clamp(-0.5, 0.5))
    torch.testing.assert_close(lin.weight.grad, g.t() @ x.detach())
    conv = raftorch.Conv2d(2, 3, 3, padding=1, rule=rule, error_clamp=0.5, **({"rank": 2} if kw else {}))
    xc = torch.randn(2, 2, 4, 4, requires_grad=True)
    gc = torch.randn(2, 3, 4, 4) * 3
    conv(xc).backward(gc)
    full = torch.nn.grad.conv2d_input(xc.shape, conv.feedback_matrix(), gc, padding=1)
    torch.testing.assert_close(xc.grad, full.clamp(-0.5, 0.5))


def test_bad_authors_options_are_one_clear_error():
    with pytest.raises(ValueError, match="oja_ddof"):
        raftorch.Linear(4, 3, rule="raf", rank=2, oja_ddof=2)
    with pytest.raises(ValueError, match="error_clamp"):
        raftorch.Linear(4, 3, rule="raf", rank=2, error_clamp=-1)
    with pytest.raises(ValueError, match="error_clamp"):
        raftorch.Linear(4, 3, rule="bp", error_clamp=1.0)
    with pytest.raises(ValueError, match="oja_scale"):
        raftorch.Linear(4, 3, rule="raf", rank=2, oja_scale="var")


@pytest.mark.parametrize("options", [{"oja_scale": "std"}, {"oja_ddof": 1}, {"error_clamp": 0.01},
                                     {"oja_scale": "std", "oja_ddof": 1, "error_clamp": 0.1}])
def test_the_fast_path_is_bypassed_for_the_authors_options_and_equals_python(ext, options):
    torch.manual_seed(0)
    lin = raftorch.Linear(6, 8, rule="raf", rank=3, **options)
    assert not RF._fast_path_fits(torch.randn(2, 6), lin.P, lin.oja, lin.error_clamp)
    x, g = torch.randn(10, 6), torch.randn(10, 8)
    res = {}
    for path in ("python", "cpp"):
        lin.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with extension.disabled() if path == "python" else _nullctx():
            lin(xi).backward(g)
        res[path] = [xi.grad, lin.P.grad, lin.Q.grad, lin.weight.grad]
    for a, b in zip(res["python"], res["cpp"]):
        assert torch.equal(a, b)
    P = lin.P.detach()
    o = lin.oja
    torch.testing.assert_close(res["cpp"][1].double(), hand_oja(P, g, scale=o.scale, ddof=o.ddof),
                               rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def ext():
    if extension.setting() == "0":
        pytest.skip("RAFTORCH_EXTENSION=0: the C++ fast path is turned off, nothing to compare it with")
    module = extension.get()
    assert module is not None, "the C++ fast path is on but did not build: nothing to compare"
    return module


def test_direct_paths_use_the_oja_options_and_error_clamp():
    """draf with oja_scale='std', oja_ddof=1: each path's P.grad is the hand formula on the
    source error; error_clamp clamps the delta each path delivers."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    net = raftorch.convert(net, "draf", 3, oja_scale="std", oja_ddof=1, error_clamp=0.01)
    path = net.direct_feedback.paths[0]
    x = torch.randn(7, 6)
    out = net(x)
    e = torch.randn(7, 5)
    out.backward(e)
    torch.testing.assert_close(path.P.grad.double(), hand_oja(path.P.detach(), e, scale="std", ddof=1),
                               rtol=1e-5, atol=1e-6)
    delta = (e @ path.feedback_matrix().t()).clamp(-0.01, 0.01)  # lands on the Tanh's output
    assert (e @ path.feedback_matrix().t()).abs().max() > 0.01  # the clamp is active
    with torch.no_grad():
        a = net[0](x)
    torch.testing.assert_close(net[0].weight.grad, (delta * (1 - a.tanh() ** 2)).t() @ x)


def test_train_passes_the_authors_options_and_the_authors_config_is_valid():
    from pathlib import Path

    from raftorch.training.config import TrainConfig, load_config_file

    root = Path(__file__).resolve().parents[1] / "configs" / "authors" / "mlp-cifar10.yaml"
    cfg = TrainConfig.from_dict(load_config_file(root), source=str(root))
    assert cfg.rule == "raf"
    assert cfg.rule_options.get("oja_ddof") == 1 and cfg.rule_options.get("oja_reduce") == "sum"
    assert cfg.rule_options.get("error_clamp") == 1.0
    import raftorch.training.loop as T  # the settings build and train (on digits, two steps)

    run = T.setup(cfg.replace(data="digits", val_fraction=0.0, device="cpu", threads=1, out=None))
    layers = [m for m in run.model.modules() if isinstance(m, raftorch.Linear)]
    assert all(m.error_clamp == 1.0 and m.oja.ddof == 1 and m.oja.reduce == "sum" for m in layers)
    assert layers[-1].oja.source == "target"
    T.train_epoch(run, progress=False, max_steps=2)
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


# --------------------------------------------------------------------------- item 5: floors, branches


def signals():
    torch.manual_seed(0)
    mixed = torch.randn(32, 5)
    mixed[:, 2] = 0.1  # exactly zero centred variance in one feature, nonzero in the others
    constant = torch.tensor([0.1, 0.3, 1 / 3, -0.7, 2.0]).expand(32, 5).contiguous()
    return {"mixed": mixed, "constant": constant}


@pytest.mark.parametrize("scale,path", [(s, p) for p in ("python", "cpp", "device-branch")
                                        for s in ("maxstd", "rms", "std") if (s, p) != ("std", "cpp")])
def test_the_zero_variance_floor_of_the_oja_scale(scale, path, monkeypatch):
    """A constant signal (centred variance 0, but 1 - 1/M rounding in the fused sums) gives
    exactly zero update; a signal with one constant feature gives the hand formula (std: that
    feature left out). ``std`` has no C++ case: it always runs in Python (tested above)."""
    if path == "device-branch":
        monkeypatch.setattr(RF, "HOST_SCALARS", False)
    torch.manual_seed(0)
    lin = raftorch.Linear(4, 5, rule="raf", rank=2, oja_scale=scale)
    for name, g in signals().items():
        lin.zero_grad(set_to_none=True)
        with extension.disabled() if path != "cpp" else _nullctx():
            lin(torch.randn(32, 4)).backward(g)
        got = lin.P.grad.double()
        if name == "constant":
            assert torch.equal(lin.P.grad, torch.zeros_like(lin.P.grad)), name
        else:
            P = lin.P.detach()
            if scale == "std":
                keep = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
                gc = g.double() - g.double().mean(0)
                var = gc.pow(2).mean(0)
                en = gc / var.clamp_min(1e-300).sqrt() * keep
                zn = en @ P.double().t()
                want = -(zn.t() @ en - zn.t() @ zn @ P.double()) / 32
            else:
                want = hand_oja(P, g, scale=scale)
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kw", [{}, {"scale": "rms", "reduce": "sum"}, {"center": False}, {"ddof": 1}],
                         ids=["default", "rms-sum", "uncentred", "ddof1"])
def test_the_device_branch_of_oja_grad_equals_the_host_branch(kw, monkeypatch):
    opts = OjaOptions(**kw)
    torch.manual_seed(0)
    P = orthonormal(3, 7)
    e = torch.randn(40, 7) * 3 + 1
    host = oja_grad(P, e, e @ P.t(), opts, mult=2.0)
    monkeypatch.setattr(RF, "HOST_SCALARS", False)
    device = oja_grad(P, e, e @ P.t(), opts, mult=2.0)
    # centred: explicit on the device, so equal up to float rounding
    torch.testing.assert_close(device, host, rtol=1e-5, atol=1e-5 * host.abs().max().item())
    torch.testing.assert_close(host.double(), 2.0 * hand_oja(P, e, center=opts.center, scale=opts.scale,
                                                             ddof=opts.ddof, reduce=opts.reduce),
                               rtol=1e-5, atol=1e-6)


def test_feedback_parameters_decay_like_the_weights_by_default():
    """feedback_weight_decay=None: Q and P are in a group with the forward weight decay."""
    from raftorch.training.config import TrainConfig
    from raftorch.training.loop import make_optimizer

    net = raf_mlp()
    cfg = TrainConfig(optimizer="sgd", lr=0.1, weight_decay=0.5, feedback_weight_decay=None)
    opt = make_optimizer(net, cfg, torch.device("cpu"))
    for p in net.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt.step()
    for n, p in net.named_parameters():
        if p.requires_grad:  # SGD with zero gradient: p <- p - lr * wd * p
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.5), msg=n)
    assert any(n.endswith(".P") for n, p in net.named_parameters() if p.requires_grad)


def test_oja_on_centred_targets():
    lin = raftorch.Linear(5, 4, rule="raf", rank=2, oja_source="target", oja_center=True,
                          oja_scale="none", oja_reduce="sum")
    net = nn.Sequential(lin)
    y = torch.tensor([0, 3, 1, 3, 2])
    out = net(torch.randn(5, 5))
    raftorch.feed_targets(net, y)
    out.sum().backward()
    t = F.one_hot(y, 4).double()
    torch.testing.assert_close(lin.P.grad.double(), hand_oja(lin.P.detach(), t, scale="none", reduce="sum"))


def test_fed_targets_are_used_once():
    """Targets fed for one backward are consumed by it; the next backward without
    feed_targets raises instead of reusing them."""
    lin = raftorch.Linear(5, 4, rule="raf", rank=2, oja_source="target")
    net = nn.Sequential(lin)
    raftorch.feed_targets(net, torch.tensor([0, 1, 2]))
    net(torch.randn(3, 5)).sum().backward()
    with pytest.raises(RuntimeError, match="feed_targets"):
        net(torch.randn(3, 5)).sum().backward()


def test_conv_oja_takes_every_pixel_as_a_sample():
    """grad_P of a Conv2d is the hand formula on the (N H W, C_out) matrix of the error map."""
    torch.manual_seed(0)
    conv = raftorch.Conv2d(3, 6, 3, stride=2, padding=1, rule="raf", rank=2)
    x = torch.randn(4, 3, 7, 7)
    y = conv(x)
    g = torch.randn_like(y) * torch.arange(1.0, 7.0)[:, None, None] + 0.3
    y.backward(g)
    e = g.permute(0, 2, 3, 1).reshape(-1, 6)
    assert e.shape[0] == 4 * 4 * 4
    torch.testing.assert_close(conv.P.grad.double(), hand_oja(conv.P.detach(), e), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- raftorch train --accumulate

ACC = dict(data="digits", model="mlp", model_options={"hidden": [16], "dropout": 0.0, "batchnorm": False},
           rule="bp", optimizer="sgd", lr=0.05, epochs=1, seed=3, device="cpu", threads=1)


def _final_weights(cfg):
    import raftorch.training.loop as T

    run = T.setup(T.TrainConfig.from_dict(cfg))
    T.train_epoch(run, progress=False)
    return {k: v.clone() for k, v in run.model.state_dict().items()}


def test_accumulating_k_micro_batches_is_one_step_on_the_k_times_larger_batch():
    """bp, no BatchNorm / dropout / augmentation: accumulate=2 of batch 64 takes the steps of
    batch 128 (the last, uneven group included: rows weighted, not batches)."""
    a = _final_weights(dict(ACC, batch_size=64, accumulate=2))
    b = _final_weights(dict(ACC, batch_size=128, accumulate=1))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_train_tells_the_layers_each_micro_batch_share(monkeypatch):
    import raftorch.training.loop as T

    seen = []
    real = raftorch.loss_scale

    def spy(model, factor):
        seen.append(factor)
        return real(model, factor)

    monkeypatch.setattr(T.raftorch, "loss_scale", spy)
    run = T.setup(T.TrainConfig.from_dict(dict(ACC, rule="raf", rank=4, batch_size=100, accumulate=3)))
    n = len(run.data.x_train)
    T.train_epoch(run, progress=False)
    sizes = [len(b) for b in torch.split(torch.arange(n), 100)]
    want = []
    for i in range(0, len(sizes), 3):
        group = sizes[i:i + 3]
        if len(group) > 1:
            want += [s / sum(group) for s in group]
    assert seen == want


def test_accumulate_must_be_a_positive_whole_number():
    from raftorch.training.config import TrainConfig

    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="accumulate"):
            TrainConfig.from_dict(dict(ACC, accumulate=bad))


@pytest.mark.parametrize("path", ["python", "cpp", "device-branch"])
def test_float32_oja_stays_exact_when_the_mean_dominates_at_many_rows(path, monkeypatch):
    """100k rows with mean/std = 20: the rank-one centring of z^T e cancels its digits (3% error
    in Python, 12% on the fused C++ pass before); the mean-dominated signal is centred
    explicitly instead."""
    if path == "device-branch":
        monkeypatch.setattr(RF, "HOST_SCALARS", False)
    torch.manual_seed(0)
    lin = raftorch.Linear(4, 16, rule="raf", rank=4)
    g = torch.randn(100_000, 16) + 20.0
    with extension.disabled() if path != "cpp" else _nullctx():
        lin(torch.randn(100_000, 4)).backward(g)
    want = hand_oja(lin.P.detach(), g)
    assert ((lin.P.grad.double() - want).norm() / want.norm()).item() < 1e-4


# --------------------------------------------------------------------------- DDP: global Oja statistics


@pytest.mark.parametrize("rule", [["--rule", "raf", "--layer-option", "out={oja_source: target}"],
                                  ["--rule", "raf", "--rule-option", "oja_scale=std", "--rule-option", "oja_ddof=1"],
                                  ["--rule", "raf", "--rule-option", "oja_scale=none"],
                                  ["--rule", "draf"]], ids=["raf-target", "raf-std", "raf-none", "draf"])
@pytest.mark.slow
def test_two_processes_match_one_for_raf_and_draf(tmp_path, rule):
    """torchrun, 2 gloo processes, each half of every global batch of 16: with Oja's mean and
    scale all-reduced (raftorch.sync_oja, called by train), the weights, P included, equal one
    process's on the same global batches (rows of 16 and 8 alike)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import raftorch.training.cli as train_cli
    import raftorch.training.loop as T
    from raftorch.training.checkpoint import load_checkpoint

    torchrun = Path(sys.executable).with_name("torchrun")
    common = ["--data", "digits", "--model", "mlp", "--model-option", "hidden=[32, 16]", *rule,
              "--rank", "4", "--batch-size", "16", "--epochs", "1", "--lr", "0.05", "--seed", "1",
              "--optimizer", "sgd",  # not Adam: its steps would not see a gradient's scale
              "--device", "cpu", "--threads", "1", "--no-progress", "--train-size", "400"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "raftorch", "train",
                           *common, "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import argparse

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    T.train(train_cli.config_from_args(parser.parse_args(common + ["--out", str(tmp_path / "one")])), progress=False)
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")["model"]
    one = load_checkpoint(tmp_path / "one" / "checkpoint.pt")["model"]
    assert ddp.keys() == one.keys() and any(k.endswith(".P") for k in one)
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], rtol=1e-4, atol=1e-5, msg=k)


def test_sync_bn_is_refused_on_cpu_and_sync_oja_needs_a_process_group():
    from raftorch.training.config import TrainConfig

    assert TrainConfig.from_dict(dict(ACC, sync_bn=True)).sync_bn is True
    with pytest.raises(ValueError, match="torch.distributed"):
        raftorch.sync_oja(raf_mlp())


def test_bf16_autocast_P_grad_is_not_rounded_to_bfloat16():
    """Under bf16 autocast the Oja statistics run in float32 on the bf16 signal and the float32
    P receives them without a bf16 rounding on the way."""
    torch.manual_seed(0)
    lin = raftorch.Linear(6, 8, rule="raf", rank=3)
    g = torch.randn(64, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(torch.randn(64, 6))
    y.float().backward(g)
    want = hand_oja(lin.P.detach().bfloat16().float(), g.bfloat16().float())
    assert lin.P.grad.dtype == torch.float32
    torch.testing.assert_close(lin.P.grad.double(), want, rtol=1e-5, atol=1e-6)


def test_fp16_training_gives_P_the_step_of_float32_training():
    """raftorch train --fp16: GradScaler's scale (65536) is told to the layers, so after
    unscaling P moves as in a float32 run (without it, by 1/65536 of that)."""
    import raftorch.training.loop as T

    cfg = dict(ACC, rule="raf", rank=4, batch_size=64, lr=0.5)
    runs = {}
    for name, extra in (("fp32", {}), ("fp16", {"fp16": True})):
        run = T.setup(T.TrainConfig.from_dict(dict(cfg, **extra)))
        P0 = {n: p.detach().clone() for n, p in run.model.named_parameters() if n.endswith(".P")}
        T.train_epoch(run, progress=False, max_steps=5)
        runs[name] = (P0, {n: p.detach().clone() for n, p in run.model.named_parameters() if n in P0})
        if name == "fp16":
            assert run.scaler is not None and run.scaler.get_scale() > 1
    (P0, P32), (_, P16) = runs["fp32"], runs["fp16"]
    for n in P0:
        moved = (P32[n] - P0[n]).norm()
        assert moved > 1e-3
        assert (P16[n] - P32[n]).norm() < 0.1 * moved, n
    with pytest.raises(ValueError, match="choose one"):
        T.TrainConfig.from_dict(dict(cfg, fp16=True, bf16=True))
