"""BYOT's shallow classifier: a bottleneck on an intermediate student tap, then a linear layer (training-only)."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from kdkit.bridges import register_bridge
from kdkit.errors import KdkitError

TAPS_FIX = "give the term `student: [SHALLOW_TAP, DEEP_FEATURE_TAP, logits]`, e.g. [stage1, stage2, logits]"


def bottleneck(channels_in: int, channels_out: int, stride: int) -> nn.Sequential:
    """The re-implementation's ``branchBottleNeck``: 1x1 down to a quarter, k x k stride k, 1x1 up; BN + ReLU each."""
    middle = max(channels_out // 4, 1)
    return nn.Sequential(
        nn.Conv2d(channels_in, middle, 1), nn.BatchNorm2d(middle), nn.ReLU(),
        nn.Conv2d(middle, middle, stride, stride=stride), nn.BatchNorm2d(middle), nn.ReLU(),
        nn.Conv2d(middle, channels_out, 1), nn.BatchNorm2d(channels_out), nn.ReLU())


class ByotHead(nn.Module):
    """A shallow classifier: its feature has the deep feature's shape, its logits the model's.

    Reads ``[shallow map, deep feature, model logits]`` and returns ``[F_i, q_i, F_C, q_C]``: the last two pass
    through, for the ``byot`` loss, which treats them as targets (detached: a shallow classifier must not train the
    deep layers through them).

    Args:
        channels_in: Channels of the shallow map.
        deep_shape: Per-sample shape of the deep feature: ``(C, H, W)`` (flattened into the classifier) or ``(C,)``
            (globally average-pooled).
        stride: Down-sampling of the bottleneck (shallow resolution / deep resolution; 1 for a vector).
        classes: Logit width.
    """

    def __init__(self, channels_in: int, deep_shape: tuple[int, ...], stride: int, classes: int) -> None:
        super().__init__()
        self.deep_shape = tuple(deep_shape)
        self.bottleneck = bottleneck(channels_in, deep_shape[0], stride)
        self.pool = nn.AdaptiveAvgPool2d(1) if len(deep_shape) == 1 else nn.Identity()
        self.fc = nn.Linear(math.prod(deep_shape), classes)

    def forward(self, taps: list[Tensor]) -> list[Tensor]:
        """``[F_i, q_i, F_C, q_C]`` from ``[shallow map, deep feature, model logits]``."""
        shallow, deep, logits = taps
        feature = self.pool(self.bottleneck(shallow)).reshape(len(shallow), *self.deep_shape)
        return [feature, self.fc(feature.flatten(1)), deep, logits]


def head_stride(shallow: tuple[int, ...], deep: tuple[int, ...]) -> int:
    """The bottleneck's stride from the shallow map ``(C, H, W)`` to the deep feature's resolution."""
    if len(deep) == 1:
        return 1
    if len(deep) != 3 or shallow[1] % deep[1] or shallow[2] % deep[2] or shallow[1] // deep[1] != shallow[2] // deep[2]:
        raise KdkitError(f"byot_head down-samples the shallow map {tuple(shallow)} to the deep feature's resolution "
                         f"by one integer stride; the deep feature {tuple(deep)} does not allow it",
                         fix="tap a deep feature map whose height and width divide the shallow map's by the same "
                             "factor, or a vector (pooled) feature")
    return shallow[1] // deep[1]


@register_bridge("byot_head", fuses_taps=True,
                 help="BYOT's shallow classifier (training-only): bottleneck + linear on an intermediate tap; reads "
                      "[shallow, deep feature, logits]",
                 example_shapes=([(4, 8, 8), (8, 4, 4), (10,)], [(8, 4, 4), (10,), (8, 4, 4), (10,)]))
def byot_head(student_shape: Any, teacher_shape: Any) -> ByotHead:
    """A BYOT shallow classifier (Zhang et al., ICCV 2019; see :mod:`kdkit.methods.byot`).

    Args:
        student_shape: Per-sample shapes of the term's three student taps: the shallow map ``(C_i, H_i, W_i)``, the
            deep feature (``(C, H, W)`` or ``(C,)``) the model's classifier reads, and the logits ``(K,)``.
        teacher_shape: Not used: the targets are the model's own (a ``byot`` term reads no teacher; its output
            shapes are ``[deep feature, logits, deep feature, logits]``).
    """
    shapes = student_shape if isinstance(student_shape, list) else [student_shape]
    if len(shapes) != 3 or len(shapes[0]) != 3 or len(shapes[2]) != 1:
        raise KdkitError(f"byot_head reads three student taps (a shallow map, the deep feature, the logits), got "
                         f"shapes {[tuple(s) for s in shapes]}", fix=TAPS_FIX)
    shallow, deep, logits = (tuple(s) for s in shapes)
    return ByotHead(shallow[0], deep, head_stride(shallow, deep), logits[0])
