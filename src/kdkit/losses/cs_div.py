r"""Cauchy-Schwarz divergence distillation of multi-task dense outputs (Xu, Yang and Zhang, "Multi-Task Learning with
Knowledge Distillation for Dense Prediction", ICCV 2023).

The paper distils one multi-task teacher into a multi-task student with the Cauchy-Schwarz divergence instead of KL,
"with an alternative match ... capturing inter-task and intra-task information". For two discrete distributions

.. math::
    D_{CS}(p, q) = -\log\sum_c p_c q_c + \tfrac12\log\sum_c p_c^2 + \tfrac12\log\sum_c q_c^2 \;\ge 0,

symmetric, 0 exactly when :math:`p = q` (Cauchy-Schwarz), and bounded in how strongly one small probability can pull
(no :math:`\log q_c` of a single class: the "less sensitive" divergence).

Source status: only the abstract could be read (no method section, no official code was found in the stored
sources), so the two terms below are kdkit's reading of it, not a verified reproduction:

* **intra-task** (default weight 1): per pixel and per task, the CS divergence between the teacher's and the
  student's distribution of that task (segmentation: softmax over the ``K + 1`` class channels; boundary: the
  Bernoulli pair :math:`(\sigma(z), 1 - \sigma(z))`), averaged over the tasks, pixels and images.
* **inter-task** (default weight 1): per pixel, the CS divergence of the *joint* distribution over both tasks'
  outcomes, the ``K + 3`` vector :math:`\tfrac12(q_0..q_K, b, 1 - b)`. Its normaliser :math:`\sum p^2` mixes the tasks,
  so it is not the sum of the intra terms: it matches how confident each task is relative to the other.

Shapes: ``(N, K + 2, H, W)`` logits of the ``pixels_boundary`` layout (channels ``0..K`` segmentation, the last one
the boundary logit), both networks alike. Computed from log-probabilities with log-sum-exp (finite on extreme logits
and exactly 0, with finite gradients, on identical ones). No :math:`T^2` factor (CS is scale-free in the sharpness).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor

from kdkit.losses.base import compute_dtype, register_loss
from kdkit.losses.multitask_kd import SegBoundaryLoss, split_logits


def cs_divergence_from_logs(log_p: Tensor, log_q: Tensor, dim: int) -> Tensor:
    r""":math:`D_{CS}(p, q)` along ``dim`` of two log-probability tensors (the other dimensions kept)."""
    cross = torch.logsumexp(log_p + log_q, dim)
    return 0.5 * torch.logsumexp(2 * log_p, dim) + 0.5 * torch.logsumexp(2 * log_q, dim) - cross


def task_log_probs(logits: Tensor, temperature: float, seg_channels: int | None) -> tuple[Tensor, Tensor]:
    """Per-pixel log-probabilities of each task: ``(N, K + 1, H, W)`` classes and ``(N, 2, H, W)`` (boundary, not)."""
    seg, bnd = split_logits(logits / temperature, seg_channels)
    return F.log_softmax(seg, 1), torch.stack([F.logsigmoid(bnd), F.logsigmoid(-bnd)], 1)


def cs_multitask_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0, intra_weight: float = 1.0,
                      inter_weight: float = 1.0, seg_channels: int | None = None) -> Tensor:
    r"""Intra-task plus inter-task Cauchy-Schwarz divergence of segmentation + boundary outputs (module docstring).

    .. math::
        \ell = \frac{1}{NHW}\sum_{n,i}\Big(\frac{w_a}{2}\big[D_{CS}(q^t, q^s) + D_{CS}(\beta^t, \beta^s)\big]
               + w_e\,D_{CS}\big(\tfrac12[q^t, \beta^t], \tfrac12[q^s, \beta^s]\big)\Big)_{n,i}

    :math:`q = \mathrm{softmax}(z_{0..K}/T)`, :math:`\beta = (\sigma(z_{K+1}/T), 1 - \sigma(z_{K+1}/T))`.

    Args:
        student: ``(N, K + 2, H, W)`` student logits.
        teacher: ``(N, K + 2, H, W)`` teacher logits.
        temperature: :math:`T` (default 1).
        intra_weight: :math:`w_a`, the intra-task term's weight (default 1).
        inter_weight: :math:`w_e`, the inter-task term's weight (default 1; 0 leaves the intra-task term alone).
        seg_channels: ``K + 1`` (checked); ``None``: all channels but the last.

    Returns:
        Scalar, float32 (float64 for float64 inputs; half precisions upcast).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
    dtype = compute_dtype(student, teacher)
    s_seg, s_bnd = task_log_probs(student.to(dtype), temperature, seg_channels)
    t_seg, t_bnd = task_log_probs(teacher.to(dtype), temperature, seg_channels)
    intra = 0.5 * (cs_divergence_from_logs(s_seg, t_seg, 1) + cs_divergence_from_logs(s_bnd, t_bnd, 1))
    half = math.log(2.0)
    joint_s = torch.cat([s_seg, s_bnd], 1) - half
    joint_t = torch.cat([t_seg, t_bnd], 1) - half
    inter = cs_divergence_from_logs(joint_s, joint_t, 1)
    return (intra_weight * intra + inter_weight * inter).mean()


@register_loss("cs_multitask", help="Cauchy-Schwarz divergence of segmentation + boundary outputs, intra + inter-task "
                                    "(Xu et al., ICCV 2023)")
class CSMultitaskLoss(SegBoundaryLoss):
    """Cauchy-Schwarz multi-task dense distillation; see :func:`cs_multitask_loss` and the module docstring.

    Recipe::

        task: seg_boundary
        distill:
          - {loss: cs_multitask, weight: 1.0}

    Args:
        temperature: Softening temperature (default 1).
        intra_weight: Weight of the per-task CS term.
        inter_weight: Weight of the joint (inter-task) CS term.
        seg_channels: Segmentation channels (background + classes); checked against the output, default all but the
            last.
    """

    loss_name = "cs_multitask"

    def __init__(self, *, temperature: Annotated[float, Gt(0)] = 1.0, intra_weight: Annotated[float, Ge(0)] = 1.0,
                 inter_weight: Annotated[float, Ge(0)] = 1.0,
                 seg_channels: Annotated[int, Ge(2)] | None = None) -> None:
        super().__init__()
        self.temperature, self.intra_weight, self.inter_weight = temperature, intra_weight, inter_weight
        self.seg_channels = seg_channels

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """CS multi-task distillation of two ``(N, K + 2, H, W)`` outputs; labels are unused."""
        return cs_multitask_loss(student, teacher, self.temperature, self.intra_weight, self.inter_weight,
                                 self.seg_channels)
