"""Measurements of how a feedback path relates to backprop's."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from raftorch.convert import feedback_layers


def angle_degrees(a: Tensor, b: Tensor) -> float:
    """Angle between two tensors seen as flat vectors, in degrees (0 = same direction)."""
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    denom = a.norm() * b.norm()
    if denom == 0:
        return float("nan")
    cos = torch.clamp(a @ b / denom, -1.0, 1.0)
    return math.degrees(math.acos(cos.item()))


def alignment_angles(model: nn.Module) -> dict[str, float]:
    """Per raftorch layer, the angle in degrees between its feedback matrix ``B`` and the
    weight's transpose ``W^T``, both flattened (as BioTorch and the Kolen-Pollack literature
    measure it). 0 for bp; about 90 for random feedback."""
    return {name or "<root>": angle_degrees(layer.feedback_matrix(), layer.weight_transpose())
            for name, layer in feedback_layers(model)}
