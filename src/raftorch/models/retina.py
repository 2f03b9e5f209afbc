"""Retina-VVS network of Lindsey et al. (2019), as in the paper's Table C2 (Fig. 4c-d)."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

from torch import Tensor, nn

from raftorch.models import checks


class RetinaVVS(nn.Module):
    r"""Two retinal and three "ventral visual stream" convolutions, then a classifier.

    ``retina``: ``Conv2d(C_in -> channels, 9x9) -> ReLU -> Conv2d(channels -> bottleneck, 9x9) -> ReLU``;
    ``vvs``: ``vvs_layers`` x ``Conv2d(9x9, channels) -> ReLU``; ``classifier``:
    ``Linear(channels*H*W -> fc) -> ReLU -> Dropout -> Linear(fc -> classes)``.
    All convolutions have stride 1 and padding ``kernel // 2`` (4 for 9x9), so the image size
    is kept (Lindsey et al., paper Table C2).

    Args:
        input_shape: ``(C, H, W)``, grayscale in the paper (``C = 1``).
        num_classes: number of outputs.
        channels: width of every convolution except the retina's output (paper: 32).
        bottleneck: channels of the retina's output, the retina -> VVS bottleneck
            (paper: 32 = no bottleneck for the RAF runs, 4 for the dRAF variant).
        kernel: convolution kernel size (paper: 9).
        vvs_layers: number of VVS convolutions (paper: 3).
        fc: width of the hidden fully connected layer (paper: 1024).
        dropout: classifier dropout probability (paper: value not given; 0.5 here).

    Shape:
        Input ``(N, C, H, W)``, output ``(N, num_classes)``.

    Module names: ``retina.conv1``, ``retina.conv2``, ``vvs.conv1 ...``, ``classifier.fc1``,
    ``classifier.fc2``. The feedback *into* the retina is that of ``vvs.conv1`` (it carries the
    error from the VVS back to the retina's output): ``ranks={"vvs.conv1": r}``.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: int = 32,
                 bottleneck: int = 32, kernel: int = 9, vvs_layers: int = 3, fc: int = 1024,
                 dropout: float = 0.5):
        super().__init__()
        channels, bottleneck, kernel, vvs_layers, fc, dropout = RetinaVVS.check(
            input_shape, num_classes, channels, bottleneck, kernel, vvs_layers, fc, dropout)
        c_in, h, w = input_shape
        pad = kernel // 2
        conv = lambda i, o: nn.Conv2d(i, o, kernel_size=kernel, padding=pad)  # noqa: E731
        self.retina = nn.Sequential(OrderedDict([
            ("conv1", conv(c_in, channels)), ("relu1", nn.ReLU()),
            ("conv2", conv(channels, bottleneck)), ("relu2", nn.ReLU()),
        ]))
        vvs: OrderedDict[str, nn.Module] = OrderedDict()
        c = bottleneck
        for i in range(1, vvs_layers + 1):
            vvs[f"conv{i}"] = conv(c, channels)
            vvs[f"relu{i}"] = nn.ReLU()
            c = channels
        self.vvs = nn.Sequential(vvs)
        self.classifier = nn.Sequential(OrderedDict([
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(c * math.prod(self._out_hw(h, w, kernel, pad, 2 + vvs_layers)), fc)),
            ("relu", nn.ReLU()),
            ("dropout", nn.Dropout(dropout)),
            ("fc2", nn.Linear(fc, num_classes)),
        ]))

    @staticmethod
    def check(input_shape: Sequence[int], num_classes: int, channels, bottleneck, kernel, vvs_layers, fc,
              dropout) -> tuple[int, int, int, int, int, float]:
        """The options as the constructor uses them; a ``ValueError`` naming the first bad one."""
        checks.image_shape("retina", input_shape)
        checks.classes("retina", num_classes)
        return (checks.whole("retina", "channels", channels, 32),
                checks.whole("retina", "bottleneck", bottleneck, 4),
                checks.whole("retina", "kernel", kernel, 9),
                checks.whole("retina", "vvs_layers", vvs_layers, 3, minimum=0),
                checks.whole("retina", "fc", fc, 1024),
                checks.probability("retina", "dropout", dropout))

    @staticmethod
    def _out_hw(h: int, w: int, kernel: int, pad: int, n: int) -> tuple[int, int]:
        for _ in range(n):
            h, w = h + 2 * pad - kernel + 1, w + 2 * pad - kernel + 1
        return h, w

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.vvs(self.retina(x)))
