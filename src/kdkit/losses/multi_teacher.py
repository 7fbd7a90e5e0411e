"""Multi-teacher KD with averaged soft targets."""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Gt
from torch import Tensor

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss


def multi_teacher_kd_loss(student_logits: Tensor, teacher_logits: list[Tensor], temperature: float = 4.0) -> Tensor:
    r"""You et al., "Learning from Multiple Teacher Networks" (KDD 2017): KD towards the teachers' averaged
    soft targets.

    .. math::
        \bar p = \frac{1}{M}\sum_{m=1}^{M} \mathrm{softmax}(z_m/T), \qquad
        L = T^2 \cdot \frac{1}{B}\sum_b \mathrm{KL}\big(\bar p^b \,\|\, \mathrm{softmax}(z_s^b/T)\big)

    The average is of probabilities, not of logits (averaging logits is a different ensemble: the
    ``logits`` tap of a teacher ensemble). ``log p-bar`` is computed as a log-sum-exp of the members'
    log-softmaxes minus ``log M``, so saturated teachers never produce ``log 0``. With one teacher this
    is exactly :func:`~kdkit.losses.kd.kd_loss`.

    Args:
        student_logits: ``(B, K)`` student logits.
        teacher_logits: ``M`` tensors ``(B, K)``, one per teacher.
        temperature: Softening temperature ``T``.

    Returns:
        Scalar loss (mean over the batch), in the student's dtype.
    """
    if not teacher_logits:
        raise ValueError("multi_teacher_kd needs at least one teacher's logits")
    dtype = compute_dtype(student_logits, *teacher_logits)
    log_p_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    log_p_m = torch.stack([F.log_softmax(z.to(dtype) / temperature, dim=1) for z in teacher_logits])
    log_p_bar = torch.logsumexp(log_p_m, dim=0) - math.log(len(teacher_logits))
    kl = F.kl_div(log_p_s, log_p_bar, reduction="batchmean", log_target=True)
    return (kl * temperature**2).to(student_logits.dtype)


@register_loss("multi_teacher_kd", help="KD towards several teachers' averaged soft targets (You et al., KDD 2017)")
class MultiTeacherKDLoss(DistillLoss):
    """KD towards the averaged soft targets of several teachers; see :func:`multi_teacher_kd_loss`.

    The term reads one student tap and a list of teacher taps, one per teacher of ``teachers:``::

        teachers:
          narrow: {arch: cnn_teacher, recipe: teacher.yaml}
          pooled: {arch: cnn_teacher, recipe: teacher_pool.yaml}
        distill:
          - {loss: multi_teacher_kd, teacher: [narrow.logits, pooled.logits], temperature: 4}

    Args:
        temperature: Softening temperature (default 4).
    """
    reads_logits = frozenset({"classes"})

    pairwise = False
    teacher_list = True

    def __init__(self, *, temperature: Annotated[float, Gt(0)] = 4.0) -> None:
        super().__init__()
        self.temperature = temperature

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        return (10,), [(10,), (10,)]

    def check_shapes(self, student: Any, teacher: Any) -> str | None:
        """One ``(K,)`` student tap and a list of ``(K,)`` teacher taps."""
        shapes = teacher if isinstance(teacher, list) else [teacher]
        if any(tuple(t) != tuple(student) for t in shapes) or len(tuple(student)) != 1:
            return f"needs (K,) logits on both sides, got student {tuple(student)} and teachers {shapes}"
        return None

    def forward(self, student: Tensor, teacher: Tensor | list[Tensor], labels: Tensor) -> Tensor:
        """Loss of ``(B, K)`` student logits against a list of ``(B, K)`` teacher logits."""
        return multi_teacher_kd_loss(student, teacher if isinstance(teacher, list) else [teacher], self.temperature)
