"""An empty batch (0 rows: the last shard of a small DDP batch, a filtered batch) gives exactly
zero feedback updates on every path: the forward returns PyTorch's empty output, the backward
gives an empty input gradient, the weight and bias gradients of plain PyTorch (zeros), every
feedback gradient exactly zero (no NaN, no error), and an Adam step changes nothing."""
import contextlib
import copy
import itertools

import pytest
import torch
from torch import nn

import raftorch
from raftorch import extension
from raftorch import functional as RF

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
        with extension.disabled():
            yield
        return
    if extension.setting() == "0":
        pytest.skip("RAFTORCH_EXTENSION=0: the C++ fast path is turned off (the python cases run)")
    assert extension.get() is not None, "the C++ fast path is on but did not build"
    yield


def _call(module, x):
    out = module(x, x, x) if isinstance(module, nn.MultiheadAttention) else module(x)
    return out[0] if isinstance(out, tuple) else out


def check_empty_batch(plain: nn.Module, ours: nn.Module, x: torch.Tensor, targets=None):
    """``ours`` (a converted copy of ``plain``) on the empty batch ``x``: exact checks against
    ``plain`` and zero feedback gradients, then an Adam step that leaves every parameter as it
    was (its gradients are all zero)."""
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    xr = x.clone().requires_grad_(True)
    xo = x.clone().requires_grad_(True)
    y_ref = _call(plain, xr)
    y = _call(ours, xo)
    assert y.numel() == 0  # no rows, or (attention without queries) no error for any row
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
@pytest.mark.parametrize("shape", [(0, 6), (0, 3, 6), (3, 0, 6)], ids=["rows", "tokens", "no-tokens"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rule", RULES)
def test_linear_rules(rule, bias, shape, path):
    torch.manual_seed(0)
    plain = nn.Linear(6, 5, bias=bias)
    with path_of(path):
        check_empty_batch(plain, convert(plain, rule, 3), torch.randn(shape))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(0, 6), (0, 3, 6), (3, 0, 6)], ids=["rows", "tokens", "no-tokens"])
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


# --------------------------------------------------------------------------- both conv backwards

# (C_in, C_out, kernel, rank) taking each backward of functional.Conv2dLowRankFeedback: through
# z = P g ("factored") or through the combined kernel P^T Q ("kernel", functional._combine_kernel)
CONV_BACKWARDS = {"factored": (3, 6, 3, 2), "kernel": (3, 4, 1, 4)}


