r"""Multiply-adds of one training step, counted per layer from the shapes (the arithmetic limit
of a rule's speed-up, which the benchmarks compare with measured step times).

For a weight layer that sees ``M`` rows (samples x tokens, or samples x output pixels for a
convolution) with ``n_in`` inputs (``C_in k^2`` for a convolution) and ``n_out`` outputs:

* forward: ``M n_in n_out``; ``grad_W``: ``M n_in n_out`` (every rule);
* input gradient: BP, FA, KP ``M n_in n_out``; low rank ``r``: ``M r (n_out + n_in)``
  (``z = g P^T``, then ``z Q^T``; for a convolution the 1x1 ``P`` and the transposed
  convolution with ``Q``);
* the feedback's own learning: ``grad_Q`` ``M n_in r`` (``raf-q``, ``raf``), Oja's products
  ``M r n_out + M r^2 + r^2 n_out`` (``raf``); ``grad_B`` of ``kp`` is ``grad_W``'s transpose
  (no extra products);
* the first layer computes no input gradient (its input needs none) under any rule.

Attention products (``q k^T`` and ``a v``: ``2 N T^2 D`` forward, twice that backward) are
counted for modules that call :func:`torch.nn.functional.scaled_dot_product_attention` through
:func:`step_macs`'s hook; norms, activations and the optimizer are left out (the same for
every rule).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LayerCost:
    name: str
    rows: int  # M
    n_in: int
    n_out: int
    rank: int | None  # None: a full-rank path (BP, FA, KP)
    learns: tuple[str, ...]  # feedback parameters that learn ("Q", "P", "B")
    first: bool

    def macs(self) -> int:
        """Multiply-adds of this layer in one training step: forward and ``grad_W``, the input gradient (not for
        the first layer) and the learning of ``Q`` / ``P``, as the module docstring counts them."""
        m, a, b = self.rows, self.n_in, self.n_out
        total = 2 * m * a * b  # forward and grad_W
        if not self.first:
            total += m * a * b if self.rank is None else m * self.rank * (a + b)
        if self.rank is not None and "Q" in self.learns:
            total += m * a * self.rank
        if self.rank is not None and "P" in self.learns:
            r = self.rank
            total += m * r * b + m * r * r + r * r * b
        return total


def _layer_cost(name: str, module: nn.Module, inp: Tensor, out: Tensor, first: bool) -> LayerCost:
    from raftorch.layers import FeedbackLayer

    if isinstance(module, nn.Conv2d):
        rows = out.shape[0] * math.prod(out.shape[2:])
        n_in = module.in_channels // module.groups * math.prod(module.kernel_size)
        n_out = module.out_channels
    else:
        rows = math.prod(out.shape[:-1])
        n_in, n_out = module.in_features, module.out_features
    rank, learns = None, ()
    if isinstance(module, FeedbackLayer) and module.rule.path == "lowrank":
        rank, learns = module.rank, tuple(module.rule.learns)
    return LayerCost(name, int(rows), int(n_in), int(n_out), rank, learns, first)


def step_macs(model: nn.Module, x: Tensor) -> tuple[int, list[LayerCost], int]:
    """(total multiply-adds of a training step, per-layer costs, attention-product MACs) of
    ``model`` on the batch ``x`` under its current rules (one forward pass to read the shapes;
    no gradient is computed). The first weight layer to run is marked ``first``."""
    costs: list[LayerCost] = []
    attention = 0
    handles = []

    def hook(name):
        def f(module, args, output):
            costs.append(_layer_cost(name, module, args[0], output, first=not costs))
        return f

    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            handles.append(m.register_forward_hook(hook(name)))
    real_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, *args, **kwargs):
        nonlocal attention
        n_tq, d = math.prod(q.shape[:-1]), q.shape[-1]
        attention += 3 * n_tq * k.shape[-2] * (d + v.shape[-1])  # forward 1x, backward 2x
        return real_sdpa(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = counting_sdpa
    try:
        with torch.no_grad():
            model(x)
    finally:
        F.scaled_dot_product_attention = real_sdpa
        for h in handles:
            h.remove()
    return sum(c.macs() for c in costs) + attention, costs, attention
