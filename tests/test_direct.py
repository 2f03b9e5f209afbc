"""Direct feedback (dfa, draf): exact oracles for where the error lands, the local rules of
Q and P, no backprop between targets and source, no shared state, clear errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import raftorch
from raftorch.direct import DirectFeedback, injection_point
from raftorch.functional import OjaOptions, oja_grad
from test_feedback_learning import principal_angles_deg, spiked_covariance


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(widths=(6, 8, 7, 5), act=nn.Tanh, batchnorm=False, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            if batchnorm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(act())
    return nn.Sequential(*layers)


def weight_grads(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- exact oracles


@pytest.mark.parametrize("rule", ["dfa", "draf"])
def test_direct_feedback_with_the_transposed_path_gives_backprop_for_the_first_layer(rule):
    """Two layers, x -> W1 -> tanh -> W2: with B = W2^T the error delivered at tanh's output,
    times tanh', is backprop's: dW1 must equal autograd's (checks the injection point and f')."""
    plain = mlp((6, 9, 4))
    x, y = torch.randn(11, 6), torch.randint(0, 4, (11,))
    bp = weight_grads(plain, x, y)
    net = raftorch.convert(plain, rule, 4 if rule == "draf" else None)
    (path,) = net.direct_feedback.paths
    assert (path.target, path.point) == ("0", "1")
    with torch.no_grad():
        W2T = plain[2].weight.t()
        if rule == "dfa":
            path.B.copy_(W2T)
        else:  # r = d_s, P orthonormal square: Q P = W2^T for Q = W2^T P^T
            path.Q.copy_(W2T @ path.P.t())
    got = weight_grads(net, x, y)
    for k in ("0.weight", "0.bias", "2.weight", "2.bias"):
        torch.testing.assert_close(got[k], bp[k], rtol=1e-5, atol=1e-6)
    # a random B is not the transposed path: the oracle can fail
    with torch.no_grad():
        (path.B if rule == "dfa" else path.Q).normal_()
    assert not torch.allclose(weight_grads(net, x, y)["0.weight"], bp["0.weight"], atol=1e-3)


def test_direct_error_lands_after_batchnorm_relu_and_dropout():
    """fc -> BN -> ReLU -> Dropout -> out: the error lands on the dropout output, so the mask,
    relu' and BN's exact backward all act on it (checked against autograd with B = W_out^T)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    net = raftorch.convert(plain, "dfa")
    assert injection_point(net, "0") == "3"
    with torch.no_grad():
        net.direct_feedback.paths[0].B.copy_(plain[4].weight.t())
    torch.manual_seed(1)
    bp = weight_grads(plain, x, y)
    torch.manual_seed(1)  # the same dropout mask
    got = weight_grads(net, x, y)
    for k in bp:
        torch.testing.assert_close(got[k], bp[k], rtol=1e-5, atol=1e-6)


def test_conv_target_gets_backprop_error_with_the_transposed_path():
    """conv -> ReLU -> flatten -> linear: the error map has the conv output's shape and
    B = W_lin^T (flatten is a reshape) reproduces backprop for the conv weight."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))
    x, y = torch.randn(6, 2, 5, 5), torch.randint(0, 4, (6,))
    with pytest.raises(ValueError, match="example_input"):
        raftorch.convert(plain, "dfa")
    net = raftorch.convert(plain, "dfa", example_input=x[:2])
    (path,) = net.direct_feedback.paths
    assert path.B.shape == (75, 4) and path.point == "1"
    with torch.no_grad():
        path.B.copy_(plain[3].weight.t())
    bp, got = weight_grads(plain, x, y), weight_grads(net, x, y)
    for k in bp:
        torch.testing.assert_close(got[k], bp[k], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- local rules


def test_Q_moves_by_the_kolen_pollack_like_rule_and_P_by_oja():
    """grad_Q = h^T (e P^T) and grad_P = oja_grad(P, e, e P^T) with h the injected activity
    (post-tanh) and e the source error, by hand on a batch of 5."""
    net = raftorch.convert(mlp((6, 8, 7, 5)), "draf", 3)
    x = torch.randn(5, 6)
    acts = {}
    net[1].register_forward_hook(lambda m, a, o: acts.__setitem__("h1", o.detach().clone()))
    net[3].register_forward_hook(lambda m, a, o: acts.__setitem__("h3", o.detach().clone()))
    out = net(x)
    e = torch.randn_like(out)
    out.backward(e)
    for path, h in zip(net.direct_feedback.paths, (acts["h1"], acts["h3"])):
        z = e @ path.P.detach().t()
        torch.testing.assert_close(path.Q.grad, h.t() @ z)
        torch.testing.assert_close(path.P.grad, oja_grad(path.P.detach(), e, z, OjaOptions()))


def test_direct_P_converges_to_the_top_principal_subspace_of_the_source_error():
    n, r = 12, 4
    U, lam, C = spiked_covariance(n, [5.0, 4.0, 3.0, 2.5], 0.3)
    torch.manual_seed(0)
    net = raftorch.convert(mlp((6, 10, n)), "draf", r, oja_center=False, oja_scale="none")
    P = net.direct_feedback.paths[0].P
    opt = torch.optim.SGD([P], lr=0.03)
    L = torch.linalg.cholesky(C).float()
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        e = torch.randn(256, n, generator=g) @ L.t()
        opt.zero_grad()
        net(torch.randn(256, 6, generator=g)).backward(e)
        opt.step()
    Pd = P.detach().double()
    assert principal_angles_deg(Pd.t(), U[:, :r]).max() < 5.0
    torch.testing.assert_close(Pd @ Pd.t(), torch.eye(r, dtype=Pd.dtype), atol=0.05, rtol=0)


# --------------------------------------------------------------------------- no backprop in between


class WeightReads(TorchDispatchMode):
    """Counts the aten ops that read any of the given tensors' storage."""

    def __init__(self, tensors):
        super().__init__()
        self.ptrs = {t.untyped_storage().data_ptr() for t in tensors}
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for a in torch.utils._pytree.tree_leaves((args, kwargs or {})):
            if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.ptrs:
                self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("source", ["output", "penultimate"])
