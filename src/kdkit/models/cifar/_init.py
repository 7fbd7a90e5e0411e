"""The weight initialisation the CIFAR KD zoo shares."""

from __future__ import annotations

from torch import nn


def kaiming_init(model: nn.Module, *, linear_std: float | None = None, zero_linear_bias: bool = False) -> None:
    """Kaiming-normal (fan_out, ReLU) convolutions with zero bias, BatchNorm at weight 1 / bias 0.

    Args:
        model: The model to initialise in place.
        linear_std: Draw linear weights from N(0, linear_std) and zero their biases (VGG, MobileNetV2).
        zero_linear_bias: Only zero the linear biases, keeping PyTorch's default weights (WRN).
    """
    for m in model.modules():
        if any(p.is_meta for p in m.parameters(recurse=False)):
            continue  # shapes only (recipe validation): drawing values there is slow and changes nothing
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if linear_std is not None or zero_linear_bias:
                nn.init.zeros_(m.bias)