def _conv_pair(which, conv_type=nn.Conv2d):
    c_in, c_out, k, r = CONV_BACKWARDS[which]
    torch.manual_seed(0)
    return conv_type(c_in, c_out, k, padding=k // 2), r


@pytest.mark.parametrize("which", list(CONV_BACKWARDS))
@pytest.mark.parametrize("rule,options", RULE_CASES, ids=RULE_IDS)
def test_conv2d_both_backwards_every_rule(rule, options, which):
    plain, r = _conv_pair(which)
    ours = convert(plain, rule, r, **options)
    if ours.rule.low_rank:
        assert RF._combine_kernel(ours.Q, ours.P, ours.P.requires_grad) == (which == "kernel")
    check_empty_batch(plain, ours, torch.randn(0, plain.in_channels, 5, 5))


@pytest.mark.parametrize("which", list(CONV_BACKWARDS))
@pytest.mark.parametrize("options", OJA_ALL, ids=OJA_IDS)
def test_conv2d_and_conv1d_both_backwards_every_oja_option(options, which):
    plain, r = _conv_pair(which)
    ours = convert(plain, "raf", r, **options)
    assert RF._combine_kernel(ours.Q, ours.P, True) == (which == "kernel")
    assert check_empty_batch(plain, ours, torch.randn(0, plain.in_channels, 5, 5)) == 2
    plain, r = _conv_pair(which, nn.Conv1d)
    x = torch.randn(0, plain.in_channels, 7)
    assert check_empty_batch(plain, convert(plain, "raf", r, **options), x) == 2


# --------------------------------------------------------------------------- cross-attention


class _Cross(nn.Module):
    """Calls an attention module on a query, key and value built from one input ``x``
    ``(N, T, E)`` (so the check above can compare ``x``'s gradient): ``"kv"``: a longer key
    that is also the value; ``"k-v"``: a longer key and a different value tensor; ``"kdim"``:
    key and value of other widths (the module has ``kdim=6``, ``vdim=5``); ``"no-queries"``:
    the query has no tokens while key and value have some (a batch with rows but no error)."""

    def __init__(self, inner, mode):
        super().__init__()
        self.inner, self.mode = inner, mode

    def forward(self, x):
        longer = torch.cat([x, x[:, :2]], 1)
        if self.mode == "kv":
            return self.inner(x, longer, longer)[0]
        if self.mode == "k-v":
            return self.inner(x, longer, 2 * longer)[0]
        if self.mode == "kdim":
            return self.inner(x, longer[..., :6], longer[..., 1:6])[0]
        return self.inner(x[:, :0], x, 2 * x)[0]  # no-queries


CROSS_MODES = ["kv", "k-v", "kdim", "no-queries"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", CROSS_MODES)
@pytest.mark.parametrize("rule,options", RULE_CASES, ids=RULE_IDS)
def test_cross_attention(rule, options, mode, path):
    torch.manual_seed(0)
    kw = dict(kdim=6, vdim=5) if mode == "kdim" else {}
    plain = _Cross(nn.MultiheadAttention(8, 2, batch_first=True, **kw), mode)
    ours = _Cross(convert(plain.inner, rule, 2, **options), mode)
    x = torch.randn(3, 4, 8) if mode == "no-queries" else torch.randn(0, 4, 8)
    with path_of(path):
        n = check_empty_batch(plain, ours, x)
    assert n == {"fa": 0, "kp": 4, "fa-lowrank": 0, "raf-q": 4}.get(rule, 8)


# --------------------------------------------------------------------------- one row, ddof=1


def _one_row_models():
    torch.manual_seed(0)
    conv = {w: _conv_pair(w) for w in CONV_BACKWARDS}
    return {  # name: (plain model, rank, an input with one row of the Oja signal)
        "linear": (nn.Linear(6, 5), 3, torch.randn(1, 6)),
        "conv-factored": (conv["factored"][0], 2, torch.randn(1, 3, 1, 1)),
        "conv-kernel": (conv["kernel"][0], 4, torch.randn(1, 3, 1, 1)),
        "attention": (nn.MultiheadAttention(8, 2, batch_first=True), 2, torch.randn(1, 1, 8)),
    }


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("model", ["linear", "conv-factored", "conv-kernel", "attention"])
@pytest.mark.parametrize("scale,center", [(s, c) for s in ("maxstd", "rms", "std", "none") for c in (True, False)])
def test_one_row_with_ddof_1_gives_a_zero_oja_update(scale, center, model, path):
    """A variance with ``M - ddof = 0`` degrees of freedom is undefined: one row with
    ``oja_ddof=1`` gives exactly zero ``P.grad`` (never 0/0), except where no variance is
    estimated at all (``oja_scale="none"`` without centring): then ``ddof`` plays no part and
    the update is the ``ddof=0`` one. ``Q`` and the weights learn as usual."""
    plain, rank, x = _one_row_models()[model]
    grads = {}
    for ddof in (0, 1):
        torch.manual_seed(0)  # the same feedback weights for both
        ours = convert(plain, "raf", rank, oja_scale=scale, oja_center=center, oja_ddof=ddof)
        with path_of(path):
            y = _call(ours, x.clone().requires_grad_(True))
            torch.manual_seed(1)
            y.backward(torch.randn_like(y))
        for name, p in ours.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), name
        grads[ddof] = {n: p.grad for n, p in ours.named_parameters() if n.endswith("P")}
    for name, g in grads[1].items():
        if scale == "none" and not center:
            torch.testing.assert_close(g, grads[0][name], msg=name)  # ddof=0: maybe the C++ path
        else:
            assert torch.equal(g, torch.zeros_like(g)), (name, g)
    if scale == "none" and not center:  # (one key: the query's error is exactly 0)
        assert any(g.abs().sum() > 0 for g in grads[1].values())


# --------------------------------------------------------------------------- DDP: an empty slice


class _ThreadGroup:
    """A process group of ``size`` threads for :func:`raftorch.sync_oja`'s all-reduces (each
    thread one process): ``all_reduce`` sums the tensors every thread passes, in rank order.
    A thread that skips an all-reduce the others make leaves them waiting: the barrier times
    out and the test fails instead of hanging. ``calls[rank]`` records each thread's calls."""

    def __init__(self, size):
        import threading

        self.size, self.local = size, threading.local()
        self.barrier = threading.Barrier(size, timeout=10)
        self.slots = [None] * size
        self.calls = [[] for _ in range(size)]

    def all_reduce(self, t):
        rank = self.local.rank
        self.calls[rank].append((tuple(t.shape), t.dtype))
        self.slots[rank] = t.clone()
        self.barrier.wait()
        total = self.slots[0].clone()
        for other in self.slots[1:]:
            total += other
        self.barrier.wait()
        return t.copy_(total)

    def run(self, work):
        """``work(rank)`` on every thread; the first exception is raised here."""
        import threading

        errors = []

        def target(rank):
            self.local.rank = rank
            try:
                work(rank)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


def _ddp_models():
    torch.manual_seed(0)
    return {  # name: (model factory taking the rule and Oja options, input shape)
        "mlp": (lambda rule, o: convert(_mlp(), rule, 3, **o), (6,)),
        "conv-factored": (lambda rule, o: convert(_conv_pair("factored")[0], rule, 2, **o), (3, 5, 5)),
        "conv-kernel": (lambda rule, o: convert(_conv_pair("kernel")[0], rule, 4, **o), (3, 5, 5)),
        "conv1d": (lambda rule, o: convert(_conv_pair("factored", nn.Conv1d)[0], rule, 2, **o), (3, 7)),
        "attention": (lambda rule, o: _Cross(convert(nn.MultiheadAttention(8, 2, batch_first=True),
                                                     rule, 2, **o), "k-v"), (4, 8)),
        "direct-dense": (lambda rule, o: convert(_mlp(), "d" + rule, 2, **o), (6,)),
        "direct-conv": (lambda rule, o: convert(_conv_source(), "d" + rule, 2, source="2", **o), (3, 6, 6)),
    }


def _conv_source():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(5 * 3 * 3, 4))


