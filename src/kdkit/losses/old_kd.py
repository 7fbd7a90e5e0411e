"""Distillation of the old classes' logits in class-incremental segmentation (LwF; MiB's unbiased variant)."""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Gt
from torch import Tensor

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss


def old_kd_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0, unbiased: bool = False) -> Tensor:
    r"""Per-pixel KD from the old model onto the student's old-class outputs (class-incremental step 2).

    The old model (step 1) has ``K_o`` outputs (background and the old classes), the student ``K_n >= K_o`` (the
    same ones first, then the new classes). At each pixel ``i`` of image ``n``:

    .. math::
        \ell = \frac{T^2}{N\,HW}\sum_{n,i}\sum_{c<K_o} q^t_{n,i,c}\,
               \big(\log q^t_{n,i,c} - \log \hat q^s_{n,i,c}\big),\qquad q^t = \mathrm{softmax}(z^t/T)

    * ``unbiased=False`` (default; LwF, Li & Hoiem 2016, as used for segmentation by Michieli & Zanuttigh 2019):
      :math:`\hat q^s = \mathrm{softmax}` over the student's first ``K_o`` logits only (the new outputs left out).
    * ``unbiased=True`` (MiB's :math:`\ell_{kd}`, Cermelli et al. CVPR 2020): :math:`\hat q^s` is the softmax over
      all ``K_n`` logits, the background's probability being that of background *or a new class*
      (:math:`\log\sum_{c \in \{0\} \cup new} e^{z_c}`): the old model calls a new-class pixel background. MiB
      writes the cross-entropy :math:`-\sum q^t \log \hat q^s`; this KL differs by the old model's entropy, a
      constant for the student (same gradient).

    Args:
        student: ``(N, K_n, H, W)`` student logits.
        teacher: ``(N, K_o, H, W)`` old-model logits, ``K_o <= K_n``.
        temperature: :math:`T` (the loss is scaled by :math:`T^2`); MiB and LwF use 1.
        unbiased: MiB's background that absorbs the new classes.

    Returns:
        Scalar, float32 (float64 for float64 inputs; half precisions upcast).
    """
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[2:] != teacher.shape[2:] \
            or teacher.shape[:1] != student.shape[:1] or teacher.shape[1] > student.shape[1]:
        raise ValueError(f"old_kd_loss needs (N, K_n, H, W) student and (N, K_o <= K_n, H, W) old-model logits, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    dtype = compute_dtype(student, teacher)
    old = teacher.shape[1]
    z = student.to(dtype) / temperature
    log_t = F.log_softmax(teacher.to(dtype) / temperature, dim=1)
    if unbiased:
        log_all = z - torch.logsumexp(z, dim=1, keepdim=True)
        background = torch.logsumexp(torch.cat([log_all[:, :1], log_all[:, old:]], dim=1), dim=1, keepdim=True)
        log_s = torch.cat([background, log_all[:, 1:old]], dim=1)
    else:
        log_s = F.log_softmax(z[:, :old], dim=1)
    n, _, h, w = student.shape
    kl = (log_t.exp() * (log_t - log_s)).sum()
    return kl * temperature**2 / (n * h * w)


@register_loss("old_kd", help="class-incremental KD: the old model's per-pixel distribution over its classes into "
                              "the student's old-class outputs (LwF; unbiased: MiB)")
class OldKDLoss(DistillLoss):
    """KD of the old classes' per-pixel distribution (class-incremental step 2); see :func:`old_kd_loss`.

    Recipe (the teacher is the previous step's model, ``teacher.classes`` = the old classes)::

        distill:
          - {loss: old_kd, weight: 10}

    Args:
        temperature: Softening temperature (LwF and MiB: 1).
        unbiased: MiB's unbiased background (default False: plain LwF over the old outputs).
    """

    reads_logits = frozenset({"pixels"})

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """A student with more outputs than the old model: ``(7, 4, 4)`` and ``(4, 4, 4)``."""
        return (7, 4, 4), (4, 4, 4)

    def __init__(self, *, temperature: Annotated[float, Gt(0)] = 1.0, unbiased: bool = False) -> None:
        super().__init__()
        self.temperature, self.unbiased = temperature, unbiased

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
        """``(K_n, H, W)`` and ``(K_o, H, W)`` logit maps, ``K_o <= K_n``."""
        if len(student) != 3 or len(teacher) != 3 or student[1:] != teacher[1:] or teacher[0] > student[0]:
            return (f"old_kd needs per-sample (K_n, H, W) student and (K_o <= K_n, H, W) old-model logit maps, got "
                    f"{tuple(student)} and {tuple(teacher)}")
        return None

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """KD of the old outputs; labels are unused."""
        return old_kd_loss(student, teacher, self.temperature, self.unbiased)
