"""Vision transformer (paper Fig. 3f): every map is an ``nn.Linear`` that ``convert()`` reaches."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raftorch.models import checks


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
        patch, dim, depth, heads, mlp_ratio, dropout = ViT.check(
            input_shape, num_classes, patch, dim, depth, heads, mlp_ratio, dropout)
        c, h, w = input_shape
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

    @staticmethod
    def check(input_shape: Sequence[int], num_classes: int, patch, dim, depth, heads, mlp_ratio,
              dropout) -> tuple[int, int, int, int, float, float]:
        """The options as the constructor uses them; a ``ValueError`` naming the first bad one
        (a patch that does not divide the image: with the patch sizes that do)."""
        _, h, w = checks.image_shape("vit", input_shape)
        checks.classes("vit", num_classes)
        patch = checks.whole("vit", "patch", patch, 4)
        dim = checks.whole("vit", "dim", dim, 384)
        depth = checks.whole("vit", "depth", depth, 7, minimum=0)
        heads = checks.whole("vit", "heads", heads, 4)
        mlp_ratio = checks.positive("vit", "mlp_ratio", mlp_ratio, "2")
        dropout = checks.probability("vit", "dropout", dropout)
        if h % patch or w % patch:
            fits = [p for p in range(1, min(h, w) + 1) if h % p == 0 and w % p == 0]
            raise ValueError(f"vit: model option patch={patch} does not divide the {h}x{w} images; choose "
                             f"a patch that does ({', '.join(map(str, fits))}), or an --image-size that is "
                             f"a multiple of {patch}")
        if dim % heads:
            raise ValueError(f"vit: model option dim={dim} must be divisible by heads={heads}; e.g. "
                             f"--model-option dim={heads * max(1, round(dim / heads))}")
        if int(round(dim * mlp_ratio)) < 1:
            raise ValueError(f"vit: model option mlp_ratio={mlp_ratio} leaves the MLP blocks no hidden unit "
                             f"(dim x mlp_ratio rounds to 0); e.g. --model-option mlp_ratio=2")
        return patch, dim, depth, heads, mlp_ratio, dropout

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
