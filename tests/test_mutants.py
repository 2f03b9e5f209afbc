"""Claims a mutation pass over the core math found untested, each checked exactly.

* The feedback weights start at the documented scale: ``B`` and ``Q`` uniform in
  ``+-1/sqrt(fan_in)`` (the bound of ``nn.Linear``'s own weight), ``fan_in`` the input width of
  the (virtual) forward map, in every layer type and direct path. Shapes are non-square, so a
  draw with the fan-out instead fails.
* Cross-attention (the key also the value, or three different tensors of different lengths
  and widths): each of q, k, v sends its error through its own feedback path, against
  autograd of the attention with exact weights and hand formulas of each rule.
* Kolen-Pollack on attention: ``grad_B = grad_W^T`` for q, k, v (the slices of the packed
  weight's gradient) and ``out_proj``.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import raftorch
from raftorch.attention import MultiheadAttention
from raftorch.direct_conv import ConvDirectPath

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- initial scale


def assert_uniform_bound(t: torch.Tensor, fan_in: int, what: str):
    """``t`` looks like a draw from ``U(-b, b)``, ``b = 1/sqrt(fan_in)``: no entry beyond ``b``,
    the largest within 3% of it, the standard deviation ``b/sqrt(3)`` within 5% (every
    tensor here has at least 500 entries: the sampling error of the std is below 2%), the
    mean within four standard errors of 0. With the fan-out, ``b`` changes by a factor of 2
    or more here."""
    t = t.detach().double().flatten()
    b = 1.0 / math.sqrt(fan_in)
    assert t.numel() >= 500, what
    assert t.abs().max() <= b, (what, t.abs().max().item(), b)
    assert t.abs().max() >= 0.97 * b, (what, t.abs().max().item(), b)
    torch.testing.assert_close(t.std().item(), b / math.sqrt(3), rtol=0.05, atol=0, msg=what)
    assert abs(t.mean().item()) < 4 * b / math.sqrt(3 * t.numel()), what


def assert_orthonormal_rows(P: torch.Tensor, what: str):
    torch.testing.assert_close(P @ P.t(), torch.eye(P.shape[0], dtype=P.dtype), rtol=0, atol=1e-5,
                               msg=what)


@pytest.mark.parametrize("rule,rank", [("fa", None), ("kp", None), ("raf", 12), ("raf-q", 12), ("fa-lowrank", 12)])
@pytest.mark.parametrize("layer", ["linear-wide-in", "linear-wide-out", "conv2d", "conv1d"])
def test_layer_feedback_starts_uniform_with_the_fan_in_bound(layer, rule, rank):
    """``init_feedback_`` via each layer: B / Q bound ``1/sqrt(fan_in)``, ``fan_in`` the weight's
    ``weight[0].numel()`` (``in_features``; ``C_in / groups * kernel size``), which is also the
    bound PyTorch's default init gives the layer's own weight; ``P`` orthonormal rows."""
    torch.manual_seed(0)
    layer_of = {
        "linear-wide-in": lambda: raftorch.Linear(400, 60, rule=rule, rank=rank),      # fan-out 60
        "linear-wide-out": lambda: raftorch.Linear(60, 400, rule=rule, rank=rank),     # fan-out 400
        "conv2d": lambda: raftorch.Conv2d(32, 6, 3, rule=rule, rank=rank),             # 288 vs 54
        "conv1d": lambda: raftorch.Conv1d(24, 120, 5, groups=2, rule=rule, rank=rank),  # 60 vs 600
    }
    m = layer_of[layer]()
    fan_in = m.weight[0].numel()
    assert fan_in == {"linear-wide-in": 400, "linear-wide-out": 60, "conv2d": 288, "conv1d": 60}[layer]
    name = "B" if rule in ("fa", "kp") else "Q"
    assert_uniform_bound(getattr(m, name), fan_in, f"{layer} {name}")
    # the same bound as the forward weight's own default draw (kaiming_uniform_, a = sqrt(5))
    assert m.weight.abs().max() <= 1 / math.sqrt(fan_in)
    if name == "Q":
        assert_orthonormal_rows(m.P, layer)


@pytest.mark.parametrize("rule,rank", [("fa", None), ("kp", None), ("raf", 6)])
def test_attention_feedback_starts_uniform_with_each_projections_fan_in(rule, rank):
    """q (``E -> E``), k (``kdim -> E``), v (``vdim -> E``) and ``out_proj``: fan-in ``E``,
    ``kdim``, ``vdim``, ``E``; with ``kdim``, ``vdim`` four and eight times ``E``."""
    torch.manual_seed(0)
    E = 32
    m = MultiheadAttention(E, 4, kdim=4 * E, vdim=8 * E, rule=rule, rank=rank)
    name = "B" if rule in ("fa", "kp") else "Q"
    for part, fan_in in (("q", E), ("k", 4 * E), ("v", 8 * E)):
        fb = getattr(m, f"{part}_feedback")
        t = getattr(fb, name)
        if t.numel() < 500:  # q's Q is E x r: too few entries for the statistics; check the bound
            b = 1 / math.sqrt(fan_in)
            assert t.abs().max() <= b and t.abs().max() > 0.8 * b, part
        else:
            assert_uniform_bound(t, fan_in, f"{part} {name}")
        if name == "Q":
            assert_orthonormal_rows(fb.P, part)
    out = getattr(m.out_proj, name)
    assert out.abs().max() <= 1 / math.sqrt(E)


@pytest.mark.parametrize("rule,rank", [("dfa", None), ("draf", 8)])
def test_dense_direct_path_starts_uniform_with_the_target_width_as_fan_in(rule, rank):
    """A dense path's virtual forward map goes from the target's ``n_target = 400`` units to the
    source's ``d_source = 10`` values: fan-in 400 (the fan-out mutant draws 6.3x wider)."""
    torch.manual_seed(0)
    net = raftorch.convert(nn.Sequential(nn.Linear(20, 400), nn.ReLU(), nn.Linear(400, 10)), rule, rank)
    (path,) = net.direct_feedback.paths
    assert not path.conv and (path.n_target, path.d_source) == (400, 10)
    name = "B" if rule == "dfa" else "Q"
    assert_uniform_bound(getattr(path, name), 400, name)
    if rule == "draf":
        assert_orthonormal_rows(path.P, "P")


