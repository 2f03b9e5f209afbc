"""raftorch: train neural networks with low-dimensional error feedback.

>>> import torch, raftorch
>>> net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
>>> net = raftorch.convert(net, rule="raf", rank=10)
"""
from raftorch import metrics
from raftorch.convert import ConversionReport, RaftorchConversionWarning, convert, describe, feed_targets
from raftorch.direct import DirectFeedback
from raftorch.attention import MultiheadAttention
from raftorch.layers import Conv1d, Conv2d, Linear
from raftorch.control import output_layer
from raftorch.rules import CONTROL_RULES, RULES, get_rule
from raftorch.scaling import loss_scale, sync_oja

__version__ = "0.1.0"
__all__ = ["Linear", "Conv1d", "Conv2d", "MultiheadAttention", "convert", "describe", "feed_targets",
           "metrics", "RULES", "get_rule", "ConversionReport", "RaftorchConversionWarning", "DirectFeedback",
           "loss_scale", "sync_oja", "CONTROL_RULES", "output_layer"]
