"""Decoupled Knowledge Distillation (DKD): target-class and non-target-class KD, computed in log space."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss
from kdkit.losses.standardize import standardize_logits


def _split_target(z: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Return the target logit ``(B,)`` and the non-target logits ``(B, K-1)`` (class order kept)."""
    batch, classes = z.shape
    gt_mask = torch.zeros(batch, classes, dtype=torch.bool, device=z.device)
    gt_mask[torch.arange(batch, device=z.device), labels] = True
    z_gt = z.gather(1, labels.unsqueeze(1)).squeeze(1)
    z_other = z[~gt_mask].view(batch, classes - 1)
    return z_gt, z_other


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float = 1.0, beta: float = 8.0,
             temperature: float = 4.0, standardize: bool = False) -> Tensor:
    r"""Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022.

    KD is split into a target-class part (TCKD) and a non-target-class part (NCKD). With
    :math:`p = \mathrm{softmax}(z/T)`, the binary distribution :math:`b = [p_{gt},\ 1 - p_{gt}]` and
    :math:`\hat p = \mathrm{softmax}` over the non-target classes only (the gt class removed):

    .. math::
        \mathrm{TCKD} = \frac{T^2}{B}\sum_b \mathrm{KL}(b_t^b \,\|\, b_s^b), \qquad
        \mathrm{NCKD} = \frac{T^2}{B}\sum_b \mathrm{KL}(\hat p_t^b \,\|\, \hat p_s^b), \qquad
        L = \alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD}.

    The paper's warm-up ``min(epoch / 20, 1)`` is not part of this function: kdkit applies it per term, and a
    ``dkd`` term's ``warmup_epochs`` defaults to 20 (see :class:`DKDLoss`).

    Numerics (a deliberate difference from the official code, megvii-research/mdistiller): the reference
    builds ``b`` from probabilities and takes ``torch.log`` of them, which gives ``log 0 = -inf`` and then
    NaN (``0 * -inf``) or infinite gradients when a network saturates (``p_gt`` rounds to exactly 1 or 0).
    Here TCKD is computed entirely in log space: ``log p_gt = log_softmax(z/T)[gt]`` and
    ``log(1 - p_gt) = logsumexp(z_other/T) - logsumexp(z/T)``. Both are evaluated through the exact identity
    ``log p_gt = logsigmoid(d)``, ``log(1 - p_gt) = logsigmoid(-d)`` with ``d = z_gt/T - logsumexp(z_other/T)``,
    which avoids the cancellation of subtracting two nearly equal log-sum-exps; the value is the same.
    For NCKD, mdistiller subtracts ``1000`` from the gt logit (after dividing by ``T``) before the softmax;
    kdkit drops the gt column instead, i.e. masks it to exactly ``-inf`` -- identical unless the gt logit
    exceeds the others by ~1000·T, where the reference's mask stops masking. No switch selects the
    reference numerics: they differ only where the reference is wrong.

    Args:
        student_logits: ``(B, K)`` student logits, ``K >= 2``.
        teacher_logits: ``(B, K)`` teacher logits.
        labels: ``(B,)`` integer class indices (``(B, 1)`` is accepted).
        alpha: TCKD weight (paper: 1).
        beta: NCKD weight (paper CIFAR-100: 8 for R32x4→R8x4, 6 for WRN/VGG pairs, 2 for R56→R20 and
            R110→R32; ImageNet 0.5).
        temperature: Softening temperature ``T`` (paper: 4 on CIFAR-100, 1 on ImageNet).
        standardize: Z-score both logits first (:func:`~kdkit.losses.standardize.standardize_logits`,
            Sun et al., CVPR 2024).

    Returns:
        Scalar loss ``T^2 (alpha·TCKD + beta·NCKD)`` (batch mean), in the student's dtype.

    Raises:
        ValueError: Mismatched shapes, fewer than 2 classes, or labels that are not one index per sample.
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"dkd needs (B, K) student and teacher logits of one shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    batch, classes = student_logits.shape
    if classes < 2:
        raise ValueError(f"dkd needs at least 2 classes, got {classes}")
    labels = labels.reshape(-1)
    if labels.numel() != batch or labels.is_floating_point():
        raise ValueError(f"dkd needs one integer class index per sample ({batch}), got labels of shape "
                         f"{tuple(labels.shape)} and dtype {labels.dtype}")
    labels = labels.long()
    dtype = compute_dtype(student_logits, teacher_logits)
    z_s, z_t = student_logits.to(dtype), teacher_logits.to(dtype)
    if standardize:
        z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
    z_s, z_t = z_s / temperature, z_t / temperature
    gt_s, other_s = _split_target(z_s, labels)
    gt_t, other_t = _split_target(z_t, labels)

    # TCKD: binary [p_gt, 1 - p_gt] distributions, as log-probabilities.
    d_s = gt_s - torch.logsumexp(other_s, dim=1)
    d_t = gt_t - torch.logsumexp(other_t, dim=1)
    log_b_s = torch.stack([F.logsigmoid(d_s), F.logsigmoid(-d_s)], dim=1)
    log_b_t = torch.stack([F.logsigmoid(d_t), F.logsigmoid(-d_t)], dim=1)
    tckd = F.kl_div(log_b_s, log_b_t, reduction="batchmean", log_target=True)

    # NCKD: softmax over the non-target classes only.
    nckd = F.kl_div(F.log_softmax(other_s, dim=1), F.log_softmax(other_t, dim=1), reduction="batchmean",
                    log_target=True)
    loss = (alpha * tckd + beta * nckd) * temperature**2
    return loss.to(student_logits.dtype)


@register_loss("dkd", help="Decoupled KD: T^2 (alpha·TCKD + beta·NCKD), log-space TCKD (CVPR 2022)")
class DKDLoss(DistillLoss):
    """Decoupled KD on logits; see :func:`dkd_loss`. Needs the class labels.

    The term's weight ramps up over ``warmup_epochs`` (default 20, the reference's ``min(epoch / 20, 1)``): at
    full weight from the first step, DKD's gradient on the logits is ~8x the cross-entropy's (T·beta = 32 on
    the non-target term), and the first SGD steps can kill the student (measured on a 3-class image folder,
    resnet8x4, lr 0.05: ReLU features dead, BatchNorm variances ~10^3, every test image given one class).
    ``warmup_epochs: 0`` turns the ramp off.

    Recipe (CIFAR-100, R32x4→R8x4; the paper's CE weight is 1 and its warm-up is ``min(epoch/20, 1)``)::

        distill:
          - {loss: dkd, weight: 1.0, alpha: 1, beta: 8, temperature: 4, warmup_epochs: 20}

    Paper's ``beta`` per pair: 8 (R32x4→R8x4), 6 (WRN40-2→WRN16-2, VGG13→VGG8), 2 (R56→R20, R110→R32).
    ImageNet: ``beta: 0.5, temperature: 1``. With logit standardisation add ``standardize: true`` (and a
    base temperature of 2 or 3).

    Args:
        alpha: TCKD weight (default 1).
        beta: NCKD weight (default 8, the R32x4→R8x4 setting).
        temperature: Softening temperature (default 4, the CIFAR setting).
        standardize: Z-score teacher and student logits before softening.
    """
    reads_logits = frozenset({"classes"})

    default_warmup_epochs = 20.0
    uses_labels = True  # the target class splits the distribution

    def __init__(self, *, alpha: Annotated[float, Ge(0)] = 1.0, beta: Annotated[float, Ge(0)] = 8.0,
                 temperature: Annotated[float, Gt(0)] = 4.0, standardize: bool = False) -> None:
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.standardize = standardize

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """DKD loss of ``(B, K)`` logits with ``(B,)`` class labels."""
        return dkd_loss(student, teacher, labels, self.alpha, self.beta, self.temperature, self.standardize)
