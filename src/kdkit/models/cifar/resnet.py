"""CIFAR ResNets (depth 6n+2, three stages of basic blocks) as used in the CIFAR-100 KD benchmarks.

The family follows He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), section 4.2,
in the form popularised by the CRD / RepDistiller and mdistiller model zoos: ``resnet8`` ... ``resnet110``
with a 16-channel stem and stages of 16/32/64 channels, plus the 4x wider ``resnet8x4`` and ``resnet32x4``
(32-channel stem, stages of 64/128/256 channels). Module names match those zoos, so their published
CIFAR-100 teacher checkpoints load with ``load_state_dict``.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdkit.models.cifar._init import kaiming_init
from kdkit.models.registry import register_model


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut, ReLU after the sum.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first convolution (2 halves the spatial size).

    The pre-activation sum is the input of ``out_relu``, so it can be captured with the tap
    ``"<block>.out_relu:input"``. No operation is in-place, so hooks never see a tensor change after capture.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.out_relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """Residual block output of shape (B, out_channels, H/stride, W/stride)."""
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.out_relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet for 32x32 images: 3x3 stem, three stages of ``n`` basic blocks, global average pool, linear.

    Depth is ``6n + 2`` (two convolutions per block plus the stem and the classifier). Stage 1 keeps the
    resolution, stages 2 and 3 halve it (32 -> 32 -> 16 -> 8 for CIFAR). From He et al., "Deep Residual
    Learning for Image Recognition" (CVPR 2016); the 4x-wide variants are from Tian et al., "Contrastive
    Representation Distillation" (ICLR 2020).

    Args:
        depth: Total depth, ``6n + 2``.
        widths: Channels of (stem, stage1, stage2, stage3).
        num_classes: Output classes.
        in_channels: Image channels.

    Attributes:
        feature_taps: Friendly names -> module paths: ``stem``, ``stage1``-``stage3`` (post-ReLU block
            outputs), ``stage1_preact``-``stage3_preact`` (the last block's sum before its ReLU) and
            ``penultimate`` (the pooled feature entering ``fc``).
    """

    def __init__(
        self, *, depth: int, widths: tuple[int, int, int, int], num_classes: int, in_channels: int = 3
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        stem, w1, w2, w3 = widths
        self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        self.layer1 = self._make_stage(stem, w1, n, stride=1)
        self.layer2 = self._make_stage(w1, w2, n, stride=2)
        self.layer3 = self._make_stage(w2, w3, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)

        kaiming_init(self)

        last = n - 1
        self.feature_taps: dict[str, str] = {
            "stem": "relu",
            "stage1": "layer1",
            "stage2": "layer2",
            "stage3": "layer3",
            "stage1_preact": f"layer1.{last}.out_relu:input",
            "stage2_preact": f"layer2.{last}.out_relu:input",
            "stage3_preact": f"layer3.{last}.out_relu:input",
            "penultimate": "fc:input",
        }

    @staticmethod
    def _make_stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(cin, cout, stride)]
        layers += [BasicBlock(cout, cout) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape (B, num_classes) for images (B, C, H, W)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def _build(depth: int, widths: tuple[int, int, int, int], num_classes: int, in_channels: int) -> CifarResNet:
    return CifarResNet(depth=depth, widths=widths, num_classes=num_classes, in_channels=in_channels)


@register_model("resnet8", help="CIFAR ResNet-8 (16/32/64 ch, 0.08M params)")
def resnet8(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarResNet:
    """CIFAR ResNet-8: one basic block per stage, stages of 16/32/64 channels.

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        image_size: Input height/width (any size works: the head uses adaptive average pooling).
    """
    return _build(8, _NARROW, num_classes, in_channels)


@register_model("resnet14", help="CIFAR ResNet-14 (16/32/64 ch, 0.18M params)")
def resnet14(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarResNet:
    """CIFAR ResNet-14: two basic blocks per stage, stages of 16/32/64 channels.

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        image_size: Input height/width (any size works: the head uses adaptive average pooling).
    """
    return _build(14, _NARROW, num_classes, in_channels)


@register_model("resnet20", help="CIFAR ResNet-20 (16/32/64 ch, 0.28M params)")
def resnet20(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarResNet:
    """CIFAR ResNet-20: three basic blocks per stage, stages of 16/32/64 channels.

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        image_size: Input height/width (any size works: the head uses adaptive average pooling).
    """
    return _build(20, _NARROW, num_classes, in_channels)


@register_model("resnet32", help="CIFAR ResNet-32 (16/32/64 ch, 0.47M params)")
def resnet32(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarResNet:
    """CIFAR ResNet-32: five basic blocks per stage, stages of 16/32/64 channels.

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        image_size: Input height/width (any size works: the head uses adaptive average pooling).
    """
    return _build(32, _NARROW, num_classes, in_channels)


@register_model("resnet44", help="CIFAR ResNet-44 (16/32/64 ch, 0.67M params)")
def resnet44(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarResNet:
    """CIFAR ResNet-44: seven basic blocks per stage, stages of 16/32/64 channels.

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        image_size: Input height/width (any size works: the head uses adaptive average pooling).
    """
    return _build(44, _NARROW, num_classes, in_channels)


@register_model("resnet56", help="CIFAR ResNet-56 (16/32/64 ch, 0.86M params)")
def resnet56(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarResNet:
    """CIFAR ResNet-56: nine basic blocks per stage, stages of 16/32/64 channels.

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        image_size: Input height/width (any size works: the head uses adaptive average pooling).
    """
    return _build(56, _NARROW, num_classes, in_channels)


@register_model("resnet110", help="CIFAR ResNet-110 (16/32/64 ch, 1.73M params)")
def resnet110(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarResNet:
    """CIFAR ResNet-110: eighteen basic blocks per stage, stages of 16/32/64 channels.

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        image_size: Input height/width (any size works: the head uses adaptive average pooling).
    """
    return _build(110, _NARROW, num_classes, in_channels)


@register_model("resnet8x4", help="CIFAR ResNet-8x4 (32 stem, 64/128/256 ch, 1.23M params)")
def resnet8x4(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarResNet:
    """CIFAR ResNet-8x4: ResNet-8 with 4x wider stages (32-channel stem, stages of 64/128/256 channels).

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        image_size: Input height/width (any size works: the head uses adaptive average pooling).
    """
    return _build(8, _WIDE, num_classes, in_channels)


@register_model("resnet32x4", help="CIFAR ResNet-32x4 (32 stem, 64/128/256 ch, 7.43M params)")
def resnet32x4(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarResNet:
    """CIFAR ResNet-32x4: ResNet-32 with 4x wider stages (32-channel stem, stages of 64/128/256 channels).

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        image_size: Input height/width (any size works: the head uses adaptive average pooling).
    """
    return _build(32, _WIDE, num_classes, in_channels)
