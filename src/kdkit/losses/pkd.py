"""PKD: feature imitation with the Pearson correlation coefficient (per-channel standardised MSE)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.losses.base import DistillLoss, register_loss

#: Added to the standard deviation before dividing, as in mmrazor's ``PKDLoss.norm``.
EPS = 1e-6


def standardize_channels(feat: Tensor, eps: float = EPS) -> Tensor:
    """Standardise each channel (dim 1) over every other dim (batch and spatial) to zero mean, unit std.

    Uses the unbiased standard deviation plus ``eps``, as mmrazor: ``(x - mean) / (std + eps)``.

    Args:
        feat: ``(B, C, ...)`` tensor (``(B, C, H, W)`` feature maps, or ``(B, C)`` vectors).
        eps: Added to the standard deviation.

    Returns:
        Tensor of the same shape, at least float32.
    """
    x = feat.to(torch.promote_types(feat.dtype, torch.float32)).transpose(0, 1)
    flat = x.reshape(x.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1, keepdim=True)
    return ((flat - mean) / (std + eps)).reshape(x.shape).transpose(0, 1)


def pkd_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    r"""Cao, Zhang, Gao, Cheng, Cheng and Cheng, "PKD: General Distillation Framework for Object Detectors
    via Pearson Correlation Coefficient" (NeurIPS 2022).

    Each channel of each map is standardised over (N, H, W), then

    .. math::
        \hat f_{c} = \frac{f_c - \mu_c}{\sigma_c + \epsilon},\qquad
        L = \frac{1}{2}\cdot\frac{1}{N C H W}\sum_{n,c,h,w}\big(\hat f^s_{nchw} - \hat f^t_{nchw}\big)^2

    With the population std and :math:`\epsilon = 0` this is exactly :math:`\mathrm{mean}_c (1 - r_c)`, one
    minus the Pearson correlation of channel :math:`c`'s student and teacher values (the paper's point:
    magnitudes and per-channel offsets are ignored). The code follows the official implementation
    (mmrazor ``PKDLoss``): unbiased std, :math:`\epsilon = 10^{-6}`, ``F.mse_loss(...) / 2`` with its
    default **mean** reduction over all elements — so :math:`L = \frac{n-1}{n}\,\mathrm{mean}_c(1 - r_c)`
    with :math:`n = NHW`, up to :math:`\epsilon`. The loss is invariant to per-channel positive affine maps
    :math:`f_c \mapsto a_c f_c + b_c` (:math:`a_c > 0`) of either input.

    mmrazor also bilinearly resizes the student's map when spatial sizes differ; kdkit requires equal
    shapes instead (use a bridge, e.g. ``conv1x1``). Tensors of any rank ``>= 2`` are accepted (channels on
    dim 1), so ``(B, C)`` vectors or logits work too. Detection recipes use weight 6-10 per FPN level.

    Args:
        student_feat: ``(B, C, H, W)`` student feature map (after any bridge).
        teacher_feat: ``(B, C, H, W)`` teacher feature map, same shape.

    Returns:
        Scalar loss, in the student's dtype.
    """
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(f"pkd_loss needs equal shapes, got {tuple(student_feat.shape)} and "
                         f"{tuple(teacher_feat.shape)}; map the student with a bridge")
    if student_feat.dim() < 2:
        raise ValueError(f"pkd_loss needs (B, C, ...) tensors, got shape {tuple(student_feat.shape)}")
    norm_s, norm_t = standardize_channels(student_feat), standardize_channels(teacher_feat)
    return (F.mse_loss(norm_s, norm_t) / 2).to(student_feat.dtype)


@register_loss("pkd", help="PKD: MSE/2 of per-channel standardised features = 1 - Pearson r (NeurIPS 2022)")
class PKDLoss(DistillLoss):
    """Pearson-correlation feature imitation; see :func:`pkd_loss`.

    Recipe (detection: one term per FPN level, weight 6-10; equal shapes, or add a bridge)::

        distill:
          - {loss: pkd, student: stage2, teacher: stage2, bridge: conv1x1, weight: 6}
    """

    default_student_tap = "stage2"
    default_teacher_tap = "stage2"

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """Equal feature maps (a bridge makes them so)."""
        return (4, 4, 4), (4, 4, 4)

    def __init__(self) -> None:
        super().__init__()

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
        """Equal shapes of at least one dim (channels) are required; add a bridge otherwise."""
        if len(student) < 1:
            return f"PKD needs per-sample (C, ...) taps with a channel dim, got {tuple(student)}"
        return super().check_shapes(student, teacher)

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """PKD loss of two same-shape tensors; labels are unused."""
        return pkd_loss(student, teacher)
