"""ShuffleNetV1 and ShuffleNetV2 for CIFAR, as used in the CIFAR-100 KD benchmarks.

From Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile Devices"
(CVPR 2018) and Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design"
(ECCV 2018), in the CIFAR form of the CRD / RepDistiller and mdistiller model zoos: a 1x1 conv stem with
24 channels at full resolution (no max-pool), three stride-2 stages, global average pooling and a linear
classifier. Module names match those zoos, so their checkpoints load with ``load_state_dict``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdkit.models.registry import register_model


class ChannelShuffle(nn.Module):
    """Interleave channels across ``groups``: (B, g*c, H, W) -> view (B, g, c) -> transpose -> (B, c*g, H, W).

    Args:
        groups: Number of channel groups.
    """

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        """Channel-shuffled ``x`` of the same shape."""
        b, c, h, w = x.shape
        return x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleV1Unit(nn.Module):
    """ShuffleNetV1 unit: grouped 1x1 conv, channel shuffle, 3x3 depthwise conv, grouped 1x1 conv.

    With stride 1 the result is added to the input; with stride 2 it is concatenated with a 3x3
    average-pooled copy of the input (so ``out_channels`` here excludes the input's channels). ReLU
    follows the merge.

    Args:
        in_channels: Input channels.
        out_channels: Channels produced by the residual branch.
        stride: 1 (add) or 2 (concatenate).
        groups: Groups of the 1x1 convolutions.
        group_first: Whether the first 1x1 conv is grouped (not for the unit right after the stem).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int, group_first: bool = True) -> None:
        super().__init__()
        self.stride = stride
        mid = out_channels // 4
        g1 = groups if group_first else 1
        self.conv1 = nn.Conv2d(in_channels, mid, kernel_size=1, groups=g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.shuffle1 = ChannelShuffle(g1)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid, out_channels, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))
        self.out_relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """Return the unit output: (B, out_channels [+ in_channels if stride 2], H/stride, W/stride)."""
        out = self.shuffle1(self.relu1(self.bn1(self.conv1(x))))
        out = self.bn3(self.conv3(self.relu2(self.bn2(self.conv2(out)))))
        res = self.shortcut(x)
        merged = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return self.out_relu(merged)


