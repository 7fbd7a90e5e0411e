"""Small CNNs for 28x28 grayscale data (Fashion-MNIST, MNIST) and other small images.

The teacher/student pair matches the one measured in ``shared/perf-notes.md``: conv-BN-ReLU x2 at
``c1`` channels, 2x2 max-pool, x2 at ``c2`` channels, 2x2 max-pool, flatten, linear. For multi-label
images a translation-invariant head (``pool``) or L2D's label-query head (``queries``) replaces the last two.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from kdkit.models.registry import register_model


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class LabelQueryHead(nn.Module):
    """A label-query head: ``K`` learned label queries cross-attend over the feature map's positions.

    The ML-Decoder-style head of L2D's official code (Yang et al., ICCV 2023), reduced to one attention
    layer: the map ``(B, C, H, W)`` is projected to ``D`` channels, each label's query attends over the
    ``H x W`` positions (multi-head attention, residual, LayerNorm), giving the label-wise embedding
    ``e_k`` ``(D,)``; the label's logit is ``w_k . e_k + b_k`` (one weight vector per label, ML-Decoder's
    group-wise linear layer). The embeddings ``(B, K, D)`` are the tap ``label_embeddings`` that L2D's
    relation loss (``label_relation``) compares.

    Args:
        channels: Channels ``C`` of the feature map.
        num_classes: Labels ``K``.
        dim: Embedding width ``D``.
        heads: Attention heads (``D`` must be divisible by it).
    """

    def __init__(self, channels: int, num_classes: int, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.project = nn.Conv2d(channels, dim, 1)
        self.queries = nn.Parameter(torch.randn(num_classes, dim) * 0.02)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.embeddings = nn.Identity()  # where the label-wise embeddings are tapped
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * dim**-0.5)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, features: Tensor) -> Tensor:
        """Logits ``(B, K)`` for a feature map ``(B, C, H, W)``."""
        memory = self.project(features).flatten(2).transpose(1, 2)  # (B, HW, D)
        queries = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1).to(memory.dtype)
        attended, _ = self.attention(queries, memory, memory, need_weights=False)
        embeddings = self.embeddings(self.norm(attended + queries))
        return (embeddings * self.weight).sum(-1) + self.bias


class SmallCNN(nn.Module):
    """Two conv stages and a classifier head.

    Args:
        num_classes: Output classes.
        in_channels: Image channels (1 for Fashion-MNIST).
        image_size: Input height/width; sets the flatten head's input size.
        widths: Channels of the two stages.
        head: ``flatten`` (flatten + linear, position-aware), ``pool`` (global average pool + linear,
            translation-invariant) or ``queries`` (:class:`LabelQueryHead`, label-wise embeddings for
            multi-label distillation).
        channels: The input channels the network reads (e.g. one modality of ``two_modalities`` images, where
            channel ``C`` is the edges); ``None``: all ``in_channels``.

    Raises:
        ValueError: A channel is not below ``in_channels``, is repeated, or none is given.
    """

    def __init__(self, *, num_classes: int, in_channels: int, image_size: int, widths: tuple[int, int],
                 head: Literal["flatten", "pool", "queries"] = "flatten",
                 channels: tuple[int, ...] | None = None) -> None:
        super().__init__()
        c1, c2 = widths
        if channels is not None:
            if not channels or len(set(channels)) != len(channels) or not all(0 <= c < in_channels for c in channels):
                raise ValueError(f"channels {list(channels)} must be distinct input channels in 0..{in_channels - 1} "
                                 f"(the data has {in_channels}); e.g. [0] for the image of two_modalities data")
            self.register_buffer("channels", torch.tensor(channels, dtype=torch.int64), persistent=False)
            in_channels = len(channels)
        else:
            self.channels = None
        self.stage1 = nn.Sequential(_conv_bn_relu(in_channels, c1), _conv_bn_relu(c1, c1), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(_conv_bn_relu(c1, c2), _conv_bn_relu(c2, c2), nn.MaxPool2d(2))
        self.head_kind = head
        self.feature_taps = {"stage1": "stage1", "stage2": "stage2"}
        if head == "queries":
            self.head = LabelQueryHead(c2, num_classes)
            self.feature_taps["label_embeddings"] = "head.embeddings"
        else:  # the classifier keeps the name `fc` (checkpoints of the flatten head predate the option)
            side = 1 if head == "pool" else image_size // 4
            self.fc = nn.Linear(c2 * side * side, num_classes)
            self.feature_taps["penultimate"] = "fc:input"

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape (B, num_classes) for images (B, C, H, W)."""
        if self.channels is not None:
            x = x.index_select(1, self.channels)
        features = self.stage2(self.stage1(x))
        if self.head_kind == "queries":
            return self.head(features)
        return self.fc(features.mean((2, 3)) if self.head_kind == "pool" else features.flatten(1))


@register_model("cnn_teacher", help="small CNN teacher for 28x28 images (32/64 channels, ~97k params)")
def cnn_teacher(*, num_classes: int, in_channels: int = 1, image_size: int = 28, width: int = 32,
                head: Literal["flatten", "pool", "queries"] = "flatten",
                channels: tuple[int, ...] | None = None) -> SmallCNN:
    """Small CNN teacher: stages of ``width`` and ``2*width`` channels (``head``, ``channels``: see
    :class:`SmallCNN`)."""
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, image_size=image_size, widths=(width, 2 * width),
                    head=head, channels=channels)


@register_model("cnn_student", help="small CNN student for 28x28 images (8/16 channels, ~12k params)")
def cnn_student(*, num_classes: int, in_channels: int = 1, image_size: int = 28, width: int = 8,
                head: Literal["flatten", "pool", "queries"] = "flatten",
                channels: tuple[int, ...] | None = None) -> SmallCNN:
    """Small CNN student: stages of ``width`` and ``2*width`` channels (``head``, ``channels``: see
    :class:`SmallCNN`)."""
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, image_size=image_size, widths=(width, 2 * width),
                    head=head, channels=channels)