@pytest.mark.parametrize("rule,rank", [("dfa", None), ("draf", 8)])
def test_conv_direct_path_starts_uniform_with_the_target_channels_as_fan_in(rule, rank):
    """A per-pixel path (:class:`ConvDirectPath`) from ``C_s = 8`` source channels into
    ``C_t = 96`` target channels: fan-in ``C_t`` (the fan-out mutant: ``C_s``, 3.5x wider)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 96, 3, padding=1), nn.ReLU(), nn.Conv2d(96, 8, 1))
    net = raftorch.convert(plain, rule, rank, source="2")
    (path,) = net.direct_feedback.paths
    assert isinstance(path, ConvDirectPath) and (path.c_target, path.c_source) == (96, 8)
    name = "B" if rule == "dfa" else "Q"
    assert_uniform_bound(getattr(path, name), 96, name)
    if rule == "draf":
        assert_orthonormal_rows(path.P, "P")


# --------------------------------------------------------------------------- cross-attention

E, HEADS = 8, 2
# name: (kdim, vdim, how key and value are made from the inputs); query length 3, key length 5
CROSS = {
    "self": (None, None),          # attn(x, x, x): one packed projection call
    "key-is-value": (None, None),  # attn(q, k, k): the packed k, v call
    "three-tensors": (None, None),  # attn(q, k, v): three calls
    "kdim-equal": (6, 6),          # separate q/k/v weights, k and v of one width
    "kdim-vdim": (6, 5),
}


def inputs(case, N=2):
    """``(query, key, value)`` ``(L, N, width)`` for ``case`` (seq-first), float64."""
    g = torch.Generator().manual_seed(3)
    kdim, vdim = CROSS[case]
    q = torch.randn(3, N, E, generator=g, dtype=torch.float64)
    if case == "self":
        return q, q, q
    k = torch.randn(5, N, kdim or E, generator=g, dtype=torch.float64)
    if case == "key-is-value":
        return q, k, k
    return q, k, torch.randn(5, N, vdim or E, generator=g, dtype=torch.float64)


def attention_module(case, rule, rank=None):
    """A raftorch attention (float64) whose ``out_proj`` feedback is exact (``B = W^T``, or
    full-rank ``Q P = W^T``), so the error reaching the attention product is backprop's and only
    q, k, v's feedback paths differ from autograd; every q, k, v path has its own random draw."""
    torch.manual_seed(0)
    kdim, vdim = CROSS[case]
    m = MultiheadAttention(E, HEADS, kdim=kdim, vdim=vdim, rule=rule, rank=rank, dtype=torch.float64)
    with torch.no_grad():
        W = m.out_proj.weight
        if rule in ("fa", "kp"):
            m.out_proj.B.copy_(W.t())
        else:  # P square orthogonal (rank E): Q P = W^T P^T P = W^T
            assert m.out_proj.P.shape == (E, E)
            m.out_proj.Q.copy_(W.t() @ m.out_proj.P.t())
    return m


