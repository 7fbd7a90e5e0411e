"""Small CNNs for 28x28 grayscale data (Fashion-MNIST, MNIST) and other small images.

The teacher/student pair matches the one measured in ``shared/perf-notes.md``: conv-BN-ReLU x2 at
``c1`` channels, 2x2 max-pool, x2 at ``c2`` channels, 2x2 max-pool, flatten, linear.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdkit.models.registry import register_model


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Two conv stages and a linear classifier.

    Args:
        num_classes: Output classes.
        in_channels: Image channels (1 for Fashion-MNIST).
        image_size: Input height/width; sets the classifier's input size.
        widths: Channels of the two stages.
    """

    def __init__(self, *, num_classes: int, in_channels: int, image_size: int, widths: tuple[int, int]) -> None:
        super().__init__()
        c1, c2 = widths
        self.stage1 = nn.Sequential(_conv_bn_relu(in_channels, c1), _conv_bn_relu(c1, c1), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(_conv_bn_relu(c1, c2), _conv_bn_relu(c2, c2), nn.MaxPool2d(2))
        side = image_size // 4
        self.fc = nn.Linear(c2 * side * side, num_classes)
        self.feature_taps = {"stage1": "stage1", "stage2": "stage2", "penultimate": "fc:input"}

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape (B, num_classes) for images (B, C, H, W)."""
        return self.fc(self.stage2(self.stage1(x)).flatten(1))


@register_model("cnn_teacher", help="small CNN teacher for 28x28 images (32/64 channels, ~97k params)")
def cnn_teacher(*, num_classes: int, in_channels: int = 1, image_size: int = 28, width: int = 32) -> SmallCNN:
    """Small CNN teacher: stages of ``width`` and ``2*width`` channels."""
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, image_size=image_size, widths=(width, 2 * width))


@register_model("cnn_student", help="small CNN student for 28x28 images (8/16 channels, ~12k params)")
def cnn_student(*, num_classes: int, in_channels: int = 1, image_size: int = 28, width: int = 8) -> SmallCNN:
    """Small CNN student: stages of ``width`` and ``2*width`` channels."""
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, image_size=image_size, widths=(width, 2 * width))
