"""Pixel-wise distillation: the structured-KD paper's per-pixel KL of class distributions (Liu et al., CVPR 2019)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch.nn.functional as F
from annotated_types import Gt
from torch import Tensor

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss


def pixel_kd_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0,
                  batch: Literal["mean", "sum"] = "mean") -> Tensor:
    r"""Liu, Chen, Liu, Qin, Luo and Wang, "Structured Knowledge Distillation for Semantic Segmentation"
    (CVPR 2019; TPAMI 2020 "... for Dense Prediction"), the pixel-wise term.

    Each pixel ``i`` of the ``W' x H'`` logit map is a class distribution :math:`q_i = \mathrm{softmax}(z_i/T)`;

    .. math::
        \ell_{pi} = \frac{T^2}{N}\sum_{n=1}^{N}\frac{1}{W'H'}\sum_{i}\mathrm{KL}\big(q^t_{n,i}\,\|\,q^s_{n,i}\big)

    The paper has no temperature (:math:`T = 1`, the default) and writes the per-image mean over pixels. Its official
    code (``CriterionPixelWise``) computes the cross-entropy :math:`-\sum_k q^t \log q^s`, which is this KL plus the
    teacher's entropy (a constant for the student: the same gradient), and *sums* the per-image means over the batch
    (``batch="sum"``, ``N`` times the default ``"mean"``); its weight is 10 (``lambda_pi``).

    Args:
        student: ``(N, K, H, W)`` student logits.
        teacher: ``(N, K, H, W)`` teacher logits.
        temperature: Softening temperature :math:`T` (the loss is scaled by :math:`T^2`).
        batch: ``"mean"`` over the images (default) or ``"sum"`` (the official code's reduction).

    Returns:
        Scalar loss, float32 (float64 for float64 inputs; half precisions upcast).
    """
    if student.shape != teacher.shape or student.dim() != 4:
        raise ValueError(f"pixel_kd_loss needs two (N, K, H, W) logit maps of one shape, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    dtype = compute_dtype(student, teacher)
    n, _, h, w = student.shape
    log_s = F.log_softmax(student.to(dtype) / temperature, dim=1)
    log_t = F.log_softmax(teacher.to(dtype) / temperature, dim=1)
    per_image = F.kl_div(log_s, log_t, reduction="sum", log_target=True) / (h * w)  # summed over the batch
    return per_image * temperature**2 / (n if batch == "mean" else 1)


@register_loss("pixel_kd", help="structured KD's pixel-wise term: per-pixel KL of class distributions (CVPR 2019)")
class PixelKDLoss(DistillLoss):
    """Per-pixel KL between the teacher's and the student's class distributions; see :func:`pixel_kd_loss`.

    Recipe (the official weight with the default mean over the batch)::

        distill:
          - {loss: pixel_kd, weight: 10}

    Args:
        temperature: Softening temperature (the paper and official code: 1); the loss is scaled by its square.
        batch: ``mean`` over the images, or ``sum`` as the official code.
    """
    reads_logits = frozenset({"pixels"})

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """Two equal logit maps ``(K, H, W)``."""
        return (5, 4, 4), (5, 4, 4)

    def __init__(self, *, temperature: Annotated[float, Gt(0)] = 1.0, batch: Literal["mean", "sum"] = "mean") -> None:
        super().__init__()
        self.temperature = temperature
        self.batch = batch

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
        """Per-sample ``(K, H, W)`` logit maps of one shape."""
        if len(student) != 3:
            return f"pixel_kd needs per-sample (K, H, W) logit maps, got {tuple(student)}"
        return super().check_shapes(student, teacher)

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """Pixel-wise KD of two ``(N, K, H, W)`` logit maps; labels are unused."""
        return pixel_kd_loss(student, teacher, self.temperature, self.batch)
