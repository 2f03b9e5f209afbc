"""An empty batch (0 rows: the last shard of a small DDP batch, a filtered batch) gives exactly
zero feedback updates on every path: the forward returns PyTorch's empty output, the backward
gives an empty input gradient, the weight and bias gradients of plain PyTorch (zeros), every
feedback gradient exactly zero (no NaN, no error), and an Adam step changes nothing."""
import contextlib
import itertools

import pytest
import torch
from torch import nn

import raftorch
from raftorch import _ext

pytestmark = pytest.mark.usefixtures("one_thread")

RULES = ["fa", "kp", "fa-lowrank", "raf-q", "raf"]
PATHS = ["cpp", "python"]
# every Oja option: scale x center x reduce x ddof
OJA_ALL = [dict(oja_scale=s, oja_center=c, oja_reduce=r, oja_ddof=d)
           for s, c, r, d in itertools.product(("maxstd", "rms", "std", "none"), (True, False),
                                               ("mean", "sum"), (0, 1))]
OJA_IDS = [f"{o['oja_scale']}-c{int(o['oja_center'])}-{o['oja_reduce']}-ddof{o['oja_ddof']}" for o in OJA_ALL]
# the rules and, for raf, a few Oja settings (each scale, centring on and off, both ddofs)
RULE_CASES = ([(r, {}) for r in RULES]
              + [("raf", dict(oja_scale=s, oja_center=c, oja_ddof=d))
                 for s, c, d in [("maxstd", False, 1), ("rms", True, 1), ("std", True, 0),
                                 ("std", False, 1), ("none", True, 0), ("none", False, 1)]])
RULE_IDS = [r + "".join(f"-{v}" for v in o.values()) for r, o in RULE_CASES]


@contextlib.contextmanager
def path_of(path):
    """The C++ fast path (the default; it must be built) or the Python path."""
    if path == "python":
        with _ext.disabled():
            yield
        return
    assert _ext.get() is not None, "the C++ fast path is off or did not build"
    yield


def _call(module, x):
    out = module(x, x, x) if isinstance(module, nn.MultiheadAttention) else module(x)
    return out[0] if isinstance(out, tuple) else out


def check_empty_batch(plain: nn.Module, ours: nn.Module, x: torch.Tensor, targets=None):
    """``ours`` (a converted copy of ``plain``) on the empty batch ``x``: exact checks against
    ``plain`` and zero feedback gradients, then an Adam step that leaves every parameter as it
    was (its gradients are all zero)."""
    assert x.shape[0] == 0
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    xr = x.clone().requires_grad_(True)
    xo = x.clone().requires_grad_(True)
    y_ref = _call(plain, xr)
    y = _call(ours, xo)
    assert y.shape == y_ref.shape and torch.equal(y, y_ref)
    if targets is not None:
        raftorch.feed_targets(ours, targets)
    y_ref.sum().backward()
    y.sum().backward()
    assert xo.grad is not None and xo.grad.shape == x.shape and torch.equal(xo.grad, xr.grad)
    ref = dict(plain.named_parameters())
    feedback = 0
    for name, p in ours.named_parameters():
        if name in ref:
            assert torch.equal(p.grad, ref[name].grad), name  # zeros, as plain PyTorch
        elif p.requires_grad:
            feedback += 1
            assert p.grad is not None, name
            assert torch.equal(p.grad, torch.zeros_like(p)), (name, p.grad)
        else:
            assert p.grad is None, name
    opt = torch.optim.Adam(ours.parameters(), lr=0.1, weight_decay=0)
    opt.step()
    for name, p in ours.named_parameters():
        assert torch.isfinite(p).all(), name
        assert torch.equal(p.detach(), before[name]), name
    return feedback


def convert(plain, rule, rank, **options):
    ours = raftorch.convert(plain, rule, rank=None if rule in ("fa", "kp", "dfa") else rank, **options)
    assert ours is not plain
    return ours


# --------------------------------------------------------------------------- Linear


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(0, 6), (0, 3, 6)], ids=["rows", "tokens"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rule", RULES)
def test_linear_rules(rule, bias, shape, path):
    torch.manual_seed(0)
    plain = nn.Linear(6, 5, bias=bias)
    with path_of(path):
        check_empty_batch(plain, convert(plain, rule, 3), torch.randn(shape))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(0, 6), (0, 3, 6)], ids=["rows", "tokens"])
