r"""Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021), written with ``grid_sample``.

Each query attends to a few sampled points per head and feature level instead of every position: around the
query's reference point ``p`` (normalised ``[0, 1]`` image coordinates, shared by every level) it samples
``P`` points per head ``h`` and level ``l`` at ``p + Δ_{hlk} / (W_l, H_l)`` (learnt offsets ``Δ`` in cells of
that level), bilinearly, and sums them with learnt weights ``A_{hlk}`` (softmax over the ``L * P`` points of a
head):

.. math:: \mathrm{MSDeformAttn}(z, p, \{x^l\}) = W_o \big[\ \sum_{l,k} A_{hlk}(z)\,
          W_v x^l\big(p + \Delta_{hlk}(z) / (W_l, H_l)\big)\ \big]_{h=1..H}

The sampling is ``torch.nn.functional.grid_sample`` (bilinear, ``align_corners=False``, zeros outside the map),
as the paper's pure-PyTorch reference (no compiled kernel): every device torch supports runs it, and float64
stays float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def deformable_sample(values: list[Tensor], locations: Tensor, weights: Tensor) -> Tensor:
    """The attention-weighted sum of bilinear samples of every level's value map.

    Args:
        values: One ``(B, H, D_h, h_l, w_l)`` value map per level (``H`` heads of ``D_h`` channels).
        locations: ``(B, N, H, L, P, 2)`` sampling points ``(x, y)`` in ``[0, 1]`` (0: the map's left/top edge,
            1: its right/bottom edge; a cell's centre is at ``(i + 0.5) / w_l``). Outside points read zeros.
        weights: ``(B, N, H, L, P)`` attention weights.

    Returns:
        ``(B, N, H * D_h)`` per query, the heads' outputs concatenated.
    """
    batch, queries, heads, levels, points, _ = locations.shape
    grids = 2 * locations - 1  # grid_sample's [-1, 1] with align_corners=False: -1 and 1 are the outer edges
    sampled = []
    for level, value in enumerate(values):
        _, _, dim, height, width = value.shape
        grid = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, queries, points, 2)
        sampled.append(F.grid_sample(value.reshape(batch * heads, dim, height, width), grid, mode="bilinear",
                                     padding_mode="zeros", align_corners=False))  # (B*H, D_h, N, P)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (B*H, D_h, N, L*P)
    w = weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (stacked * w).sum(-1)  # (B*H, D_h, N)
    return out.view(batch, heads * out.shape[1], queries).transpose(1, 2)


class DeformableAttention(nn.Module):
    """Multi-scale deformable cross-attention of queries over feature levels (see the module docstring).

    Args:
        dim: Width of the queries and of the (projected) feature maps.
        levels: Feature levels ``L``.
        heads: Attention heads ``H`` (``dim`` must be a multiple).
        points: Sampled points per head and level ``P``.
    """

    def __init__(self, dim: int, levels: int, heads: int, points: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"deformable attention: dim {dim} is not a multiple of heads {heads}")
        self.dim, self.levels, self.heads, self.points = dim, levels, heads, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation: offsets start on a ring of directions, one per head (the ``k``-th point
        ``k + 1`` cells out), and every point weighs the same."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.heads, dtype=torch.float32) * (2 * math.pi / self.heads)
        ring = torch.stack([angles.cos(), angles.sin()], -1)
        ring = ring / ring.abs().max(-1, keepdim=True).values
        ring = ring.view(self.heads, 1, 1, 2).repeat(1, self.levels, self.points, 1)
        ring *= torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(ring.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, reference: Tensor, maps: list[Tensor]) -> Tensor:
        """Attend from ``query`` ``(B, N, dim)`` at ``reference`` ``(B, N, 2)`` (normalised ``x, y``) over ``maps``
        (``L`` maps ``(B, dim, h_l, w_l)``, any sizes); returns ``(B, N, dim)``."""
        batch, queries, _ = query.shape
        heads, levels, points = self.heads, self.levels, self.points
        values = []
        for m in maps:
            v = self.value_proj(m.flatten(2).transpose(1, 2))  # (B, h*w, dim)
            values.append(v.transpose(1, 2).reshape(batch, heads, self.dim // heads, *m.shape[-2:]))
        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
        sizes = torch.tensor([[m.shape[-1], m.shape[-2]] for m in maps], dtype=query.dtype, device=query.device)
        locations = reference.view(batch, queries, 1, 1, 1, 2) + offsets / sizes.view(1, 1, 1, levels, 1, 2)
        weights = self.attention_weights(query).view(batch, queries, heads, levels * points).softmax(-1)
        out = deformable_sample(values, locations, weights.view(batch, queries, heads, levels, points))
        return self.output_proj(out)