DDP_OJA = [OJA_ALL[i] for i in (0, 3, 6, 9, 12, 15, 17, 20, 26, 29, 31)]


@pytest.mark.parametrize("model", ["mlp", "conv-factored", "conv-kernel", "conv1d", "attention",
                                   "direct-dense", "direct-conv"])
@pytest.mark.parametrize("options", DDP_OJA, ids=[OJA_IDS[OJA_ALL.index(o)] for o in DDP_OJA])
def test_sync_oja_with_an_empty_slice_on_one_process(monkeypatch, options, model):
    """Two processes under :func:`raftorch.sync_oja` (threads with a summing all-reduce), the
    second with an empty slice of the global batch: it makes the same all-reduces as the first
    (no process waits for ever), its every gradient is exactly zero, and the mean of the two
    processes' gradients (what DDP applies) equals one process's on the whole global batch,
    ``P`` included. Each process backpropagates its share of the global loss times the world
    size, as under DDP."""
    from raftorch.scaling import _holders

    build, shape = _ddp_models()[model]
    one = build("raf", options).double()
    procs = [copy.deepcopy(one) for _ in range(2)]
    group = _ThreadGroup(2)
    monkeypatch.setattr(RF, "_all_reduce", lambda t, g: g.all_reduce(t))
    monkeypatch.setattr(RF, "_world", lambda g: g.size)
    for m in procs:
        for h in _holders(m):
            h.group = group
    torch.manual_seed(2)
    x = torch.randn(5, *shape, dtype=torch.float64) + 0.5
    G = torch.randn(_call(one, x).shape, dtype=torch.float64)
    _call(one, x).backward(G)
    slices = [(x, G), (x[:0], G[:0])]

    def work(rank):
        xs, gs = slices[rank]
        _call(procs[rank], xs).backward(2 * gs)

    group.run(work)
    assert group.calls[0] == group.calls[1] and group.calls[0]  # same all-reduces, some made
    grads = [{n: p.grad for n, p in m.named_parameters() if p.grad is not None} for m in procs]
    for name, p in one.named_parameters():
        if p.grad is None:
            assert name not in grads[0] and name not in grads[1], name
            continue
        assert torch.equal(grads[1][name], torch.zeros_like(p)), name
        torch.testing.assert_close((grads[0][name] + grads[1][name]) / 2, p.grad, msg=name)


@pytest.mark.parametrize("model", ["mlp", "conv-factored", "conv-kernel", "attention", "direct-dense",
                                   "direct-conv"])
@pytest.mark.parametrize("options", [{}, dict(oja_scale="std", oja_ddof=1), dict(oja_scale="none")],
                         ids=["default", "std-ddof1", "none"])
def test_sync_oja_empty_batch_in_a_one_process_gloo_group(tmp_path, options, model):
    """A real (one-process) gloo group: an empty batch under sync_oja gives zero updates."""
    import torch.distributed as dist

    build, shape = _ddp_models()[model]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ours = build("raf", options)
        raftorch.sync_oja(ours)
        y = _call(ours, torch.randn(0, *shape))
        y.sum().backward()
        learned = [(n, p) for n, p in ours.named_parameters() if n.endswith(("P", "Q"))]
        assert learned
        for name, p in learned:
            assert torch.equal(p.grad, torch.zeros_like(p)), name
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- direct, conv source


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rule,options", DIRECT_CASES,
                         ids=[r + "".join(f"-{v}" for v in o.values()) for r, o in DIRECT_CASES])
def test_direct_from_a_conv_source(rule, options, path):
    """A conv source feeding a conv target: the per-pixel path (raftorch.direct_conv)."""
    torch.manual_seed(0)
    plain = _conv_source()
    ours = convert(plain, rule, 2, source="2", **options)
    assert [p.conv for p in ours.direct_feedback.paths] == [True]
    with path_of(path):
        n = check_empty_batch(plain, ours, torch.randn(0, 3, 6, 6))
    assert n == (0 if rule == "dfa" else 2)
