"""VGG-like convolutional network of the paper's Table C1 (Fig. 3e, 4a-b)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import Tensor, nn

from raftorch.models import checks


class VGG(nn.Module):
    r"""Four blocks of two 3x3 convolutions, then a small classifier (paper, Table C1).

    Each convolution is ``Conv2d(3x3, padding=1) -> ReLU -> BatchNorm2d`` (the table's order).
    Blocks 1-3 end with a 2x2 max-pool, block 4 with an adaptive average pool to 1x1;
    the classifier is ``Linear(C_4, fc) -> ReLU -> Dropout -> Linear(fc, classes)``.

    Args:
        input_shape: ``(C, H, W)`` of one image.
        num_classes: number of outputs.
        widths: channels of the four blocks (paper: ``(64, 128, 256, 512)``).
        width_mult: multiplies every width (and ``fc``), e.g. ``0.25`` for a CPU-sized
            net with blocks 16-32-64-128; must be > 0. Widths are rounded, never below 1.
        fc: width of the hidden fully connected layer (paper: 256).
        dropout: dropout probability in the classifier (the paper's value is not given; 0.5).
        bn_before_relu: ``Conv2d -> BatchNorm2d -> ReLU`` instead of the table's order (the
            common VGG-BN order; an ablation of where the normalisation sits).

    Shape:
        Input ``(N, C, H, W)`` with ``H, W >= 8`` (three 2x2 pools; ``2 ** (len(widths) - 1)`` in
        general: :meth:`check` says so before anything is built), output ``(N, num_classes)``.

    Module names: ``features.block{b}.conv{1,2}`` and ``classifier.fc1`` / ``classifier.fc2``,
    so ``ranks={"features.block4.*": r}`` limits the feedback of the 512-channel block.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 widths: Sequence[int] = (64, 128, 256, 512), width_mult: float = 1.0,
                 fc: int = 256, dropout: float = 0.5, bn_before_relu: bool = False):
        super().__init__()
        widths, width_mult, fc, dropout, bn_before_relu = VGG.check(
            input_shape, num_classes, widths, width_mult, fc, dropout, bn_before_relu)
        scale = lambda w: max(1, int(round(w * width_mult)))  # noqa: E731
        self.widths = tuple(scale(w) for w in widths)
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        c_in = input_shape[0]
        for b, w in enumerate(self.widths, start=1):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            for i in (1, 2):
                layers[f"conv{i}"] = nn.Conv2d(c_in, w, kernel_size=3, padding=1)
                if bn_before_relu:
                    layers[f"bn{i}"] = nn.BatchNorm2d(w)
                    layers[f"relu{i}"] = nn.ReLU()
                else:
                    layers[f"relu{i}"] = nn.ReLU()
                    layers[f"bn{i}"] = nn.BatchNorm2d(w)
                c_in = w
            if b < len(self.widths):
                layers["pool"] = nn.MaxPool2d(2)
            blocks[f"block{b}"] = nn.Sequential(layers)
        blocks["avgpool"] = nn.AdaptiveAvgPool2d(1)
        self.features = nn.Sequential(blocks)
        hidden = scale(fc)
        self.classifier = nn.Sequential(OrderedDict([
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(c_in, hidden)),
            ("relu", nn.ReLU()),
            ("dropout", nn.Dropout(dropout)),
            ("fc2", nn.Linear(hidden, num_classes)),
        ]))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    @staticmethod
    def check(input_shape: Sequence[int], num_classes: int, widths, width_mult, fc, dropout,
              bn_before_relu) -> tuple[tuple[int, ...], float, int, float, bool]:
        """The options as the constructor uses them; a ``ValueError`` naming the first bad one,
        and one for images too small for the pools, with the smallest size that works."""
        _, h, w = checks.image_shape("vgg", input_shape)
        checks.classes("vgg", num_classes)
        widths = checks.widths("vgg", "widths", widths, "[16,32,64,128]", allow_empty=False)
        width_mult = checks.positive("vgg", "width_mult", width_mult, "0.25")
        fc = checks.whole("vgg", "fc", fc, 256)
        dropout = checks.probability("vgg", "dropout", dropout)
        bn_before_relu = checks.flag("vgg", "bn_before_relu", bn_before_relu)
        pools = len(widths) - 1
        smallest = 2 ** pools
        if min(h, w) < smallest:
            raise ValueError(f"vgg: {h}x{w} images are too small for its {pools} max-pools of 2x2 (each "
                             f"halves the image); the smallest size that works is {smallest}x{smallest}: "
                             f"use --image-size {smallest} or more" + (", or fewer widths" if pools else ""))
        return widths, width_mult, fc, dropout, bn_before_relu
