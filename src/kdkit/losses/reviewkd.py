"""ReviewKD's hierarchical context loss (HCL): a pyramid MSE between fused student and teacher features."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss

#: Pooled pyramid levels of the official ``hcl`` (a level is used only when smaller than the map's height).
HCL_LEVELS: tuple[int, ...] = (4, 2, 1)


def hcl_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    r"""Chen, Liu, Zhao and Jia, "Distilling Knowledge via Knowledge Review" (CVPR 2021): the hierarchical
    context loss of ONE (fused student, teacher) stage pair.

    .. math::
        L = \frac{\mathrm{MSE}(F_s, F_t) + \sum_{k=1}^{K} 2^{-k}\,
            \mathrm{MSE}\big(\mathrm{pool}_{l_k}(F_s), \mathrm{pool}_{l_k}(F_t)\big)}{1 + \sum_{k=1}^{K} 2^{-k}}

    where :math:`\mathrm{MSE}` is the mean over all elements, :math:`\mathrm{pool}_l` is adaptive average
    pooling to :math:`l \times l`, and :math:`l_1, \dots, l_K` are the sizes among ``(4, 2, 1)`` that are
    smaller than the map's height ``H``, in that order. As in the official ``hcl``, the weight halves per
    level *used*: an 8x8 (or larger) map uses 4, 2, 1 with weights 1/2, 1/4, 1/8 (total 15/8); a 4x4 map
    uses 2, 1 with 1/2, 1/4; a 2x2 map uses 1 with 1/2; a 1x1 map is plain MSE. Only ``H`` decides the
    levels (the official code assumes square maps). ReviewKD sums this over the stages (kdkit's pairwise
    loss does that), and the CIFAR recipes weight the sum by 5 (resnet32x4 / WRN teachers), 0.6 (resnet56),
    1 (resnet110), with a 20-epoch linear warm-up of that weight (official ``min(epoch / 20, 1)``).

    The paper describes HCL as spatial-pyramid pooling with an L2 distance per level; the level sizes, the
    halving weights and the normalisation are those of the official ``hcl`` (followed exactly; no switch).

    Args:
        student_feat: ``(B, C, H, W)`` fused student feature (output of the ``review`` bridge), or ``(B, C)``
            for the pooled level (treated as ``1x1``: plain MSE).
        teacher_feat: Teacher feature of the same shape (pre-ReLU stage output in the paper's setup).

    Returns:
        Scalar loss, in the student's dtype.
    """
    dtype = compute_dtype(student_feat, teacher_feat)
    fs, ft = student_feat.to(dtype), teacher_feat.to(dtype)
    loss = F.mse_loss(fs, ft)
    if fs.dim() == 4:
        height = fs.shape[2]
        weight, total = 1.0, 1.0
        for level in HCL_LEVELS:
            if level >= height:
                continue
            weight /= 2.0
            total += weight
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level))
        loss = loss / total
    return loss.to(student_feat.dtype)


@register_loss("reviewkd", help="ReviewKD hierarchical context loss: pyramid MSE (full, 4, 2, 1) per stage, "
                                "with the 'review' ABF bridge (CVPR 2021)")
class ReviewKDLoss(DistillLoss):
    """ReviewKD's HCL on each (fused student, teacher) stage pair, summed over stages; see :func:`hcl_loss`.

    Use it on lists of taps with the ``review`` bridge, which fuses all student stages top-down. CIFAR
    (resnet8x4 <- resnet32x4, WRN pairs; weight 0.6 for resnet56, 1 for resnet110 teachers)::

        distill:
          - {loss: reviewkd, student: [stage1, stage2, stage3], teacher: [stage1_preact, stage2_preact,
             stage3_preact], bridge: review, weight: 5, warmup_epochs: 20}

    The official CIFAR code also fuses and matches the pooled penultimate feature as a fourth, 1x1 level;
    to reproduce it exactly, append ``penultimate`` to both lists::

          - {loss: reviewkd, student: [stage1, stage2, stage3, penultimate],
             teacher: [stage1_preact, stage2_preact, stage3_preact, penultimate],
             bridge: review, weight: 5, warmup_epochs: 20}

    The official runs train with CE weight 1 and no KD term, and ramp the loss up with ``min(epoch / 20, 1)``:
    a ``reviewkd`` term's ``warmup_epochs`` defaults to 20. The class's single-tap defaults
    (``stage2`` / ``stage2``) only exist because a default cannot be a list.
    """

    default_student_tap = "stage2"
    default_teacher_tap = "stage2"
    pairwise = True
    default_warmup_epochs = 20.0

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """One fused stage pair, large enough for every pyramid level (4, 2, 1)."""
        return (4, 8, 8), (4, 8, 8)

    def __init__(self) -> None:
        super().__init__()

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
        """Same-shape ``(C, H, W)`` maps, or same-shape pooled ``(C,)`` features."""
        if len(student) not in (1, 3):
            return f"needs (C, H, W) feature maps (or a pooled (C,) level), got student shape {tuple(student)}"
        return super().check_shapes(student, teacher)

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """HCL of one ``(B, C, H, W)`` (or ``(B, C)``) pair; labels are unused."""
        return hcl_loss(student, teacher)
