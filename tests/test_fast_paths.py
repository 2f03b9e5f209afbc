"""The fast steps of the low-rank backward (``grad_Q = P grad_W``; for convolutions ``z = P g``
as a batched product, the input gradient as a flipped forward convolution, Oja's statistics from
the ``(N, C, H W)`` maps) against the definitions,
computed independently in float64 with plain autograd and the hand formula of Oja's rule."""
import pytest
import torch
import torch.nn.functional as F

import raftorch
import raftorch.functional as RF

pytestmark = pytest.mark.usefixtures("one_thread")

GEOMETRIES = [
    dict(stride=1, padding=1, dilation=1, groups=1),
    dict(stride=2, padding=0, dilation=1, groups=1),
    dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=1),
    dict(stride=1, padding=1, dilation=1, groups=2),
    dict(stride=1, padding=(1, 2), dilation=(2, 1), groups=2),  # flipped forward conv, dilated
    dict(stride=1, padding=3, dilation=1, groups=1),  # padding beyond the kernel: the fallback
]
OJA = [
    dict(),
    dict(oja_scale="rms"),
    dict(oja_scale="none", oja_center=False, oja_reduce="sum"),
    dict(oja_scale="std", oja_ddof=1),
]


def hand_oja(P, e, center=True, scale="maxstd", ddof=0, reduce="mean"):
    """-(z_n^T e_n - z_n^T z_n P) / reduce with e_n formed explicitly (float64)."""
    M = e.shape[0]
    ec = e - e.mean(0) if center else e
    var = ec.pow(2).sum(0) / (M - ddof)
    div = {"maxstd": var.max().sqrt(), "rms": var.mean().sqrt(), "std": var.sqrt(), "none": 1.0}[scale]
    en = ec / div
    zn = en @ P.t()
    grad = -(zn.t() @ en - zn.t() @ zn @ P)
    return grad / M if reduce == "mean" else grad


def definitions(conv, x, g):
    """(grad_input, grad_W, grad_b, grad_Q, grad_P) of the low-rank rule from their
    definitions, in float64: z = P g per pixel, grad_input and grad_Q the input and weight
    gradients of the virtual convolution x -> conv(x, Q) for output gradient z."""
    geo = dict(stride=conv.geometry.stride, padding=conv.geometry.padding,
               dilation=conv.geometry.dilation, groups=conv.groups)
    x, g = x.double(), g.double()
    W, b = conv.weight.detach().double().requires_grad_(), conv.bias.detach().double().requires_grad_()
    Q, P = conv.Q.detach().double().requires_grad_(), conv.P.detach().double()
    F.conv2d(x, W, b, **geo).backward(g)
    z = torch.einsum("ko,nohw->nkhw", P, g)
    xv = x.clone().requires_grad_()
    F.conv2d(xv, Q, None, **geo).backward(z)
    o = conv.oja
    e = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
    gP = hand_oja(P, e, o.center, o.scale, o.ddof, o.reduce)
    return xv.grad, W.grad, b.grad, Q.grad, gP


def run(conv, x, g, freeze_weight=False):
    conv.weight.requires_grad_(not freeze_weight)
    x = x.clone().requires_grad_()
    conv(x).backward(g)
    return x.grad, conv.weight.grad, conv.bias.grad, conv.Q.grad, conv.P.grad


@pytest.mark.parametrize("geom", GEOMETRIES, ids=str)
@pytest.mark.parametrize("oja", OJA, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("freeze_weight", [False, True], ids=["W learns", "W frozen"])
@pytest.mark.parametrize("rank", [2, 6], ids=["r=2: z = P g", "r=6 (full): kernel P^T Q and Gram"])
def test_conv_lowrank_backward_equals_its_definitions(geom, oja, layout, freeze_weight, rank):
    torch.manual_seed(0)
    conv = raftorch.Conv2d(4, 6, 3, rule="raf", rank=rank, **geom, **oja)
    with torch.no_grad():  # P off orthonormal, as during training: at full rank an orthogonal
        conv.P.add_(0.3 * torch.randn_like(conv.P))  # P has Oja's update exactly zero
    x = torch.randn(3, 4, 9, 8)
    y = conv(x)
    # channels with different scales and a mean, so centring and the scales matter
    g = torch.randn_like(y) * torch.linspace(0.5, 2.0, 6)[:, None, None] + 0.2
    if layout == "channels_last":
        x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    got = run(conv, x, g, freeze_weight)
    want = definitions(conv, x, g)
    for name, a, b in zip(("input", "weight", "bias", "Q", "P"), got, want):
        if name == "weight" and freeze_weight:
            assert a is None
            continue
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=name)