class CifarShuffleNetV1(nn.Module):
    """ShuffleNetV1 for 32x32 images: 1x1 conv stem (24 ch), three stages of ShuffleNet units, linear.

    Each stage starts with a stride-2 unit (32 -> 16 -> 8 -> 4 px for CIFAR). From Zhang et al.,
    "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile Devices" (CVPR 2018).

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        stage_channels: Output channels of the three stages.
        stage_units: Units per stage.
        groups: Groups of the 1x1 convolutions.

    Attributes:
        feature_taps: Friendly names -> module paths: ``stem`` (stem ReLU), ``stage1``-``stage3``,
            ``stage1_preact``-``stage3_preact`` (the last unit's merge before its ReLU) and ``penultimate``
            (the pooled feature entering ``linear``).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        stage_channels: tuple[int, int, int] = (240, 480, 960),
        stage_units: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
    ) -> None:
        super().__init__()
        stem = 24
        self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        cin = stem
        stages = []
        for i, (cout, units) in enumerate(zip(stage_channels, stage_units, strict=True)):
            layers = [ShuffleV1Unit(cin, cout - cin, stride=2, groups=groups, group_first=i > 0)]
            layers += [ShuffleV1Unit(cout, cout, stride=1, groups=groups) for _ in range(units - 1)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)

        self.feature_taps: dict[str, str] = {"stem": "relu"}
        for i, units in enumerate(stage_units, start=1):
            self.feature_taps[f"stage{i}"] = f"layer{i}"
            self.feature_taps[f"stage{i}_preact"] = f"layer{i}.{units - 1}.out_relu:input"
        self.feature_taps["penultimate"] = "linear:input"

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape (B, num_classes) for images (B, C, H, W)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.avgpool(x).flatten(1))


class ShuffleV2Unit(nn.Module):
    """ShuffleNetV2 basic unit: split channels in half, transform one half, concatenate, shuffle.

    The transformed half goes through 1x1 conv-BN-ReLU, 3x3 depthwise conv-BN, 1x1 conv-BN-ReLU.

    Args:
        channels: Input (= output) channels.
        split_ratio: Fraction of channels passed through unchanged.
    """

    def __init__(self, channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.keep = int(channels * split_ratio)
        c = channels - self.keep
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.relu3 = nn.ReLU()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        """Return the unit output, of the same shape as ``x``."""
        x1, x2 = x[:, : self.keep], x[:, self.keep :]
        out = self.relu3(self.bn3(self.conv3(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x2))))))))
        return self.shuffle(torch.cat([x1, out], 1))


class ShuffleV2DownUnit(nn.Module):
    """ShuffleNetV2 downsampling unit: two stride-2 branches on the full input, concatenated and shuffled.

    Left: 3x3 depthwise conv (stride 2)-BN, 1x1 conv-BN-ReLU. Right: 1x1 conv-BN-ReLU, 3x3 depthwise
    conv (stride 2)-BN, 1x1 conv-BN-ReLU. Each branch yields ``out_channels // 2`` channels.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu5 = nn.ReLU()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        """Return the unit output, of shape (B, 2 * (out_channels // 2), H/2, W/2)."""
        left = self.relu2(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.relu3(self.bn3(self.conv3(x)))
        right = self.relu5(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class CifarShuffleNetV2(nn.Module):
    """ShuffleNetV2 for 32x32 images: 1x1 conv stem (24 ch), three stages, 1x1 head conv, linear.

    Each stage is one downsampling unit followed by ``n`` basic units (32 -> 16 -> 8 -> 4 px for CIFAR).
    Net size 1 has stages of 116/232/464 channels with 3/7/3 basic units and a 1024-channel head. From
    Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design" (ECCV 2018).

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        stage_channels: Output channels of the three stages.
        stage_units: Basic units per stage (after its downsampling unit).
        head_channels: Channels of the final 1x1 conv.

    Attributes:
        feature_taps: Friendly names -> module paths: ``stem`` (stem ReLU), ``stage1``-``stage3`` and
            ``penultimate`` (the pooled feature entering ``linear``). There are no ``_preact`` taps: the
            reference's pre-activation feature is a concatenation no single module produces.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        stage_channels: tuple[int, int, int] = (116, 232, 464),
        stage_units: tuple[int, int, int] = (3, 7, 3),
        head_channels: int = 1024,
    ) -> None:
        super().__init__()
        stem = 24
        self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        cin = stem
        stages = []
        for cout, units in zip(stage_channels, stage_units, strict=True):
            layers: list[nn.Module] = [ShuffleV2DownUnit(cin, cout)]
            layers += [ShuffleV2Unit(cout) for _ in range(units)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(cin, head_channels, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(head_channels)
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(head_channels, num_classes)

        self.feature_taps: dict[str, str] = {
            "stem": "relu",
            "stage1": "layer1",
            "stage2": "layer2",
            "stage3": "layer3",
            "penultimate": "linear:input",
        }

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape (B, num_classes) for images (B, C, H, W)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.linear(self.avgpool(x).flatten(1))


@register_model("shufflenetv1", help="CIFAR ShuffleNetV1, 3 groups (240/480/960 ch, 0.95M params)")
def shufflenetv1(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarShuffleNetV1:
    """CIFAR ShuffleNetV1 with 3 groups, stages of 240/480/960 channels and 4/8/4 units.

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        image_size: Input height/width (any size works: the head uses adaptive average pooling).
    """
    return CifarShuffleNetV1(num_classes=num_classes, in_channels=in_channels)


@register_model("shufflenetv2", help="CIFAR ShuffleNetV2, net size 1 (116/232/464 ch, 1.36M params)")
def shufflenetv2(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarShuffleNetV2:
    """CIFAR ShuffleNetV2 with net size 1: stages of 116/232/464 channels, 1024-channel head.

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        image_size: Input height/width (any size works: the head uses adaptive average pooling).
    """
    return CifarShuffleNetV2(num_classes=num_classes, in_channels=in_channels)
