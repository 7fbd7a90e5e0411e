"""VGG with batch norm for CIFAR, in the variant used by the CIFAR-100 KD benchmarks.

From Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition"
(ICLR 2015), with the CIFAR adaptation of the CRD / RepDistiller and mdistiller model zoos: five conv
blocks (3x3 conv with bias, BN, ReLU), 2x2 max-pools between blocks, no fully connected layers except a
single linear classifier on the globally average-pooled 512-d feature. ``vgg8`` is the zoo's extra
shallow configuration (one conv per block). Module names match those zoos, so their published CIFAR-100
teacher checkpoints load with ``load_state_dict``.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdkit.models.cifar._init import kaiming_init
from kdkit.models.registry import register_model

# Channels of every conv in each of the five blocks.
_CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _make_block(cin: int, widths: list[int]) -> nn.Sequential:
    """Conv(3x3, bias)-BN-ReLU for each width; the block's last BN is at index ``3 * len(widths) - 2``."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, kernel_size=3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
    return nn.Sequential(*layers)


class CifarVGG(nn.Module):
    """VGG-BN for small images: five conv blocks, max-pools, global average pool, one linear layer.

    Blocks 0-3 are each followed by a 2x2 max-pool, except that (as in the reference zoo) the pool
    between blocks 3 and 4 (``pool3``) only acts on inputs of 64 px or more; for CIFAR (32 px) the
    resolutions are 32, 16, 8, 4, 4 and ``pool3`` is an identity. Architecture from Simonyan & Zisserman,
    "Very Deep Convolutional Networks for Large-Scale Image Recognition" (ICLR 2015).

    Args:
        config: Channels of every conv in each of the five blocks.
        num_classes: Output classes.
        in_channels: Image channels.
        image_size: Input height/width; decides whether ``pool3`` downsamples.

    Attributes:
        feature_taps: Friendly names -> module paths: ``stem`` (block0, full resolution),
            ``stage1``-``stage4`` (blocks 1-4, post-ReLU), ``stage1_preact``-``stage4_preact`` (each
            block's last BN, before its ReLU) and ``penultimate`` (the pooled 512-d feature entering
            ``classifier``).
    """

    def __init__(
        self, *, config: list[list[int]], num_classes: int, in_channels: int = 3, image_size: int = 32
    ) -> None:
        super().__init__()
        if len(config) != 5:
            raise ValueError(f"CIFAR VGG needs five conv blocks, got {len(config)}")
        cins = [in_channels] + [block[-1] for block in config[:-1]]
        self.block0 = _make_block(cins[0], config[0])
        self.block1 = _make_block(cins[1], config[1])
        self.block2 = _make_block(cins[2], config[2])
        self.block3 = _make_block(cins[3], config[3])
        self.block4 = _make_block(cins[4], config[4])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3: nn.Module = nn.MaxPool2d(kernel_size=2, stride=2) if image_size >= 64 else nn.Identity()
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(config[4][-1], num_classes)

        kaiming_init(self, linear_std=0.01)

        self.feature_taps: dict[str, str] = {"stem": "block0"}
        for i in range(1, 5):
            self.feature_taps[f"stage{i}"] = f"block{i}"
        for i in range(1, 5):
            self.feature_taps[f"stage{i}_preact"] = f"block{i}.{3 * len(config[i]) - 2}"
        self.feature_taps["penultimate"] = "classifier:input"

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape (B, num_classes) for images (B, C, H, W)."""
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.pool3(self.block3(x))
        x = self.pool4(self.block4(x))
        return self.classifier(x.flatten(1))


def _build(name: str, num_classes: int, in_channels: int, image_size: int) -> CifarVGG:
    return CifarVGG(config=_CONFIGS[name], num_classes=num_classes, in_channels=in_channels, image_size=image_size)


@register_model("vgg8", help="CIFAR VGG-8 with BN (one conv per block, 3.96M params)")
def vgg8(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarVGG:
    """CIFAR VGG-8-BN: blocks of 1/1/1/1/1 convs (64/128/256/512/512 channels).

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        image_size: Input height/width (64 px or more enables ``pool3``).
    """
    return _build("vgg8", num_classes, in_channels, image_size)


@register_model("vgg11", help="CIFAR VGG-11 with BN (9.28M params)")
def vgg11(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarVGG:
    """CIFAR VGG-11-BN: blocks of 1/1/2/2/2 convs (64/128/256/512/512 channels).

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        image_size: Input height/width (64 px or more enables ``pool3``).
    """
    return _build("vgg11", num_classes, in_channels, image_size)


@register_model("vgg13", help="CIFAR VGG-13 with BN (9.46M params)")
def vgg13(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarVGG:
    """CIFAR VGG-13-BN: blocks of 2/2/2/2/2 convs (64/128/256/512/512 channels).

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        image_size: Input height/width (64 px or more enables ``pool3``).
    """
    return _build("vgg13", num_classes, in_channels, image_size)


@register_model("vgg16", help="CIFAR VGG-16 with BN (14.77M params)")
def vgg16(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarVGG:
    """CIFAR VGG-16-BN: blocks of 2/2/3/3/3 convs (64/128/256/512/512 channels).

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        image_size: Input height/width (64 px or more enables ``pool3``).
    """
    return _build("vgg16", num_classes, in_channels, image_size)


@register_model("vgg19", help="CIFAR VGG-19 with BN (20.09M params)")
def vgg19(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarVGG:
    """CIFAR VGG-19-BN: blocks of 2/2/4/4/4 convs (64/128/256/512/512 channels).

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        image_size: Input height/width (64 px or more enables ``pool3``).
    """
    return _build("vgg19", num_classes, in_channels, image_size)