def projection_weights(m):
    """``[(W_i, b_i)]`` for q, k, v (slices of the packed weight, or the separate weights)."""
    b = [None] * 3 if m.in_proj_bias is None else list(m.in_proj_bias.chunk(3))
    return [(w, bi) for (_, _, w), bi in zip(m.projection_feedback(), b)]


def projection_output_errors(m, q, k, v, G):
    """``(out, [g_q, g_k, g_v])``: the output and the errors at the outputs of the three
    projections, by autograd of the attention with identity projections on the projected inputs
    (``F.multi_head_attention_forward``, exact ``out_proj``), independent of raftorch."""
    I = torch.eye(E, dtype=torch.float64)
    proj = [F.linear(x, w, b).detach().requires_grad_(True)
            for x, (w, b) in zip((q, k, v), projection_weights(m))]
    out, _ = F.multi_head_attention_forward(
        *proj, E, HEADS, None, torch.zeros(3 * E, dtype=torch.float64), None, None, False, 0.0,
        m.out_proj.weight.detach(), m.out_proj.bias.detach(), training=False, need_weights=False,
        use_separate_proj_weight=True, q_proj_weight=I, k_proj_weight=I, v_proj_weight=I)
    out.backward(G)
    return out.detach(), [p.grad for p in proj]


def run(m, q, k, v, G):
    """Our module's output and the gradients of its distinct inputs (``dict`` by name)."""
    leaves = {"q": q.clone().requires_grad_(True)}
    leaves["k"] = leaves["q"] if k is q else k.clone().requires_grad_(True)
    leaves["v"] = leaves["k"] if v is k else v.clone().requires_grad_(True)
    out, _ = m(leaves["q"], leaves["k"], leaves["v"], need_weights=False)
    out.backward(G)
    return out.detach(), leaves


def expected_input_grads(errors, sends, q, k, v):
    """Sum each part's error sent down (``sends[i](g_i)``) onto the tensor it was projected from."""
    want = {}
    for name, x, g, send in zip("qkv", (q, k, v), errors, sends):
        key = next(n for n, t in (("q", q), ("k", k), ("v", v)) if t is x)
        want[key] = send(g) if key not in want else want[key] + send(g)
    return want


def weight_grad(m, part):
    """The gradient of the ``part`` projection's weight: its rows of the packed
    ``in_proj_weight``'s gradient, or the separate ``{part}_proj_weight``'s."""
    if m._qkv_same_embed_dim:
        i = "qkv".index(part)
        return m.in_proj_weight.grad[i * E:(i + 1) * E]
    return getattr(m, f"{part}_proj_weight").grad


def rows(t):
    return t.reshape(-1, t.shape[-1])


def hand_oja(P, e):
    """Oja's grad_P with the default options (centred, largest per-feature population std, mean)."""
    ec = e - e.mean(0)
    en = ec / ec.pow(2).mean(0).max().sqrt()
    zn = en @ P.t()
    return -(zn.t() @ en - zn.t() @ zn @ P) / e.shape[0]