def test_backward_never_reads_the_weights_between_a_target_and_the_source(source):
    """Backprop through a layer needs its weight (grad_input = g W); the weight update does
    not. So no backward op may read a weight between the first target and the source; layers
    after the source (here the output layer for 'penultimate') may."""
    net = raftorch.convert(mlp((6, 8, 8, 8, 5), act=nn.ReLU), "draf", 3, source=source)
    x, y = torch.randn(4, 6), torch.randint(0, 5, (4,))
    loss = F.cross_entropy(net(x), y)
    between = [net[2].weight, net[4].weight] + ([] if source == "penultimate" else [net[6].weight])
    with WeightReads(between) as mode:
        loss.backward()
    assert mode.reads == []
    assert all(w.grad is not None for w in between)  # ... while they still learn
    # the same check sees backprop's weight reads
    bp = raftorch.convert(mlp((6, 8, 8, 8, 5), act=nn.ReLU), "bp")
    loss = F.cross_entropy(bp(x), y)
    with WeightReads([bp[2].weight, bp[4].weight]) as mode:
        loss.backward()
    assert len(mode.reads) >= 2


def test_layers_after_the_source_keep_their_ordinary_error():
    """Source = penultimate weight layer: the output layer and the source layer get exactly
    backprop's gradient; the earlier layers get the direct error."""
    plain = mlp((6, 8, 8, 5))
    x, y = torch.randn(7, 6), torch.randint(0, 5, (7,))
    bp = weight_grads(plain, x, y)
    net = raftorch.convert(plain, "dfa", source="penultimate")
    assert net.direct_feedback.source == "2"
    assert [p.target for p in net.direct_feedback.paths] == ["0"]
    got = weight_grads(net, x, y)
    for k in ("2.weight", "2.bias", "4.weight", "4.bias"):
        torch.testing.assert_close(got[k], bp[k])
    assert not torch.allclose(got["0.weight"], bp["0.weight"])


# --------------------------------------------------------------------------- no shared state


def test_two_models_in_one_process_do_not_interfere():
    """Interleaved forwards of two converted models (and a deepcopy) give each model the
    gradients it gets alone."""
    xa, ya = torch.randn(5, 6), torch.randint(0, 5, (5,))
    xb, yb = torch.randn(3, 6), torch.randint(0, 5, (3,))
    a = raftorch.convert(mlp(seed=1), "draf", 3)
    b = raftorch.convert(mlp(seed=2), "dfa", source="penultimate")
    c = copy.deepcopy(a)
    assert c.direct_feedback is not a.direct_feedback
    alone = [weight_grads(m, x, y) for m, x, y in ((a, xa, ya), (b, xb, yb), (c, xb, yb))]
    for m in (a, b, c):
        m.zero_grad()
    la, lb, lc = (F.cross_entropy(m(x), y) for m, x, y in ((a, xa, ya), (b, xb, yb), (c, xb, yb)))
    lc.backward(), lb.backward(), la.backward()
    for m, ref in zip((a, b, c), alone):
        got = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k])


# --------------------------------------------------------------------------- torch integration


def test_no_grad_evaluation_is_the_plain_forward_and_leaves_no_state():
    plain = mlp(batchnorm=True)
    net = raftorch.convert(plain, "draf", 2)
    x = torch.randn(9, 6)
    net.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(net(x), plain(x))
    assert net.direct_feedback._stash == {}
    net.train(), plain.train()
    assert torch.equal(net(x), plain(x))  # the direct path changes no forward value


