"""Meta-encoders ``v(x, t)`` of FM-KT: velocity fields on a ``(B, C, H, W)`` map, plus the time embedding.

The time enters additively, as in the released FM-KT code: ``v = encoder(x + time_mlp(sinusoidal(t)))``,
with the embedding broadcast over the spatial positions. Every encoder keeps the input's shape.

* ``conv`` -- ``SiLU, conv3x3, GroupNorm(1), SiLU, conv3x3`` (the paper's default CNN meta-encoder).
* ``mlp`` -- ``depth`` residual blocks ``LayerNorm(conv1x1, ReLU, conv1x1 + x)`` over channels (per position).
* ``transformer`` -- pre-norm blocks: multi-head self-attention over the ``H x W`` positions, then a
  1x1-conv MLP. (The released code uses shifted-window attention; on the small maps this toolkit taps,
  one window covers the map, so plain global attention is the same computation.)
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from kdkit.errors import KdkitError

EncoderName = Literal["conv", "mlp", "transformer"]


def sinusoidal(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features ``(N, dim)`` of times ``t`` ``(N,)``: ``[cos(t f_k), sin(t f_k)]``, ``f_k = P^(-k/half)``.

    Times are used as they are (``t`` in ``[0, 1]``), as in the released FM-KT code; an odd ``dim`` gets a
    zero last column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    out = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        out = torch.cat([out, out.new_zeros(out.shape[0], 1)], dim=1)
    return out


class TimeEmbedding(nn.Module):
    """``t -> Linear(ReLU(Linear(sinusoidal(t))))`` of width ``channels``, shaped ``(1, C, 1, 1)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(inplace=True), nn.Linear(channels, channels))

    def forward(self, t: float, like: Tensor) -> Tensor:
        """The embedding of time ``t`` (one for the whole batch), on ``like``'s device and dtype."""
        times = torch.full((1,), t, device=like.device)
        features = sinusoidal(times, self.channels).to(self.mlp[0].weight.dtype)
        return self.mlp(features).to(like.dtype).view(1, self.channels, 1, 1)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each position of a ``(B, C, H, W)`` map."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_encoder(channels: int) -> nn.Module:
    """The paper's CNN meta-encoder: ``SiLU, conv3x3, GroupNorm(1, C), SiLU, conv3x3`` (no biases)."""
    return nn.Sequential(
        nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.GroupNorm(1, channels),
        nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1, bias=False),
    )


class MLPBlock(nn.Module):
    """``LayerNorm(conv1x1(ReLU(conv1x1(x))) + x)``: a per-position residual MLP over channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 1, bias=False))
        self.norm = LayerNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.body(x) + x)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block on the ``H*W`` positions of a map: attention, then a 1x1-conv MLP."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm2 = LayerNorm2d(channels)
        self.mlp = nn.Sequential(nn.Conv2d(channels, 2 * channels, 1), nn.GELU(), nn.Conv2d(2 * channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        q = self.norm1(tokens)
        tokens = tokens + self.attn(q, q, q, need_weights=False)[0]
        x = tokens.transpose(1, 2).reshape(b, c, h, w)
        return x + self.mlp(self.norm2(x))


def build_encoder(name: str, channels: int, *, depth: int = 2, heads: int = 4) -> nn.Module:
    """The meta-encoder ``name`` for ``channels``-channel maps.

    Args:
        name: ``conv``, ``mlp`` or ``transformer``.
        channels: Channels ``C`` of the flowed map (the encoder keeps ``(C, H, W)``).
        depth: Blocks of the ``mlp`` and ``transformer`` encoders (the released code uses 2).
        heads: Attention heads of the ``transformer`` encoder (must divide ``C``).

    Raises:
        KdkitError: Unknown name, or heads that do not divide the channels.
    """
    if depth < 1:
        raise KdkitError(f"meta-encoder depth must be >= 1, got {depth}", fix="set encoder_depth: 2")
    if name == "conv":
        return conv_encoder(channels)
    if name == "mlp":
        return nn.Sequential(*[MLPBlock(channels) for _ in range(depth)])
    if name == "transformer":
        if heads < 1 or channels % heads:
            divisors = [str(d) for d in range(1, channels + 1) if channels % d == 0 and d <= 16]
            raise KdkitError(f"transformer meta-encoder: {heads} heads do not divide {channels} channels",
                             choices=divisors, fix="set encoder_heads to a divisor of the tap's channels")
        return nn.Sequential(*[TransformerBlock(channels, heads) for _ in range(depth)])
    raise KdkitError(f"unknown meta-encoder {name!r}", choices=["conv", "mlp", "transformer"], bad=name,
                     fix="use conv (default), mlp or transformer")


__all__ = ["EncoderName", "LayerNorm2d", "TimeEmbedding", "build_encoder", "conv_encoder", "sinusoidal"]
