"""The ``ssld`` loss: the student's softmax made consistent with the teacher's, and nothing else (no labels)."""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from annotated_types import Gt
from torch import Tensor

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss


def ssld_loss(student_logits: Tensor, teacher_logits: Tensor, divergence: Literal["js", "soft_ce"] = "js",
              temperature: float = 1.0) -> Tensor:
    r"""SSLD (Cui et al., "Beyond Self-Supervision: A Simple Yet Effective Network Distillation Alternative to Improve
    Backbones", 2021; PaddleClas): the divergence between the teacher's and the student's softmax, batch mean.

    .. math::
        p_s = \mathrm{softmax}(z_s / T),\quad p_t = \mathrm{softmax}(z_t / T),\quad m = \tfrac12 (p_s + p_t)

        \mathrm{js}:\ \tfrac12 \mathrm{KL}(p_t \| m) + \tfrac12 \mathrm{KL}(p_s \| m) \qquad
        \mathrm{soft\_ce}:\ -\textstyle\sum_k p_t^k \log p_s^k

    ``js`` is PaddleClas's SSLD loss (its ablation: JS divergence over the soft cross-entropy baseline), symmetric and
    bounded by ``ln 2``; ``soft_ce`` is that baseline (KL(p_t || p_s) plus the teacher's entropy: same gradients).
    ``log m`` is a log-sum-exp of the two log-softmaxes, never ``log 0``. No ``T^2`` factor: the paper distils at
    ``T = 1``.

    Args:
        student_logits: ``(B, K)``.
        teacher_logits: ``(B, K)``.
        divergence: ``js`` (default) or ``soft_ce``.
        temperature: ``T`` (default 1, the paper's).

    Returns:
        Scalar in the student's dtype (computed in float32 or wider).
    """
    dtype = compute_dtype(student_logits, teacher_logits)
    log_p_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=1)
    if divergence == "soft_ce":
        return -(log_p_t.exp() * log_p_s).sum(1).mean().to(student_logits.dtype)
    log_m = torch.logsumexp(torch.stack([log_p_s, log_p_t]), dim=0) - math.log(2)
    js = 0.5 * (F.kl_div(log_m, log_p_t, reduction="batchmean", log_target=True)
                + F.kl_div(log_m, log_p_s, reduction="batchmean", log_target=True))
    return js.to(student_logits.dtype)


@register_loss("ssld", help="label-free distillation: JS divergence of teacher and student softmaxes (SSLD, Cui et "
                            "al. 2021)")
class SSLDLoss(DistillLoss):
    """SSLD's consistency term; see :func:`ssld_loss`. With the ``ssld`` method's rule ``train.ce_weight: 0`` it is the
    whole objective, so every training image, labelled or not, teaches the same way::

        distill: [{loss: ssld}]
        train: {ce_weight: 0}

    Args:
        divergence: ``js`` (default, PaddleClas's SSLD) or ``soft_ce`` (its soft cross-entropy baseline).
        temperature: Softening temperature (default 1).
    """
    reads_logits = frozenset({"classes"})

    def __init__(self, *, divergence: Literal["js", "soft_ce"] = "js",
                 temperature: Annotated[float, Gt(0)] = 1.0) -> None:
        super().__init__()
        self.divergence, self.temperature = divergence, temperature

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """Loss of ``(B, K)`` student logits against ``(B, K)`` teacher logits; the labels are not read."""
        return ssld_loss(student, teacher, self.divergence, self.temperature)