@pytest.mark.parametrize("options", OJA_ALL, ids=OJA_IDS)
def test_linear_oja_options(options, shape, path):
    torch.manual_seed(0)
    plain = nn.Linear(6, 5)
    with path_of(path):
        assert check_empty_batch(plain, convert(plain, "raf", 3, **options), torch.randn(shape)) == 2


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_loss_scale_and_double(dtype, path):
    torch.manual_seed(0)
    plain = nn.Linear(6, 5, dtype=dtype)
    ours = convert(plain, "raf", 3)
    with path_of(path), raftorch.loss_scale(ours, 4.0):
        check_empty_batch(plain, ours, torch.randn(0, 6, dtype=dtype))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["index", "float"])
@pytest.mark.parametrize("scale,center", [("maxstd", True), ("rms", False), ("std", True), ("none", False)])
def test_linear_oja_on_targets(scale, center, kind, path):
    torch.manual_seed(0)
    plain = nn.Linear(6, 5)
    ours = raftorch.Linear(6, 5, rule="raf", rank=3, oja_source="target", oja_scale=scale, oja_center=center)
    with torch.no_grad():
        ours.weight.copy_(plain.weight)
        ours.bias.copy_(plain.bias)
    targets = torch.zeros(0, dtype=torch.long) if kind == "index" else torch.zeros(0, 5)
    with path_of(path):
        assert check_empty_batch(plain, ours, torch.randn(0, 6), targets=targets) == 2


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rule", RULES)
def test_converted_mlp_then_a_full_batch(rule, path):
    """The issue's case: a converted MLP, an empty batch and an Adam step, then an ordinary
    batch still trains (finite, moving parameters)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    ours = convert(plain, rule, 4)
    with path_of(path):
        check_empty_batch(plain, ours, torch.randn(0, 8))
        ours.zero_grad(set_to_none=True)
        opt = torch.optim.Adam(ours.parameters(), lr=0.01)
        nn.functional.cross_entropy(ours(torch.randn(7, 8)), torch.randint(0, 4, (7,))).backward()
        opt.step()
        assert all(torch.isfinite(p).all() for p in ours.parameters())


# --------------------------------------------------------------------------- convolutions


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("rule,options", RULE_CASES, ids=RULE_IDS)
def test_conv2d(rule, options, layout, path):
    torch.manual_seed(0)
    plain = nn.Conv2d(3, 6, 3, padding=1)
    x = torch.randn(0, 3, 5, 5)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with path_of(path):
        check_empty_batch(plain, convert(plain, rule, 2, **options), x)


@pytest.mark.parametrize("options", OJA_ALL, ids=OJA_IDS)
def test_conv2d_oja_options(options):
    torch.manual_seed(0)
    plain = nn.Conv2d(3, 6, 3, stride=2, groups=3)
    assert check_empty_batch(plain, convert(plain, "raf", 3, **options), torch.randn(0, 3, 7, 7)) == 2


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rule,options", RULE_CASES, ids=RULE_IDS)
def test_conv1d(rule, options, path):
    torch.manual_seed(0)
    plain = nn.Conv1d(4, 6, 3, padding=1)
    with path_of(path):
        check_empty_batch(plain, convert(plain, rule, 2, **options), torch.randn(0, 4, 9))


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("rule,options", RULE_CASES, ids=RULE_IDS)
def test_multihead_attention(rule, options, batch_first, path):
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    x = torch.randn(0, 5, 8) if batch_first else torch.randn(5, 0, 8).transpose(0, 1)
    ours = convert(plain, rule, 2, **options)
    if not batch_first:  # (T, 0, E): the check wants the batch first, so call it on a view
        with path_of(path):
            check_empty_batch(_SeqFirst(plain), _SeqFirst(ours), x)
        return
    with path_of(path):
        check_empty_batch(plain, ours, x)


class _SeqFirst(nn.Module):
    """Calls a sequence-first attention module on a batch-first input."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        x = x.transpose(0, 1)
        return self.inner(x, x, x)[0].transpose(0, 1)


# --------------------------------------------------------------------------- direct rules


def _mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 4))


DIRECT_CASES = ([("dfa", {})]
                + [("draf", o) for o in OJA_ALL[::3]]
                + [("draf", dict(oja_scale="std", oja_ddof=1)), ("draf", dict(oja_scale="none", oja_center=False))])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("rule,options", DIRECT_CASES,
                         ids=[r + "".join(f"-{v}" for v in o.values()) for r, o in DIRECT_CASES])
def test_direct(rule, options, model, path):
    torch.manual_seed(0)
    plain = _mlp() if model == "mlp" else _cnn()
    shape = (6,) if model == "mlp" else (3, 5, 5)
    ours = convert(plain, rule, 2, example_input=torch.randn(2, *shape), **options)
    with path_of(path):
        n = check_empty_batch(plain, ours, torch.randn(0, *shape))
    assert n == (0 if rule == "dfa" else 2 * len(ours.direct_feedback.paths))
