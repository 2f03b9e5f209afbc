"""The C++ fast path (raftorch.extension) computes exactly what the Python path computes."""
import warnings

import pytest
import torch

import raftorch
from raftorch import extension
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
    """The built fast path. Turned off (``RAFTORCH_EXTENSION=0``, as on a machine without a
    compiler) the tests that compare against it skip; turned on, a test that needs it fails
    (never skips) where it did not build."""
    if extension.setting() == "0":
        pytest.skip("RAFTORCH_EXTENSION=0: the C++ fast path is turned off, nothing to compare it with")
    module = extension.get()
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
            # float32 rounding scales with the size of the summed terms, not of each entry
            atol = 1e-6 * max(1.0, ref[k].abs().max().item())
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=atol, msg=k)


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
    monkeypatch.setattr(extension, "_state", {})
    monkeypatch.setenv("RAFTORCH_EXTENSION", "auto")
    with pytest.warns(extension.RaftorchExtensionWarning, match="no compiler here"):
        assert extension.get() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert extension.get() is None  # decided once
        lin = raftorch.Linear(5, 4, rule="raf", rank=2)
        y = lin(torch.randn(3, 5, requires_grad=True))
    assert y.grad_fn.name() == "LinearLowRankFeedbackBackward"

    monkeypatch.setattr(extension, "_state", {})
    monkeypatch.setenv("RAFTORCH_EXTENSION", "1")
    with pytest.raises(RuntimeError, match="RAFTORCH_EXTENSION=1 but the C\\+\\+ fast path failed"):
        extension.get()

    monkeypatch.setattr(extension, "_state", {})
    monkeypatch.setenv("RAFTORCH_EXTENSION", "fast")
    with pytest.raises(ValueError, match="RAFTORCH_EXTENSION='fast' is not valid"):
        extension.get()

    monkeypatch.setattr(extension, "_state", {})
    monkeypatch.setenv("RAFTORCH_EXTENSION", "0")
    assert extension.get() is None


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
    ulp = torch.finfo(torch.float32).eps * exact.abs().max()  # the float32 result's own rounding
    assert err <= max(2 * torch_err, 2 * ulp), (err, torch_err)


def test_a_compiler_without_openmp_gets_a_build_without_it(monkeypatch):
    import torch.utils.cpp_extension as cpp

    tried = []

    def load(**kwargs):
        tried.append(kwargs["extra_cflags"])
        if "-fopenmp" in kwargs["extra_cflags"]:
            raise OSError("clang: error: unsupported option '-fopenmp'")
        return "module"

    monkeypatch.setattr(cpp, "load", load)
    monkeypatch.setattr(extension, "_state", {})
    monkeypatch.setattr(torch.backends.openmp, "is_available", lambda: True)
    monkeypatch.setenv("RAFTORCH_EXTENSION", "1")
    assert extension.get() == "module"
    assert tried == [["-O3", "-fopenmp"], ["-O3"]]


def float64_reference(lin, x, g):
    """Gradients of the layer in float64 on the Python path (the definition, to float64)."""
    import copy

    lin64 = copy.deepcopy(lin).double()
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    with extension.disabled():
        RF.linear_lowrank(x64, lin64.weight, lin64.bias, lin64.Q, lin64.P, lin64.oja).backward(g.double())
    out = {n: p.grad for n, p in lin64.named_parameters()}
    out["input"] = x64.grad
    return out


# sizes that reach every branch of the fused pass: several threads' row ranges whose ends are
# not multiples of the four-row block, more than 256 rows per thread (the float-to-double
# flush of the column sums), widths with a lane remainder and above the 256-column tile,
# odd ranks and rank 1, a single row, column and rank, and the benchmark's hidden layer
FUSED_CASES = [(700, 300, 37, 5), (130, 9, 300, 1), (67, 16, 8, 3), (5, 12, 9, 4), (256, 512, 10, 10),
               (1, 1, 1, 1), (3, 2, 3, 2)]


