"""Hinton knowledge distillation and plain feature regression."""

from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from annotated_types import Gt
from torch import Tensor

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss
from kdkit.losses.standardize import standardize_logits


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0,
            standardize: bool = False) -> Tensor:
    r"""Hinton et al., "Distilling the Knowledge in a Neural Network" (2015).

    .. math::
        L = T^2 \cdot \frac{1}{B}\sum_b \mathrm{KL}\big(\mathrm{softmax}(z_t^b/T)\,\|\,\mathrm{softmax}(z_s^b/T)\big)

    The :math:`T^2` factor keeps the gradient scale independent of :math:`T`. Computed from
    log-softmaxes on both sides (``log_target``) so saturated teachers never produce ``0 * log 0``.

    Args:
        student_logits: ``(B, K)`` student logits.
        teacher_logits: ``(B, K)`` teacher logits (no gradient needed).
        temperature: Softening temperature ``T``; CIFAR recipes use 4, ImageNet 1.
        standardize: Z-score both logits first (:func:`~kdkit.losses.standardize.standardize_logits`).

    Returns:
        Scalar loss (mean over the batch), in the student's dtype.
    """
    dtype = compute_dtype(student_logits, teacher_logits)
    z_s, z_t = student_logits.to(dtype), teacher_logits.to(dtype)
    if standardize:
        z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
    log_p_s = F.log_softmax(z_s / temperature, dim=1)
    log_p_t = F.log_softmax(z_t / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return (kl * temperature**2).to(student_logits.dtype)


@register_loss("kd", help="Hinton KD: T^2 KL(softmax(z_t/T) || softmax(z_s/T)) (2015)")
class KDLoss(DistillLoss):
    """Hinton KD on logits; see :func:`kd_loss`.

    Recipe::

        distill:
          - {loss: kd, weight: 0.9, temperature: 4}   # with train.ce_weight: 0.1

    With logit standardisation (CVPR 2024; CIFAR: weight 9, CE 0.1, base temperature 2)::

        distill:
          - {loss: kd, weight: 9, temperature: 2, standardize: true}

    Args:
        temperature: Softening temperature (default 4, the CIFAR setting).
        standardize: Z-score teacher and student logits before softening.
    """
    reads_logits = frozenset({"classes"})

    def __init__(self, *, temperature: Annotated[float, Gt(0)] = 4.0, standardize: bool = False) -> None:
        super().__init__()
        self.temperature = temperature
        self.standardize = standardize

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """KD loss of ``(B, K)`` logits; labels are unused."""
        return kd_loss(student, teacher, self.temperature, self.standardize)


def mse_loss(student: Tensor, teacher: Tensor) -> Tensor:
    r"""Mean squared error between a (bridged) student tensor and a teacher tensor of the same shape.

    .. math:: L = \frac{1}{N}\sum_i (f_s^i - f_t^i)^2

    The regression used by FitNets (Romero et al., 2015) after its regressor bridge.

    Args:
        student: ``(B, ...)`` student tensor (after any bridge).
        teacher: ``(B, ...)`` teacher tensor of the same shape.
    """
    dtype = compute_dtype(student, teacher)
    return F.mse_loss(student.to(dtype), teacher.to(dtype)).to(student.dtype)


@register_loss("mse", help="mean squared error between a (bridged) student tap and a teacher tap")
class MSELoss(DistillLoss):
    """Feature regression; pair it with a bridge when the shapes differ.

    Recipe::

        distill:
          - {loss: mse, student: stage2, teacher: stage2, bridge: conv1x1, weight: 1.0}
    """

    default_student_tap = "penultimate"
    default_teacher_tap = "penultimate"

    def __init__(self) -> None:
        super().__init__()

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """MSE of two same-shape tensors; labels are unused."""
        return mse_loss(student, teacher)
