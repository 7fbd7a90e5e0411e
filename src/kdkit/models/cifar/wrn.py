"""Wide residual networks (WRN-d-k) for CIFAR, as used in the CIFAR-100 KD benchmarks.

From Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016), in the form of the CRD / RepDistiller
and mdistiller model zoos: ``wrn_16_1``, ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2``. Module names match those
zoos (including ``convShortcut``), so their published CIFAR-100 teacher checkpoints load with
``load_state_dict``.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdkit.models.cifar._init import kaiming_init
from kdkit.models.registry import register_model


class WideBasicBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus a shortcut.

    When the channel count changes, the shortcut is a 1x1 convolution applied to the pre-activated
    input (BN-ReLU of ``x``), and so is the first 3x3 convolution; otherwise the shortcut is the
    identity of the raw input.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first convolution (and of the projection shortcut).
        drop_rate: Dropout probability between the two convolutions.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(drop_rate)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_channels == out_channels
        # The name (and its absence when unused) follows the reference zoo, for checkpoint compatibility.
        self.convShortcut: nn.Conv2d | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Block output (a residual sum, not activated) of shape (B, out_channels, H/stride, W/stride)."""
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(act)))))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return out + shortcut


class NetworkBlock(nn.Module):
    """One WRN stage: ``num_blocks`` wide basic blocks, the first one carrying the stride.

    Args:
        num_blocks: Number of blocks.
        in_channels: Input channels of the stage.
        out_channels: Channels of every block's output.
        stride: Stride of the first block.
        drop_rate: Dropout probability inside each block.
    """

    def __init__(self, num_blocks: int, in_channels: int, out_channels: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        blocks = [WideBasicBlock(in_channels, out_channels, stride, drop_rate)]
        blocks += [WideBasicBlock(out_channels, out_channels, 1, drop_rate) for _ in range(num_blocks - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        """Stage output."""
        return self.layer(x)


class WideResNet(nn.Module):
    """Pre-activation wide ResNet WRN-``depth``-``widen_factor`` for 32x32 images.

    A 3x3 conv stem with 16 channels, three stages of ``(depth - 4) / 6`` wide basic blocks with
    16k/32k/64k channels (strides 1, 2, 2), a final BN-ReLU, global average pooling and a linear
    classifier. From Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016).

    Args:
        depth: Total depth, ``6n + 4``.
        widen_factor: Width multiplier k.
        num_classes: Output classes.
        in_channels: Image channels.
        drop_rate: Dropout probability inside the blocks (0 in the KD benchmarks).

    Attributes:
        feature_taps: Friendly names -> module paths: ``stem`` (stem conv), ``stage1``-``stage3`` (stage
            outputs, which in a pre-activation net are residual sums before any BN-ReLU),
            ``stage1_preact``-``stage3_preact`` (those sums after the next BN, i.e. the BN outputs that
            precede a ReLU) and ``penultimate`` (the pooled feature entering ``fc``).
    """

    def __init__(
        self, *, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

        kaiming_init(self, zero_linear_bias=True)

        self.feature_taps: dict[str, str] = {
            "stem": "conv1",
            "stage1": "block1",
            "stage2": "block2",
            "stage3": "block3",
            "stage1_preact": "block2.layer.0.bn1",
            "stage2_preact": "block3.layer.0.bn1",
            "stage3_preact": "bn1",
            "penultimate": "fc:input",
        }

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape (B, num_classes) for images (B, C, H, W)."""
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(self.avgpool(x).flatten(1))


def _build(depth: int, widen_factor: int, num_classes: int, in_channels: int) -> WideResNet:
    return WideResNet(depth=depth, widen_factor=widen_factor, num_classes=num_classes, in_channels=in_channels)


@register_model("wrn_16_1", help="CIFAR WRN-16-1 (16/32/64 ch, 0.18M params)")
def wrn_16_1(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> WideResNet:
    """WRN-16-1: two blocks per stage, stages of 16/32/64 channels.

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        image_size: Input height/width (any size works: the head uses adaptive average pooling).
    """
    return _build(16, 1, num_classes, in_channels)


@register_model("wrn_16_2", help="CIFAR WRN-16-2 (32/64/128 ch, 0.70M params)")
def wrn_16_2(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> WideResNet:
    """WRN-16-2: two blocks per stage, stages of 32/64/128 channels.

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        image_size: Input height/width (any size works: the head uses adaptive average pooling).
    """
    return _build(16, 2, num_classes, in_channels)


@register_model("wrn_40_1", help="CIFAR WRN-40-1 (16/32/64 ch, 0.57M params)")
def wrn_40_1(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> WideResNet:
    """WRN-40-1: six blocks per stage, stages of 16/32/64 channels.

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        image_size: Input height/width (any size works: the head uses adaptive average pooling).
    """
    return _build(40, 1, num_classes, in_channels)


@register_model("wrn_40_2", help="CIFAR WRN-40-2 (32/64/128 ch, 2.26M params)")
def wrn_40_2(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> WideResNet:
    """WRN-40-2: six blocks per stage, stages of 32/64/128 channels.

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        image_size: Input height/width (any size works: the head uses adaptive average pooling).
    """
    return _build(40, 2, num_classes, in_channels)
