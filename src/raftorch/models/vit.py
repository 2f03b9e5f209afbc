"""Vision transformer (paper Fig. 3f): every map is an ``nn.Linear`` that ``convert()`` reaches."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    r"""Multi-head self-attention with separate ``q``, ``k``, ``v`` and ``proj`` linear maps.

    ``softmax(Q K^T / sqrt(d_head)) V`` per head, heads concatenated, then ``proj``.
    The attention product keeps its exact autograd backward; only the four maps are
    converted, so each can have its own feedback rank.

    Shape: input and output ``(N, T, dim)``.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"vit: dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        split = lambda y: y.view(n, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class MLPBlock(nn.Module):
    """``fc2(dropout(GELU(fc1(x))))``, hidden width ``dim * mlp_ratio``."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm encoder block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, int(round(dim * mlp_ratio)), dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    r"""Vision transformer with a class token and learned positions (Dosovitskiy et al. 2020).

    The image is cut into non-overlapping ``patch x patch`` patches, each flattened and mapped
    by ``patch_embed`` (an ``nn.Linear``, not a convolution, so every map of the model is a
    linear layer); a learned class token is prepended, learned positions added, ``depth``
    pre-norm blocks applied, and ``head`` reads the final-LayerNorm'd class token.

    Args:
        input_shape: ``(C, H, W)``; ``H`` and ``W`` must be multiples of ``patch``.
        num_classes: number of outputs.
        patch: patch side (paper: 4).
        dim: embedding width (paper: 384).
        depth: number of blocks (paper: 7; authors' code: 8).
        heads: attention heads (paper: 4; authors' code: 8).
        mlp_ratio: MLP hidden width / dim (paper: not given; authors' code: 2).
        dropout: dropout in attention, MLP and residual branches (paper: "dropout", value
            not given).

    Shape:
        Input ``(N, C, H, W)``, output ``(N, num_classes)``.

    Module names: ``patch_embed``, ``blocks.{i}.attn.{q,k,v,proj}``, ``blocks.{i}.mlp.{fc1,fc2}``,
    ``head``.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, patch: int = 4,
                 dim: int = 384, depth: int = 7, heads: int = 4, mlp_ratio: float = 2.0,
                 dropout: float = 0.0):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"vit needs image inputs (C, H, W), got input shape {tuple(input_shape)}")
        c, h, w = input_shape
        if h % patch or w % patch:
            raise ValueError(f"vit: image size {h}x{w} is not a multiple of patch={patch}; "
                             f"choose a patch size that divides it")
        self.patch = patch
        tokens = (h // patch) * (w // patch)
        self.patch_embed = nn.Linear(c * patch * patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def patchify(self, x: Tensor) -> Tensor:
        """``(N, C, H, W) -> (N, H/p * W/p, C * p * p)``, patches in row-major order."""
        n, c, h, w = x.shape
        p = self.patch
        x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, (h // p) * (w // p), c * p * p)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(self.patchify(x))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.blocks(self.drop(x + self.pos_embed))
        return self.head(self.norm(x[:, 0]))
