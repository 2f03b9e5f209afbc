"""feedback_init / feedback_init_scale (raftorch.feedback_init): the SVD start equals the best
rank-r approximation of W^T computed independently in float64, the scale multiplies exactly,
and settings that cannot act are one clear error."""
import pytest
import torch
from torch import nn

import raftorch
from raftorch.feedback_init import feedback_paths, scale_feedback_, svd_feedback_
from raftorch.training.loop import convert_model
from raftorch.training.config import TrainConfig


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 5 * 5, 12), nn.ReLU(), nn.Linear(12, 4))


def best_rank_r(M: torch.Tensor, r: int) -> torch.Tensor:
    """Eckart-Young: the rank-r truncation of M, float64."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


@pytest.mark.parametrize("rank", [2, "full"])
def test_svd_start_is_the_best_rank_r_approximation_of_w_transpose(rank):
    model = raftorch.convert(net(), "raf", rank)
    assert svd_feedback_(model) == 3
    for name, m, w in feedback_paths(model):
        r = m.P.shape[0]
        B, WT = m.feedback_matrix().double(), m.weight_transpose().double()
        flat = (lambda t: t.reshape(t.shape[0], -1)) if isinstance(m, nn.Conv2d) else (lambda t: t)
        torch.testing.assert_close(flat(B), best_rank_r(flat(WT), r), rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(m.P @ m.P.t(), torch.eye(r), rtol=0, atol=1e-5, msg=name)  # Oja's fixed point
        if rank == "full":
            assert raftorch.metrics.angle_degrees(B, WT) < 0.1


def test_svd_start_of_the_full_rank_rules_and_of_attention_projections():
    model = raftorch.convert(net(), "kp")
    svd_feedback_(model)
    assert all(torch.equal(m.feedback_matrix(), m.weight_transpose()) for _, m, _ in feedback_paths(model))
    attn = raftorch.convert(nn.Sequential(nn.MultiheadAttention(8, 2)), "raf", 3)
    names = [n for n, _, _ in feedback_paths(attn)]
    assert {"0.q", "0.k", "0.v", "0.out_proj"} == set(names)
    svd_feedback_(attn)
    for part, fb, w in attn[0].projection_feedback():
        torch.testing.assert_close(fb.feedback_matrix(w).double(), best_rank_r(w.t(), 3), rtol=1e-5, atol=1e-6)


def test_scale_multiplies_b_and_q_exactly_and_leaves_p():
    model = raftorch.convert(net(), "raf", 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scale_feedback_(model, 0.1)
    for n, p in model.named_parameters():
        want = before[n] * 0.1 if n.endswith(".Q") else before[n]
        assert torch.equal(p, want), n


def cfg(**kw):
    return TrainConfig.from_dict({"model": "mlp", "model_options": {"hidden": [8]}, **kw})


def test_train_applies_the_settings_and_rejects_what_cannot_act():
    x = torch.zeros(2, 1, 8, 8)
    plain = lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))  # noqa: E731
    m = convert_model(plain(), cfg(rule="raf", rank="full", feedback_init="svd"), x)
    assert max(raftorch.metrics.alignment_angles(m).values()) < 0.01
    torch.manual_seed(0)
    a = convert_model(plain(), cfg(rule="raf", rank=3), x)
    torch.manual_seed(0)
    b = convert_model(plain(), cfg(rule="raf", rank=3, feedback_init_scale=0.5), x)
    assert torch.equal(b[1].Q, 0.5 * a[1].Q) and torch.equal(b[1].P, a[1].P)
    for rule in ("bp", "frozen", "dfa"):
        with pytest.raises(ValueError, match="does not have"):
            convert_model(plain(), cfg(rule=rule, feedback_init="svd"), x)
    with pytest.raises(ValueError, match="feedback_init must be one of random, svd"):
        cfg(feedback_init="orthogonal")
    for bad in (-1.0, float("nan"), "x", True):
        with pytest.raises(ValueError, match="feedback_init_scale"):
            cfg(feedback_init_scale=bad)


def test_cli_flags_reach_the_config(tmp_path):
    from raftorch.cli import main
    with pytest.raises(SystemExit):
        main(["train", "--feedback-init", "qr"])
    rc = main(["train", "--data", "digits", "--rule", "raf", "--rank", "2", "--feedback-init", "svd",
               "--feedback-init-scale", "0.5", "--epochs", "1", "--threads", "1", "--no-progress",
               "--out", str(tmp_path / "r")])
    assert rc in (0, None)
    import yaml
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["feedback_init"] == "svd" and saved["feedback_init_scale"] == 0.5
