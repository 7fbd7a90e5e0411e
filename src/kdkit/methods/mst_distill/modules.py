"""MST-Distill's networks: the masking module of a teacher's feature map and the routing network (gate)."""

from __future__ import annotations

from torch import Tensor, nn


class MaskNet(nn.Module):
    """A per-sample, per-channel soft mask of a ``(B, C, H, W)`` feature map (the official ``MaskNet_2d``).

    Spatial reduction (depthwise 3x3 stride-2 convolution, 1x1 convolution, BatchNorm, ReLU, global average pool)
    to ``(B, C)``; each channel's value is embedded to ``hidden`` dimensions (one linear layer to ``C * hidden``),
    the ``C`` channel tokens attend to each other (multi-head self-attention), and a linear layer and a sigmoid
    give one mask value per channel.

    Args:
        channels: ``C``.
        heads: Attention heads (the official ``--mask_head_num``, 3).
        hidden_factor: ``hidden = C // (hidden_factor * heads) * heads`` (the official ``--hidden_dim_factor``, 2).
    """

    def __init__(self, channels: int, heads: int = 3, hidden_factor: int = 2) -> None:
        super().__init__()
        self.channels = channels
        self.hidden = max(1, channels // (hidden_factor * heads)) * heads
        self.reduce = nn.Sequential(
            nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False),
            nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Linear(channels, channels * self.hidden)
        self.attention = nn.MultiheadAttention(self.hidden, heads, batch_first=True)
        self.out = nn.Linear(self.hidden, 1)

    def forward(self, features: Tensor) -> Tensor:
        """The mask ``(B, C)`` in ``(0, 1)`` of ``(B, C, H, W)`` features."""
        tokens = self.embed(self.reduce(features)).view(len(features), self.channels, self.hidden)
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.out(attended).squeeze(-1).sigmoid()


class GateNet(nn.Module):
    """The instance-level routing network: two linear layers (no activation between them, as the official
    ``GateNet``) from the student's ``(B, K)`` logits to one score per specialised teacher ``(B, M)``."""

    def __init__(self, classes: int, ways: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(classes, 2 * classes), nn.Linear(2 * classes, ways))

    def forward(self, logits: Tensor) -> Tensor:
        """Routing scores ``(B, M)`` (softmax them for the routing probabilities)."""
        return self.layers(logits)
