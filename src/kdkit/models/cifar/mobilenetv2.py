"""MobileNetV2 for CIFAR, in the half-width variant used by the CIFAR-100 KD benchmarks.

From Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks" (CVPR 2018), with the
CIFAR adaptation of the CRD / RepDistiller and mdistiller model zoos ("mobile_half"): width multiplier 0.5,
expansion ratio 6, a stride-2 stem, and an unscaled 1280-channel head. Module names match those zoos, so
their checkpoints load with ``load_state_dict``.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdkit.models.cifar._init import kaiming_init
from kdkit.models.registry import register_model

# (expansion t, channels c, repeats n, first stride s); t is None for "use the model's expand_ratio".
_SETTINGS: list[tuple[int | None, int, int, int]] = [
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
]


def _conv_bn_relu(cin: int, cout: int, kernel_size: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    ]


class InvertedResidual(nn.Module):
    """Inverted residual: 1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 linear projection-BN.

    The identity shortcut is used when the stride is 1 and the channel count is unchanged. As in the
    reference zoo, the 1x1 expansion is kept even for expansion ratio 1.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the depthwise convolution.
        expand_ratio: Hidden width as a multiple of ``in_channels``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_res_connect = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            *_conv_bn_relu(in_channels, hidden, 1),
            *_conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Block output of shape (B, out_channels, H/stride, W/stride)."""
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 images: stride-2 stem, seven inverted-residual groups, 1x1 head, linear.

    Resolutions for a 32 px input: stem 16, groups 0-1 at 16, group 2 at 8, groups 3-4 at 4, groups 5-6
    at 2. From Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks" (CVPR 2018).

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        width_mult: Channel multiplier for the stem and the inverted-residual groups.
        expand_ratio: Expansion ratio of every group except the first.
        last_channel: Channels of the final 1x1 conv (scaled by ``width_mult`` only when it exceeds 1).

    Attributes:
        feature_taps: Friendly names -> module paths, matching the reference zoo's feature list:
            ``stem`` (``conv1``), ``stage1`` (``blocks.1``, 16 px), ``stage2`` (``blocks.2``, 8 px),
            ``stage3`` (``blocks.4``, 4 px), ``stage4`` (``blocks.6``, 2 px); ``stageN_preact`` is the last
            BN of those groups (the linear bottleneck output); ``penultimate`` is the pooled feature
            entering ``classifier.0``.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        width_mult: float = 0.5,
        expand_ratio: int = 6,
        last_channel: int = 1280,
    ) -> None:
        super().__init__()
        cin = int(32 * width_mult)
        self.conv1 = nn.Sequential(*_conv_bn_relu(in_channels, cin, 3, stride=2))
        self.blocks = nn.ModuleList()
        for t, c, n, s in _SETTINGS:
            cout = int(c * width_mult)
            group = []
            for i in range(n):
                group.append(InvertedResidual(cin, cout, s if i == 0 else 1, expand_ratio if t is None else t))
                cin = cout
            self.blocks.append(nn.Sequential(*group))
        self.last_channel = int(last_channel * width_mult) if width_mult > 1.0 else last_channel
        self.conv2 = nn.Sequential(*_conv_bn_relu(cin, self.last_channel, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))

        kaiming_init(self, linear_std=0.01)

        self.feature_taps: dict[str, str] = {"stem": "conv1"}
        for stage, group in enumerate((1, 2, 4, 6), start=1):
            last = len(self.blocks[group]) - 1
            self.feature_taps[f"stage{stage}"] = f"blocks.{group}"
            self.feature_taps[f"stage{stage}_preact"] = f"blocks.{group}.{last}.conv.7"
        self.feature_taps["penultimate"] = "classifier.0:input"

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape (B, num_classes) for images (B, C, H, W)."""
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        x = self.avgpool(self.conv2(x))
        return self.classifier(x.flatten(1))


@register_model("mobilenetv2", help="CIFAR MobileNetV2, width 0.5 (KD zoo 'mobile_half', 0.81M params)")
def mobilenetv2(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarMobileNetV2:
    """CIFAR MobileNetV2 with width multiplier 0.5 and expansion ratio 6 (the KD zoo's ``mobile_half``).

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        image_size: Input height/width (any size works: the head uses adaptive average pooling).
    """
    return CifarMobileNetV2(num_classes=num_classes, in_channels=in_channels)
