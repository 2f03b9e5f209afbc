"""raftorch.cost: a training step's multiply-adds counted from shapes, checked by hand."""
import torch
from torch import nn

import raftorch
from raftorch.cost import step_macs
from raftorch.models import build_model


def test_mlp_counts_by_hand():
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(5, 6)
    bp, _, att = step_macs(net, x)
    # layer 1 (first): fwd + grad_W = 2*5*6*8; layer 2: fwd + grad_W + grad_input = 3*5*8*4
    assert att == 0 and bp == 2 * 5 * 6 * 8 + 3 * 5 * 8 * 4
    raf, costs, _ = step_macs(raftorch.convert(net, "raf", 2), x)
    l2 = 2 * 5 * 8 * 4 + 5 * 2 * (8 + 4) + 5 * 8 * 2 + (5 * 2 * 4 + 5 * 2 * 2 + 2 * 2 * 4)
    l1 = 2 * 5 * 6 * 8 + 5 * 6 * 2 + (5 * 2 * 8 + 5 * 2 * 2 + 2 * 2 * 8)
    assert raf == l1 + l2 and [c.rank for c in costs] == [2, 2]
    fal, _, _ = step_macs(raftorch.convert(net, "fa-lowrank", 2), x)  # nothing of Q, P learns
    assert fal == 2 * 5 * 6 * 8 + 2 * 5 * 8 * 4 + 5 * 2 * (8 + 4)


def test_conv_counts_every_output_pixel_as_a_row():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1))
    x = torch.randn(2, 3, 8, 8)
    total, costs, _ = step_macs(net, x)
    assert (costs[0].rows, costs[0].n_in, costs[0].n_out) == (2 * 64, 27, 4)
    assert (costs[1].rows, costs[1].n_in, costs[1].n_out) == (2 * 16, 36, 6)
    assert total == 2 * 128 * 27 * 4 + 3 * 32 * 36 * 6


def test_attention_products_are_counted_for_the_vit():
    vit = build_model("vit", (1, 8, 8), 10, patch=4, dim=16, depth=1, heads=2, mlp_ratio=2)
    x = torch.randn(3, 1, 8, 8)
    _, _, att = step_macs(vit, x)
    tokens, heads, dh = 5, 2, 8  # 4 patches + class token
    assert att == 3 * (3 * heads * tokens) * tokens * (dh + dh)
    assert torch.nn.functional.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"
