"""Fully connected network: the paper's MLP (Fig. 3a-d, 4 hidden layers of 512, ReLU)."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

from torch import nn

from raftorch.models import checks


class MLP(nn.Sequential):
    r"""Multi-layer perceptron on flattened inputs.

    ``h_{l+1} = ReLU(BN(W_l h_l + b_l))`` for each hidden layer, logits ``W_L h_L + b_L``.

    Args:
        input_shape: shape of one input, e.g. ``(3, 32, 32)``; it is flattened.
        num_classes: number of outputs.
        hidden: widths of the hidden layers (paper: ``(512, 512, 512, 512)``); one number is
            one layer, an empty list none (a linear classifier).
        batchnorm: insert ``BatchNorm1d`` between each hidden ``Linear`` and its ReLU
            (the authors' code does; the paper's text does not mention it).
        dropout: dropout probability after each hidden ReLU (0: none).

    Shape:
        Input ``(N, *input_shape)``, output ``(N, num_classes)``.

    The linear maps are named ``fc1 ... fcL`` and ``out`` (``ranks={"fc2": 10}`` in
    :func:`raftorch.convert` limits the feedback into layer 1's output).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 hidden: Sequence[int] = (512, 512, 512, 512), batchnorm: bool = False,
                 dropout: float = 0.0):
        hidden, batchnorm, dropout = MLP.check(input_shape, num_classes, hidden, batchnorm, dropout)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["flatten"] = nn.Flatten()
        width = math.prod(input_shape)
        for i, h in enumerate(hidden, start=1):
            layers[f"fc{i}"] = nn.Linear(width, h)
            if batchnorm:
                layers[f"bn{i}"] = nn.BatchNorm1d(h)
            layers[f"relu{i}"] = nn.ReLU()
            if dropout > 0:
                layers[f"drop{i}"] = nn.Dropout(dropout)
            width = h
        layers["out"] = nn.Linear(width, num_classes)
        super().__init__(layers)

    @staticmethod
    def check(input_shape: Sequence[int], num_classes: int, hidden, batchnorm,
              dropout) -> tuple[tuple[int, ...], bool, float]:
        """The options as the constructor uses them; a ``ValueError`` naming the first bad one."""
        checks.input_shape("mlp", input_shape)
        checks.classes("mlp", num_classes)
        return (checks.widths("mlp", "hidden", hidden, "[512,512]", allow_empty=True),
                checks.flag("mlp", "batchnorm", batchnorm), checks.probability("mlp", "dropout", dropout))
