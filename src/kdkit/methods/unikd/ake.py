"""UniKD's Adaptive Knowledge Extractor (AKE): a small DETR-style decoder whose fixed set of learnt queries reads the
FPN levels through multi-scale deformable cross-attention and yields the *knowledge embeddings*.

Per decoder layer ``j`` (Deformable DETR's decoder with iterative box refinement, DAB-DETR's box queries):

* the positional query is ``pos_j = MLP(sine(b_{j-1}))``, an embedding of the query's current box
  ``b_{j-1} = (cx, cy, w, h)`` (``b_0``: a learnt box per query);
* the content query ``c_j`` comes from self-attention of the queries (``q = k = c + pos``), deformable
  cross-attention at the box centre over every level, and an FFN, each residual and layer-normalised;
* the box is refined, ``b_j = sigmoid(logit(b_{j-1}) + MLP_j(c_j))`` (the input box detached after the first layer, as
  Deformable DETR).

The knowledge embeddings of layer ``j`` are its content embeddings ``c_j`` and the positional embeddings of its
refined boxes ``MLP(sine(b_j))``: what UniKD's distillation compares (see :mod:`kdkit.methods.unikd`).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from kdkit.methods.unikd.deform import DeformableAttention


class Knowledge(NamedTuple):
    """What an AKE extracts from one batch of feature maps, stacked over the decoder layers.

    Attributes:
        content: ``(layers, B, N, dim)`` content embeddings.
        position: ``(layers, B, N, dim)`` positional embeddings of the refined boxes.
        boxes: ``(layers, B, N, 4)`` refined boxes ``(cx, cy, w, h)`` in ``[0, 1]`` image coordinates.
    """

    content: Tensor
    position: Tensor
    boxes: Tensor


def sine_embedding(boxes: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """``(..., 2 * dim)`` sine/cosine embedding of boxes ``(..., 4)`` in ``[0, 1]``: ``dim / 2`` features per
    coordinate, at wavelengths ``2 pi T^{2i/F}`` (the Transformer's encoding, scaled by ``2 pi`` as DETR's)."""
    half = dim // 2
    freqs = temperature ** (2 * torch.div(torch.arange(half, device=boxes.device), 2, rounding_mode="floor") / half)
    angles = boxes.unsqueeze(-1) * (2 * math.pi) / freqs.to(boxes.dtype)  # (..., 4, half)
    return torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1).flatten(-3)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``logit(x)`` with ``x`` clamped to ``[eps, 1 - eps]`` (a box at the border stays finite)."""
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers of ``sizes`` with ReLUs between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DecoderLayer(nn.Module):
    """Self-attention of the queries, deformable cross-attention over the levels, FFN (post-norm, as DETR's)."""

    def __init__(self, dim: int, levels: int, heads: int, points: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = DeformableAttention(dim, levels, heads, points)
        self.ffn = mlp([dim, ffn, dim])
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))

    def forward(self, content: Tensor, pos: Tensor, reference: Tensor, maps: list[Tensor]) -> Tensor:
        """Updated content ``(B, N, dim)`` of queries ``content + pos`` at ``reference`` ``(B, N, 2)``."""
        q = content + pos
        content = self.norms[0](content + self.self_attn(q, q, content, need_weights=False)[0])
        content = self.norms[1](content + self.cross_attn(content + pos, reference, maps))
        return self.norms[2](content + self.ffn(content))


class AdaptiveKnowledgeExtractor(nn.Module):
    """The AKE (see the module docstring).

    Args:
        channels: Channels of each input level (the teacher's FPN widths; a student is adapted to them).
        dim: Width of the queries and embeddings.
        queries: Number of learnt queries ``N`` (knowledge embeddings per layer).
        layers: Decoder layers.
        heads: Attention heads.
        points: Sampled points per head and level.
        ffn: Hidden width of the FFN.
    """

    def __init__(self, channels: list[int], dim: int = 32, queries: int = 20, layers: int = 2, heads: int = 4,
                 points: int = 4, ffn: int = 64) -> None:
        super().__init__()
        self.dim = dim
        # each level to `dim` channels (Deformable DETR: 1x1 conv + GroupNorm), plus a learnt level embedding
        self.inputs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, dim, 1), nn.GroupNorm(min(8, dim), dim))
                                    for c in channels)
        self.level_embed = nn.Parameter(torch.randn(len(channels), dim) * 0.02)
        self.content = nn.Parameter(torch.randn(queries, dim) * 0.02)
        # initial boxes spread over the image (logits of uniform centres, a fifth of the image wide)
        self.box = nn.Parameter(inverse_sigmoid(torch.cat([torch.rand(queries, 2), torch.full((queries, 2), 0.2)], 1)))
        self.pos_mlp = mlp([2 * dim, dim, dim])
        self.layers = nn.ModuleList(DecoderLayer(dim, len(channels), heads, points, ffn) for _ in range(layers))
        self.box_heads = nn.ModuleList(mlp([dim, dim, dim, 4]) for _ in range(layers))
        for head in self.box_heads:  # refinement starts as the identity
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)

    def position(self, boxes: Tensor) -> Tensor:
        """Positional embeddings ``(..., dim)`` of boxes ``(..., 4)``."""
        return self.pos_mlp(sine_embedding(boxes, self.dim))

    def forward(self, features: list[Tensor]) -> Knowledge:
        """The knowledge embeddings of ``features`` (one ``(B, C_l, H_l, W_l)`` map per level, any sizes)."""
        batch = features[0].shape[0]
        maps = [proj(f) + emb.view(1, -1, 1, 1) for proj, emb, f in zip(self.inputs, self.level_embed, features,
                                                                           strict=True)]
        content = self.content.unsqueeze(0).expand(batch, -1, -1)
        contents, positions, refined = [], [], []
        reference = self.box.sigmoid().unsqueeze(0).expand(batch, -1, -1)  # learnt: trained through layer 1
        for layer, head in zip(self.layers, self.box_heads, strict=True):
            content = layer(content, self.position(reference), reference[..., :2], maps)
            boxes = (inverse_sigmoid(reference) + head(content)).sigmoid()
            contents.append(content)
            positions.append(self.position(boxes))
            refined.append(boxes)
            reference = boxes.detach()  # Deformable DETR: each layer refines the previous box, detached
        return Knowledge(torch.stack(contents), torch.stack(positions), torch.stack(refined))