@pytest.mark.parametrize("rows,n_in,n_out,rank", FUSED_CASES)
@pytest.mark.parametrize("rule", ["fa-lowrank", "raf-q", "raf"])
def test_fused_pass_matches_float64_and_the_python_path(ext, rows, n_in, n_out, rank, rule):
    torch.manual_seed(rows + n_in)
    lin = raftorch.Linear(n_in, n_out, rule=rule, rank=rank)
    x = torch.randn(rows, n_in)
    g = torch.randn(rows, n_out) * torch.linspace(0.5, 2.0, n_out) + 0.3
    ref = run(python_path, lin, x, g, True)
    got = run(cpp_path, lin, x, g, True)
    exact = float64_reference(lin, x.requires_grad_(True), g)
    for k, want in exact.items():
        if want is None:  # a fixed feedback parameter
            assert got[k] is None and ref[k] is None, k
            continue
        # float32 rounding, relative to the largest entry; the fast path may be no worse than
        # twice the Python path's error
        scale = want.abs().max().item()
        err_cpp = (got[k].double() - want).abs().max().item()
        err_py = (ref[k].double() - want).abs().max().item()
        assert err_cpp <= max(2 * err_py, 1e-6 * scale), (k, err_cpp, err_py)


def test_fused_pass_gives_the_same_result_on_one_and_two_threads(ext):
    torch.manual_seed(3)
    lin = raftorch.Linear(300, 37, rule="raf", rank=5)
    x, g = torch.randn(700, 300), torch.randn(700, 37)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(cpp_path, lin, x, g, True)
        torch.set_num_threads(2)
        two = run(cpp_path, lin, x, g, True)
    finally:
        torch.set_num_threads(threads)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-5 * one[k].abs().max().item())


@pytest.mark.parametrize("case", ["rank above the fused limit", "strided input", "strided P"])
def test_layouts_off_the_fused_pass_still_match(ext, case):
    """Ranks over 64 and non-contiguous tensors take the generic C++ steps: same results."""
    torch.manual_seed(4)
    rank = 70 if case == "rank above the fused limit" else 6
    lin = raftorch.Linear(80, 75, rule="raf", rank=rank)
    x = torch.randn(90, 80)
    if case == "strided input":
        x = torch.randn(80, 90).t()
    if case == "strided P":
        with torch.no_grad():
            lin.P = torch.nn.Parameter(lin.P.detach().t().contiguous().t())
        assert not lin.P.is_contiguous()
    g = torch.randn(90, 75)
    ref, got = run(python_path, lin, x, g, True), run(cpp_path, lin, x, g, True)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5 * ref[k].abs().max().item(), msg=k)


def test_the_cli_announces_a_compile_and_stays_quiet_on_a_load(monkeypatch, capsys):
    """The first use on a machine compiles for ~30 s: the command line says so on stderr, once;
    loading the built library from the cache (every later run) prints nothing."""
    import torch.utils.cpp_extension as cpp

    from raftorch.cli import _show_progress_messages

    built = object()
    monkeypatch.setattr(cpp, "load", lambda **kwargs: built)
    monkeypatch.setenv("RAFTORCH_EXTENSION", "auto")
    for compiles, count in ((True, 1), (False, 0)):
        monkeypatch.setattr(extension, "_state", {})
        monkeypatch.setattr(extension, "will_compile", lambda: compiles)
        _show_progress_messages()
        _show_progress_messages()  # a second call adds no second handler
        assert extension.get() is built
        assert extension.get() is built  # decided once
        err = capsys.readouterr().err
        assert err.count("raftorch: compiling raftorch's C++ fast path (first use on this machine") == count, err


def test_it_compiles_only_without_a_library_as_new_as_its_source(monkeypatch, tmp_path):
    import os

    from torch.utils.cpp_extension import LIB_EXT

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extension.will_compile()  # an empty cache
    library = tmp_path / extension._NAME / f"{extension._NAME}{LIB_EXT}"
    library.parent.mkdir(exist_ok=True)
    library.write_bytes(b"")
    source_time = extension._SOURCE.stat().st_mtime
    os.utime(library, (source_time + 10, source_time + 10))
    assert not extension.will_compile()
    os.utime(library, (source_time - 10, source_time - 10))  # the source changed since the build
    assert extension.will_compile()
