"""The C++ fast path (raftorch._ext) computes exactly what the Python path computes."""
import warnings

import pytest
import torch

import raftorch
from raftorch import _ext
from raftorch import functional as RF


def python_path(x, lin):
    return RF.LinearLowRankFeedback.apply(x, lin.weight, lin.bias, lin.Q, lin.P, lin.oja, None)


def cpp_path(x, lin):
    return RF.linear_lowrank(x, lin.weight, lin.bias, lin.Q, lin.P, lin.oja)


def run(path, lin, x, w, x_grad):
    lin.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x_grad)
    y = path(x, lin)
    (y * w).sum().backward()
    out = {"y": y.detach(), "input": x.grad}
    out.update({n: p.grad for n, p in lin.named_parameters()})
    return out


@pytest.fixture(scope="module")
def ext():
    """The built fast path; a test that needs it fails (never skips) where it is missing."""
    module = _ext.get()
    assert module is not None, (
        "the C++ fast path is off (RAFTORCH_EXTENSION=0) or did not build (see the "
        "RaftorchExtensionWarning): nothing to compare")
    return module


OJA_VARIANTS = [
    {},
    dict(oja_center=False),
    dict(oja_scale="rms"),
    dict(oja_scale="none", oja_reduce="sum"),
    dict(oja_center=False, oja_scale="none"),
    dict(oja_reduce="sum"),
]


@pytest.mark.parametrize("rule,options", [("fa-lowrank", {}), ("raf-q", {})]
                         + [("raf", o) for o in OJA_VARIANTS])
@pytest.mark.parametrize("shape,bias,x_grad", [((33, 12), True, True), ((4, 7, 12), False, True),
                                                ((33, 12), True, False)])
def test_cpp_path_equals_python_path(ext, rule, options, shape, bias, x_grad):
    torch.manual_seed(0)
    lin = raftorch.Linear(12, 9, bias=bias, rule=rule, rank=4, **options)
    x = torch.randn(*shape)
    w = torch.randn(*shape[:-1], 9)
    ref, got = run(python_path, lin, x, w, x_grad), run(cpp_path, lin, x, w, x_grad)
    assert set(ref) == set(got)
    for k in ref:
        if ref[k] is None:
            assert got[k] is None, k
        else:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


def test_cpp_path_in_double_precision_matches_the_hand_formula(ext):
    """float64 takes the generic (non-fused) statistics: check Oja's rule by its definition."""
    torch.manual_seed(1)
    lin = raftorch.Linear(6, 5, rule="raf", rank=2).double()
    x = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    e = torch.randn(40, 5, dtype=torch.float64) * torch.arange(1.0, 6.0, dtype=torch.float64)
    cpp_path(x, lin).backward(e)
    ec = e - e.mean(0)
    en = ec / ec.var(0, unbiased=False).max().sqrt()
    P = lin.P.detach()
    zn = en @ P.t()
    torch.testing.assert_close(lin.P.grad, -(zn.t() @ en - zn.t() @ zn @ P) / 40)
    torch.testing.assert_close(lin.Q.grad, x.detach().t() @ (e @ P.t()))
    torch.testing.assert_close(x.grad, e @ P.t() @ lin.Q.detach().t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_error_gives_no_oja_update(ext, dtype):
    """A signal that is the same on every row has no direction: zero update, not 0/0."""
    lin = raftorch.Linear(6, 5, rule="raf", rank=2).to(dtype)
    x = torch.randn(8, 6, dtype=dtype)
    cpp_path(x, lin).backward(torch.ones(8, 5, dtype=dtype) * 3.0)
    assert torch.isfinite(lin.P.grad).all()
    assert lin.P.grad.abs().max() == 0


def test_layers_take_the_fast_path_on_cpu(ext):
    lin = raftorch.Linear(5, 4, rule="raf", rank=2)
    y = lin(torch.randn(3, 5, requires_grad=True))
    assert "LowRankLinear" in y.grad_fn.name()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the Python path
        y = lin(torch.randn(3, 5, requires_grad=True))
    assert y.grad_fn.name() == "LinearLowRankFeedbackBackward"
    assert y.dtype == torch.bfloat16


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension as cpp

    def broken(**kwargs):
        raise OSError("no compiler here")

    monkeypatch.setattr(cpp, "load", broken)
    monkeypatch.setattr(_ext, "_state", {})
    monkeypatch.setenv("RAFTORCH_EXTENSION", "auto")
    with pytest.warns(_ext.RaftorchExtensionWarning, match="no compiler here"):
        assert _ext.get() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ext.get() is None  # decided once
        lin = raftorch.Linear(5, 4, rule="raf", rank=2)
        y = lin(torch.randn(3, 5, requires_grad=True))
    assert y.grad_fn.name() == "LinearLowRankFeedbackBackward"

    monkeypatch.setattr(_ext, "_state", {})
    monkeypatch.setenv("RAFTORCH_EXTENSION", "1")
    with pytest.raises(RuntimeError, match="RAFTORCH_EXTENSION=1 but the C\\+\\+ fast path failed"):
        _ext.get()

    monkeypatch.setattr(_ext, "_state", {})
    monkeypatch.setenv("RAFTORCH_EXTENSION", "fast")
    with pytest.raises(ValueError, match="RAFTORCH_EXTENSION='fast' is not valid"):
        _ext.get()

    monkeypatch.setattr(_ext, "_state", {})
    monkeypatch.setenv("RAFTORCH_EXTENSION", "0")
    assert _ext.get() is None


def test_fused_column_statistics_stay_accurate_over_many_rows(ext):
    """The bias gradient comes from the fused pass on the fast path: over 20,000 token rows with
    a large common offset it must match a float64 sum as closely as torch.sum does."""
    torch.manual_seed(2)
    lin = raftorch.Linear(8, 6, rule="raf", rank=3)
    x = torch.randn(20, 1000, 8)
    g = torch.randn(20, 1000, 6) + 100.0
    cpp_path(x, lin).backward(g)
    exact = g.double().sum((0, 1))
    torch_err = (g.sum((0, 1)).double() - exact).abs().max()
    err = (lin.bias.grad.double() - exact).abs().max()
    assert err <= max(2 * torch_err, 1e-6 * exact.abs().max())