def test_off_host_scalars_give_the_same_conv_update(monkeypatch):
    """The device branch (no host reads: centred signals take the explicit path) agrees."""
    torch.manual_seed(1)
    conv = raftorch.Conv2d(3, 5, 3, padding=1, rule="raf", rank=2)
    x = torch.randn(2, 3, 6, 6)
    g = torch.randn(2, 5, 6, 6) + 0.1
    host = run(conv, x, g)
    conv.zero_grad()
    monkeypatch.setattr(RF, "HOST_SCALARS", False)
    device = run(conv, x, g)
    for a, b in zip(host, device):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_which_backward_a_conv_takes_follows_its_multiply_adds_per_pixel():
    """The kernel P^T Q and the Gram matrix take over exactly where they cost less per pixel."""
    def combined(c_in, c_out, k, r, need_P=True):
        return RF._combine_kernel(torch.empty(r, c_in, k, k), torch.empty(r, c_out), need_P)
    # 3x3, 64 -> 64: factored r(576 + 64 + 64) vs 64 * 576 + 64^2 = 40960: r = 59 is the edge
    assert not combined(64, 64, 3, 58) and combined(64, 64, 3, 59) and combined(64, 64, 3, 64)
    assert not combined(64, 64, 3, 10) and not combined(1, 16, 3, 9)  # first conv: 9 <= 9 channels
    assert combined(64, 64, 3, 58, need_P=False) and not combined(64, 64, 3, 57, need_P=False)


@pytest.mark.parametrize("rank", [2, 4], ids=["factored", "full rank: Gram"])
def test_a_dominating_mean_takes_the_explicit_path_and_stays_accurate(rank):
    """mean / std = 50 per channel: the rank-one centring would cancel digits; the result
    still matches the float64 hand formula."""
    torch.manual_seed(2)
    conv = raftorch.Conv2d(3, 4, 3, padding=1, rule="raf", rank=rank)
    with torch.no_grad():
        conv.P.add_(0.3 * torch.randn_like(conv.P))
    x = torch.randn(4, 3, 16, 16)
    g = torch.randn(4, 4, 16, 16) + 50.0
    got = run(conv, x, g)
    want = definitions(conv, x, g)
    torch.testing.assert_close(got[4].double(), want[4], rtol=1e-3, atol=1e-6)


def test_conv1d_lowrank_backward_equals_its_definitions():
    torch.manual_seed(3)
    conv = raftorch.Conv1d(4, 6, 3, padding=1, rule="raf", rank=3)
    x = torch.randn(2, 4, 11, requires_grad=True)
    y = conv(x)
    g = torch.randn_like(y)
    y.backward(g)
    x64, g64 = x.detach().double(), g.double()
    W = conv.weight.detach().double().requires_grad_()
    Q, P = conv.Q.detach().double().requires_grad_(), conv.P.detach().double()
    F.conv1d(x64, W, None, padding=1).backward(g64)
    z = torch.einsum("ko,nol->nkl", P, g64)
    xv = x64.clone().requires_grad_()
    F.conv1d(xv, Q, None, padding=1).backward(z)
    e = g64.permute(0, 2, 1).reshape(-1, 6)
    for a, b in ((x.grad, xv.grad), (conv.weight.grad, W.grad), (conv.Q.grad, Q.grad),
                 (conv.P.grad, hand_oja(P, e))):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["cpp", "python"])
@pytest.mark.parametrize("freeze_weight", [False, True], ids=["W learns", "W frozen"])
@pytest.mark.parametrize("shape", [(4, 7), (3, 5, 7)], ids=["rows < n_out", "tokens: rows > n_out"])
def test_linear_Q_grad_is_x_T_z_whether_or_not_W_learns(monkeypatch, path, freeze_weight, shape):
    """grad_Q = x^T z, from (P grad_W)^T when W learns and there are more rows than outputs,
    from the rows otherwise (fewer rows, or W frozen),
    on the C++ path and the Python path; the other gradients are unchanged."""
    if path == "python":
        monkeypatch.setenv("RAFTORCH_EXTENSION", "0")
        monkeypatch.setattr(raftorch.extension, "_state", {})
    torch.manual_seed(4)
    lin = raftorch.Linear(7, 6, rule="raf", rank=3)
    lin.weight.requires_grad_(not freeze_weight)
    x = torch.randn(*shape, requires_grad=True)
    y = lin(x)
    g = torch.randn_like(y)
    y.backward(g)
    x64, g64 = x.detach().double().reshape(-1, 7), g.double().reshape(-1, 6)
    P, Q = lin.P.detach().double(), lin.Q.detach().double()
    z = g64 @ P.t()
    torch.testing.assert_close(lin.Q.grad.double(), x64.t() @ z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double().reshape(-1, 7), z @ Q.t(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lin.P.grad.double(), hand_oja(P, g64), rtol=1e-4, atol=1e-6)
    if freeze_weight:
        assert lin.weight.grad is None
    else:
        torch.testing.assert_close(lin.weight.grad.double(), g64.t() @ x64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 5, 9), (3, 9, 5)], ids=["long maps: per-sample", "short maps: one product"])
def test_sums_of_per_sample_products_of_maps(shape):
    g3, z3 = torch.randn(*shape), torch.randn(shape[0], 4, shape[2])
    gram = sum(g.double() @ g.double().t() for g in g3)
    cross = sum(z.double() @ g.double().t() for z, g in zip(z3, g3))
    torch.testing.assert_close(RF.cross_sum(g3, g3).double(), gram, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(RF.cross_sum(z3, g3).double(), cross, rtol=1e-5, atol=1e-5)