@pytest.mark.parametrize("case", list(CROSS))
def test_fa_attention_sends_each_parts_error_through_its_own_B(case):
    """``fa``: the query receives ``g_q B_q^T``, the key ``g_k B_k^T`` (plus ``g_v B_v^T`` when it
    is also the value), the value ``g_v B_v^T``; the packed weight's gradient is exact. Every
    ``B`` is a different random draw, so a swap of two paths changes the result."""
    m = attention_module(case, "fa")
    q, k, v = inputs(case)
    G = torch.randn(3, 2, E, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref_out, errors = projection_output_errors(m, q, k, v, G)
    out, got = run(m, q, k, v, G)
    torch.testing.assert_close(out, ref_out)
    Bs = [fb.B for _, fb, _ in m.projection_feedback()]
    sends = [lambda g, B=B: g @ B.t() for B in Bs]
    want = expected_input_grads(errors, sends, q, k, v)
    for name in want:
        torch.testing.assert_close(got[name].grad, want[name], msg=name)
    for part, g, x in zip("qkv", errors, (q, k, v)):  # grad_W = g^T x, exact
        torch.testing.assert_close(weight_grad(m, part), rows(g).t() @ rows(x), msg=part)


@pytest.mark.parametrize("case", list(CROSS))
def test_raf_attention_gives_each_part_its_own_low_rank_error_and_updates(case):
    """``raf`` (rank 3): each part sends ``(g_i P_i^T) Q_i^T`` to its input, learns
    ``grad_Q_i = x_i^T (g_i P_i^T)`` and Oja's ``grad_P_i`` on its own error ``g_i``."""
    m = attention_module(case, "raf", rank=E)
    with torch.no_grad():  # rank 3 for q, k, v: a fresh draw each, out_proj stays exact
        for part in "qkv":
            fb = getattr(m, f"{part}_feedback")
            fb.P = nn.Parameter(fb.P[:3].clone())
            fb.Q = nn.Parameter(fb.Q[:, :3].clone())
    q, k, v = inputs(case)
    G = torch.randn(3, 2, E, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _, errors = projection_output_errors(m, q, k, v, G)
    _, got = run(m, q, k, v, G)
    fbs = [fb for _, fb, _ in m.projection_feedback()]
    sends = [lambda g, fb=fb: (g @ fb.P.t()) @ fb.Q.t() for fb in fbs]
    want = expected_input_grads(errors, sends, q, k, v)
    for name in want:
        torch.testing.assert_close(got[name].grad, want[name], msg=name)
    for fb, g, x in zip(fbs, errors, (q, k, v)):
        z = rows(g) @ fb.P.t()
        torch.testing.assert_close(fb.Q.grad, rows(x).t() @ z, msg=fb.part)
        torch.testing.assert_close(fb.P.grad, hand_oja(fb.P.detach(), rows(g)), msg=fb.part)


@pytest.mark.parametrize("case", list(CROSS))
def test_kp_attention_learns_grad_B_equal_to_the_transposed_weight_gradient(case):
    """Kolen-Pollack on attention: ``grad_B_i = grad_W_i^T`` for q, k, v, where ``grad_W_i`` is
    the slice of the packed ``in_proj_weight``'s gradient (or the separate weight's), and
    ``grad_B = grad_W^T`` for ``out_proj``; each also equals ``g_i^T x_i`` by hand."""
    m = attention_module(case, "kp")
    q, k, v = inputs(case)
    G = torch.randn(3, 2, E, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _, errors = projection_output_errors(m, q, k, v, G)
    run(m, q, k, v, G)
    for (part, fb, w), g, x in zip(m.projection_feedback(), errors, (q, k, v)):
        grad_w = weight_grad(m, part)
        assert fb.B.grad.shape == (x.shape[-1], E) == fb.B.shape
        torch.testing.assert_close(fb.B.grad, grad_w.t(), rtol=0, atol=0, msg=part)
        torch.testing.assert_close(fb.B.grad, rows(x).t() @ rows(g), msg=part)
    assert torch.equal(m.out_proj.B.grad, m.out_proj.weight.grad.t())