@pytest.mark.parametrize("batch", [1, 2, 33])
def test_any_batch_size_with_batchnorm_conv_and_linear_targets(batch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10))
    net = raftorch.convert(model, "draf", 5, example_input=torch.randn(2, 1, 8, 8))
    paths = net.direct_feedback.paths
    assert [(p.target, p.point, tuple(p.Q.shape)) for p in paths] == [
        ("0", "3", (64, 5)), ("4", "5", (64, 5)), ("7", "8", (16, 5))]
    net.train(batch > 1)  # BatchNorm needs 2 samples to train
    out = net(torch.randn(batch, 1, 8, 8))
    F.cross_entropy(out, torch.randint(0, 10, (batch,))).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters()
               if p.requires_grad)


def test_feedback_parameters_are_ordinary_parameters():
    net = raftorch.convert(mlp(), "draf", 3)
    names = [n for n, _ in net.named_parameters()]
    assert "direct_feedback.paths.0.Q" in names and "direct_feedback.paths.1.P" in names
    sd = net.state_dict()
    other = raftorch.convert(mlp(seed=5), "draf", 3)
    other.load_state_dict(sd)
    torch.testing.assert_close(other.direct_feedback.paths[0].Q, net.direct_feedback.paths[0].Q)
    dfa = raftorch.convert(mlp(), "dfa")
    assert not dfa.direct_feedback.paths[0].B.requires_grad
    net.to(torch.float64)
    assert net.direct_feedback.paths[0].P.dtype == torch.float64
    net(torch.randn(3, 6, dtype=torch.float64)).sum().backward()
    assert "draf" in repr(net) and "rank=3" in repr(net)


def test_detach_from_restores_the_plain_model():
    plain = mlp()
    net = raftorch.convert(plain, "draf", 2)
    fb = net.direct_feedback
    fb.detach_from(net)
    assert not hasattr(net, "direct_feedback")
    x, y = torch.randn(4, 6), torch.randint(0, 5, (4,))
    ref = weight_grads(plain, x, y)
    got = weight_grads(net, x, y)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])


def test_ddp_all_reduces_the_feedback_updates(tmp_path):
    """One-process gloo group: DDP wraps a draf model and every feedback parameter gets its
    .grad through DDP's reducer."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        net = raftorch.convert(mlp(), "draf", 3)
        x, y = torch.randn(4, 6), torch.randint(0, 5, (4,))
        ref = weight_grads(copy.deepcopy(net), x, y)
        ddp = DDP(net)
        F.cross_entropy(ddp(x), y).backward()
        for n, p in net.named_parameters():
            torch.testing.assert_close(p.grad, ref[n])
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, match", [
    (dict(rule="draf", rank=3, source="nope"), "source 'nope' is not a module"),
    (dict(rule="draf", rank=3, targets=["0", "nope"]), "target 'nope' is not a module"),
    (dict(rule="draf", rank=3, source="2", targets=["4"]), "does not come before source"),
    (dict(rule="draf", rank=3, source="0"), "no Linear/Conv2d layer comes before"),
    (dict(rule="draf", rank=3, targets=["0", "1"]), "both inject at '1'"),
    (dict(rule="draf", rank=3, targets=[]), "targets is empty"),
    (dict(rule="draf", rank=None), "needs a rank"),
    (dict(rule="dfa", rank=3), "takes no rank"),
    (dict(rule="dfa", oja_scale="rms"), "rule 'dfa' has no P"),
    (dict(rule="draf", rank=3, oja_source="target"), "unknown option"),
    (dict(rule="draf", rank=3, rest_rule="dfa"), "rest_rule"),
])
def test_bad_source_targets_and_options_raise_a_clear_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        raftorch.convert(mlp(), **kwargs)


def test_direct_rules_and_layer_rules_do_not_mix_their_keywords():
    with pytest.raises(ValueError, match="source= and targets= are for the direct rules"):
        raftorch.convert(mlp(), "raf", 3, source="output")
    with pytest.raises(ValueError, match="raftorch.convert"):
        raftorch.get_rule("draf")
    net = raftorch.convert(mlp(), "draf", 3)
    with pytest.raises(ValueError, match="already has a direct_feedback"):
        DirectFeedback(net, "dfa")


def test_describe_lists_each_direct_path_with_its_target():
    rows = raftorch.describe(raftorch.convert(mlp(), "draf", 3)).rows
    direct = [r for r in rows if r["type"] == "DirectPath"]
    assert [(r["rule"], r["rank"]) for r in direct] == [("draf", 3), ("draf", 3)]
    assert "into '0' at '1'" in direct[0]["feedback"]
