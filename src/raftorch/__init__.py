"""raftorch: train neural networks with low-dimensional error feedback.

>>> import torch, raftorch
>>> net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
>>> net = raftorch.convert(net, rule="raf", rank=10)
"""
from raftorch import metrics
from raftorch.convert import ConversionReport, RaftorchConversionWarning, convert, describe, feed_targets
from raftorch.direct import DirectFeedback
from raftorch.layers import Conv2d, Linear
from raftorch.rules import RULES, get_rule
from raftorch.scaling import loss_scale

__version__ = "0.1.0"
__all__ = ["Linear", "Conv2d", "convert", "describe", "feed_targets", "metrics", "RULES",
           "get_rule", "ConversionReport", "RaftorchConversionWarning", "DirectFeedback",
           "loss_scale"]
