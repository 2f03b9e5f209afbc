"""The feedback weights learn what docs/rules.md says: Oja's subspace, Kolen-Pollack alignment."""
import math

import pytest
import torch
from torch import nn

import raftorch
from raftorch.metrics import alignment_angles


def spiked_covariance(n, top, rest, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    lam = torch.tensor(list(top) + [rest] * (n - len(top)), dtype=torch.float64)
    return U, lam, (U * lam) @ U.t()


def principal_angles_deg(A, B):
    """Principal angles between the column spaces of A and B (orthonormalised)."""
    qa, qb = torch.linalg.qr(A)[0], torch.linalg.qr(B)[0]
    s = torch.linalg.svdvals(qa.t() @ qb).clamp(-1, 1)
    return torch.rad2deg(torch.acos(s))


def oja_closed_form(P0, C, t):
    """Oja's subspace flow (docs/theory.md, raftorch.theory.exact): W = P^T, Z = e^{Ct} W0, M = I - W0^T W0 + Z^T Z, P^T P(t) = Z M^-1 Z^T."""
    W0 = P0.t()
    Z = torch.linalg.matrix_exp(C * t) @ W0
    M = torch.eye(W0.shape[1], dtype=C.dtype) - W0.t() @ W0 + Z.t() @ Z
    return Z @ torch.linalg.solve(M, Z.t())


def train_P_on_errors(layer, C, steps, lr, batch=1024, seed=1):
    """Feed errors e ~ N(0, C) as grad_output and let SGD follow P's local update."""
    g = torch.Generator().manual_seed(seed)
    L = torch.linalg.cholesky(C).float()
    opt = torch.optim.SGD([layer.P], lr=lr)
    for _ in range(steps):
        e = torch.randn(batch, C.shape[0], generator=g) @ L.t()
        out = layer(torch.randn(batch, layer.in_features, generator=g))
        opt.zero_grad()
        out.backward(e)
        opt.step()


def test_oja_P_follows_the_closed_form_and_finds_the_top_subspace():
    n, r = 12, 4
    U, lam, C = spiked_covariance(n, [5.0, 4.0, 3.0, 2.5], 0.3)
    torch.manual_seed(0)
    layer = raftorch.Linear(6, n, rule="raf", rank=r, oja_center=False, oja_scale="none")
    P0 = layer.P.detach().double().clone()
    lr, steps = 0.01, 40
    train_P_on_errors(layer, C, steps, lr)
    P = layer.P.detach().double()
    expected = oja_closed_form(P0, C, lr * steps)  # the averaged flow dP/dt = PC - PCP^T P
    assert (P.t() @ P - expected).norm() / expected.norm() < 0.05
    # the closed form itself has not converged yet at t = 0.4, so this compares dynamics
    final = oja_closed_form(P0, C, 5.0)
    assert (expected - final).norm() > 0.2

    train_P_on_errors(layer, C, 400, lr, seed=2)
    P = layer.P.detach().double()
    assert principal_angles_deg(P.t(), U[:, :r]).max() < 5.0
    torch.testing.assert_close(P @ P.t(), torch.eye(r, dtype=P.dtype), atol=0.05, rtol=0)


def test_oja_with_default_normalisation_finds_the_top_subspace_of_a_conv_error():
    """Default options (centred, divided by the largest std); every pixel is a sample."""
    n, r = 10, 3
    U, lam, C = spiked_covariance(n, [6.0, 5.0, 4.0], 0.5, seed=3)
    torch.manual_seed(0)
    conv = raftorch.Conv2d(2, n, 3, padding=1, rule="raf", rank=r)
    L = torch.linalg.cholesky(C).float()
    opt = torch.optim.SGD([conv.P], lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        x = torch.randn(8, 2, 6, 6, generator=g)
        e = (torch.randn(8, 6, 6, n, generator=g) @ L.t()).permute(0, 3, 1, 2)
        opt.zero_grad()
        conv(x).backward(e)
        opt.step()
    P = conv.P.detach().double()
    assert principal_angles_deg(P.t(), U[:, :r]).max() < 5.0
    torch.testing.assert_close(P @ P.t(), torch.eye(r, dtype=P.dtype), atol=0.05, rtol=0)


def regression_fit(rule, steps=600, seed=0):
    torch.manual_seed(seed)
    net = raftorch.convert(nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 5)), rule)
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(5, 20, generator=g) / math.sqrt(20)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=0.05)
    for _ in range(steps):
        x = torch.randn(64, 20, generator=g)
        loss = (net(x) - x @ A.t()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return alignment_angles(net)


def test_kp_aligns_B_with_W_transpose_while_fa_does_not():
    """With weight decay on both, Kolen-Pollack drives B - W^T to zero. FA's B stays random:
    the first layer's stays near-orthogonal to W^T; the output layer's W partly aligns *to* B
    (Lillicrap et al. 2016's feedback alignment), but stays far from KP's."""
    kp, fa = regression_fit("kp"), regression_fit("fa")
    assert max(kp.values()) < 10.0, kp
    assert fa["0"] > 80.0, fa
    assert all(fa[k] > kp[k] + 5.0 for k in kp), (fa, kp)


def test_bp_alignment_is_zero_and_random_feedback_is_near_orthogonal():
    net = nn.Sequential(nn.Linear(200, 100), nn.ReLU(), nn.Linear(100, 50))
    assert all(a < 1e-3 for a in alignment_angles(raftorch.convert(net, "bp")).values())
    angles = alignment_angles(raftorch.convert(net, "raf", rank=10))
    assert all(80 < a < 100 for a in angles.values()), angles
