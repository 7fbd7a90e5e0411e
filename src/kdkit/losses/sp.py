"""Similarity-preserving KD: match the row-normalised batch similarity (Gram) matrices."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.losses.base import DistillLoss, register_loss


def similarity_matrix(feat: Tensor) -> Tensor:
    r"""Row-wise L2-normalised Gram matrix :math:`G = \mathrm{rownorm}(Q Q^\top)` of flattened features.

    Args:
        feat: ``(B, ...)`` features, flattened to ``Q`` of shape ``(B, D)``.

    Returns:
        ``(B, B)`` matrix, at least float32.
    """
    q = feat.flatten(1).to(torch.promote_types(feat.dtype, torch.float32))
    return F.normalize(q @ q.t(), p=2, dim=1)


def sp_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    r"""Tung and Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019), one layer pair.

    .. math::
        \tilde G = Q Q^\top,\quad G_{i,:} = \frac{\tilde G_{i,:}}{\lVert \tilde G_{i,:}\rVert_2},\qquad
        L = \frac{1}{B^2}\,\lVert G_t - G_s\rVert_F^2

    with :math:`Q` the ``(B, C*H*W)`` flattened activations. Only the ``B x B`` similarities are compared, so
    student and teacher widths (and ranks) may differ. Invariant to scaling either feature tensor and
    equivariant to permuting the batch (the loss is unchanged when both batches are permuted alike).

    The paper sums over layer pairs (a list of taps does that) and taps the last convolutional stage's
    output; RepDistiller's ``Similarity`` (verified by the authors) is the same formula and uses the
    pre-pooling feature map of the last stage, weight 3000 (the paper's CIFAR-10 :math:`\gamma = 3000`).
    No paper-vs-code difference.

    Args:
        student_feat: ``(B, ...)`` student features.
        teacher_feat: ``(B, ...)`` teacher features (same batch).

    Returns:
        Scalar loss, in the student's dtype.
    """
    if student_feat.shape[0] != teacher_feat.shape[0]:
        raise ValueError(f"sp_loss needs the same batch on both sides, got {student_feat.shape[0]} and "
                         f"{teacher_feat.shape[0]}")
    g_s, g_t = similarity_matrix(student_feat), similarity_matrix(teacher_feat)
    b = student_feat.shape[0]
    return ((g_t - g_s).pow(2).sum() / (b * b)).to(student_feat.dtype)


@register_loss("sp", help="similarity-preserving KD: ||G_s - G_t||_F^2 / B^2 of row-normalised batch Gram "
                          "matrices (ICCV 2019)")
class SPLoss(DistillLoss):
    """Similarity-preserving KD; see :func:`sp_loss`.

    Defaults to the ``penultimate`` taps, which every model has; the paper (and RepDistiller) tap the last
    convolutional stage before pooling, e.g. ``stage2`` of the small CNN or ``stage3``/``stage4`` of the
    CIFAR zoo.

    Recipe (CIFAR, RepDistiller: last stage, weight 3000)::

        distill:
          - {loss: sp, student: stage2, teacher: stage2, weight: 3000}
    """

    default_student_tap = "penultimate"
    default_teacher_tap = "penultimate"

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """Features of different shapes (SP compares batch similarities)."""
        return (4, 4, 4), (6, 2, 2)

    def __init__(self) -> None:
        super().__init__()

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
        """Any widths (and ranks): SP compares ``B x B`` similarity matrices."""
        return None

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """SP loss of ``(B, ...)`` student and teacher features; labels are unused."""
        return sp_loss(student, teacher)
