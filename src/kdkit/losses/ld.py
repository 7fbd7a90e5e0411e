"""Localization distillation (LD): KL between the teacher's and the student's box-edge distributions."""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss


def ld_loss(student: Tensor, teacher: Tensor, bins: int, temperature: float = 10.0) -> Tensor:
    r"""Zheng, Ye, Wang, Ren, Zuo and Cheng, "Localization Distillation for Dense Object Detection" (CVPR 2022).

    A detector with General Focal Loss's discretised box regression predicts, at each location, four
    distributions (left, top, right, bottom edge) of :math:`n + 1` logits :math:`z^e` over the distances
    :math:`0..n` strides. LD distils each edge's distribution with a temperature :math:`\tau`:

    .. math:: L_{LD} = \frac{\tau^2}{\sum_l w_l} \sum_l w_l \sum_{e\in\{l,t,r,b\}}
              \mathrm{KL}\big(\mathrm{softmax}(z_T^{l,e}/\tau)\,\big\|\,\mathrm{softmax}(z_S^{l,e}/\tau)\big)

    **Region.** The paper distils the main distillation region (the positive locations of the label
    assignment) and the valuable localization region; mmdetection's ``LDHead`` distils the positives, each weighted
    by the student's (detached) top class score. A kdkit loss sees the per-location tensors, not the assignment, so
    here every location is weighted by the teacher's top class probability :math:`w_l = \max_k \sigma(c_T^{l,k})`
    (detached): the locations the teacher detects something at dominate, background locations fade out. The KL is
    summed over the bins (the paper's KL; mmdetection's ``KnowledgeDistillationKLDivLoss`` averages over the
    :math:`n + 1` bins, i.e. :math:`1/(n+1)` of this, a matter of the recipe ``weight``).

    Args:
        student: ``(B, L, C)`` dense detector output (class logits, ``4 (n + 1)`` box logits, centerness; see
            :class:`kdkit.models.detector.DenseSpec`), ``C = K + 4 (n + 1) + 1``.
        teacher: ``(B, L, C)`` the teacher's, same layout and bins.
        bins: :math:`n` (the detectors' ``box_bins``).
        temperature: :math:`\tau`.

    Returns:
        Scalar, in the inputs' precision (at least float32).
    """
    dtype = compute_dtype(student, teacher)
    student, teacher = student.to(dtype), teacher.to(dtype)
    k = student.shape[-1] - 4 * (bins + 1) - 1
    box_s = student[..., k:k + 4 * (bins + 1)].unflatten(-1, (4, bins + 1))
    box_t = teacher[..., k:k + 4 * (bins + 1)].unflatten(-1, (4, bins + 1))
    weight = torch.sigmoid(teacher[..., :k].detach()).amax(-1)  # (B, L)
    log_p_t = F.log_softmax(box_t / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - F.log_softmax(box_s / temperature, dim=-1))).sum((-1, -2))  # (B, L)
    return temperature**2 * (weight * kl).sum() / weight.sum().clamp(min=torch.finfo(dtype).tiny)


@register_loss("ld", help="LD: KL of teacher/student GFL box-edge distributions, teacher-score weighted (CVPR 2022)")
class LDLoss(DistillLoss):
    """Localization distillation on the dense outputs of two distribution-head detectors; see :func:`ld_loss`.

    Recipe (both detectors with ``box_bins: 8``)::

        distill:
          - {loss: ld, bins: 8, temperature: 10, weight: 0.25}

    Args:
        bins: The detectors' ``box_bins`` :math:`n` (each edge has :math:`n + 1` logits).
        temperature: The softening temperature :math:`\tau` (LD's default 10).
    """
    reads_logits = frozenset({"detections"})

    def __init__(self, *, bins: Annotated[int, Ge(1)] = 8, temperature: Annotated[float, Gt(0)] = 10.0) -> None:
        super().__init__()
        self.bins, self.temperature = bins, temperature

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """Dense outputs of 6 locations, 3 classes, 8 bins: ``3 + 36 + 1`` channels."""
        return (6, 40), (6, 40)

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
        """Same dense layout, with room for ``4 (bins + 1)`` box logits, one class and the centerness."""
        if tuple(student) != tuple(teacher):
            return (f"student output {tuple(student)} differs from the teacher's {tuple(teacher)}; LD needs two "
                    "detectors with the same strides, classes and box_bins")
        if len(student) != 2 or student[-1] < 4 * (self.bins + 1) + 2:
            return (f"LD reads a dense detector output (L, K + 4 (bins + 1) + 1) with bins={self.bins}, got "
                    f"{tuple(student)}: set the detectors' box_bins to {self.bins} (model.params.box_bins)")
        return None

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """LD of two dense outputs; the targets are unused."""
        return ld_loss(student, teacher, self.bins, self.temperature)
