"""Response distillation of the old classes in class-incremental detection (dense FCOS-style detectors)."""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Lt
from torch import Tensor

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss


def box_channels(bins: int) -> int:
    """Box regression channels per location: 4 distances, or 4 distributions of ``bins + 1`` logits."""
    return 4 * (bins + 1) if bins else 4


def dense_classes(channels: int, bins: int) -> int:
    """Class logits ``K`` of a dense output of ``channels = K + box + 1`` per location."""
    return channels - box_channels(bins) - 1


def teacher_instances(teacher_classes: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """The old model's detected objects: locations whose top old-class probability reaches ``threshold``.

    Args:
        teacher_classes: ``(B, L, K_o)`` the old model's class logits.
        threshold: Smallest top sigmoid probability of a positive.

    Returns:
        ``(B, L)`` bool positives and ``(B, L)`` int64 classes (the argmax; meaningful at the positives).
    """
    score, cls = torch.sigmoid(teacher_classes.detach()).max(-1)
    return score >= threshold, cls


def binary_kl(student: Tensor, teacher: Tensor) -> Tensor:
    r"""Elementwise :math:`\mathrm{KL}(\mathrm{Bern}(\sigma(t))\,\|\,\mathrm{Bern}(\sigma(s)))` of logits (stable
    through ``logsigmoid``): the sigmoid classifiers' KD, zero where the logits agree."""
    p = torch.sigmoid(teacher)
    return p * (F.logsigmoid(teacher) - F.logsigmoid(student)) + (1 - p) * (F.logsigmoid(-teacher)
                                                                          - F.logsigmoid(-student))


def old_det_kd_loss(student: Tensor, teacher: Tensor, bins: int = 8, threshold: float = 0.5,
                    box_weight: float = 1.0) -> Tensor:
    r"""Response distillation from the old detector onto the student's old classes (class-incremental step 2).

    The old model (step 1) outputs ``K_o`` class logits per location, the student ``K_n >= K_o`` (the same ones
    first, then the new classes; the box regression and centerness follow, class-agnostic). IOD's response
    distillation (Shmelkov et al., ICCV 2017, on the old classes' scores and the boxes; ERD, Feng et al., CVPR 2022,
    for dense one-stage detectors; Kang et al., ICCV 2023, combine it with their within/between-class terms) keeps
    the old classes' responses where step 2's labels call old objects background. With :math:`P` the old model's
    detections (locations whose top old-class probability :math:`\max_c \sigma(z^t_{ic}) \ge` ``threshold``):

    .. math::
        \ell = \frac{1}{\max(|P|, 1)}\Big(\sum_{b,i}\sum_{c<K_o}\mathrm{KL}\big(\sigma(z^t_{ic})\,\|\,
               \sigma(z^s_{ic})\big) + \lambda_{box}\sum_{i \in P}\frac{\lVert r^s_i - r^t_i\rVert^2}{R}\Big)

    * classes: the binary KL of the sigmoid scores (FCOS classifies by independent sigmoids) at every location:
      an old object keeps its score and the background stays background;
    * boxes: the squared difference of the raw box-regression and centerness channels (:math:`R` of them: 4
      distances or ``4 (bins + 1)`` GFL logits, plus one) at the old model's detections only;
    * normalised by the detections, as FCOS's loss by its positives (so the two weigh alike per object).

    kdkit's choices (the papers differ in detector): the threshold on the old model's score instead of ERD's
    per-image statistics, the KL instead of ERD's L2 of scores, the squared raw-channel distance for the boxes.

    Args:
        student: ``(B, L, K_n + box + 1)`` the student's dense output.
        teacher: ``(B, L, K_o + box + 1)`` the old model's, ``K_o <= K_n``, same box layout.
        bins: The detectors' ``box_bins`` (0: 4 direct distances).
        threshold: The old model's score from which a location is one of its detections.
        box_weight: :math:`\lambda_{box}`.

    Returns:
        Scalar, in the inputs' precision (at least float32).
    """
    dtype = compute_dtype(student, teacher)
    student, teacher = student.to(dtype), teacher.to(dtype)
    old, new = dense_classes(teacher.shape[-1], bins), dense_classes(student.shape[-1], bins)
    positive, _ = teacher_instances(teacher[..., :old], threshold)
    count = positive.sum().clamp(min=1).to(dtype)
    loss = binary_kl(student[..., :old], teacher[..., :old]).sum()
    if box_weight:
        diff = student[..., new:] - teacher[..., old:]  # box regression and centerness
        loss = loss + box_weight * (diff[positive] ** 2).sum() / diff.shape[-1]
    return loss / count


@register_loss("old_det_kd", help="class-incremental detection KD: the old detector's class scores (all locations) "
                                  "and boxes (its detections) into the student's old classes")
class OldDetKDLoss(DistillLoss):
    """Response distillation of the old classes of a dense detector; see :func:`old_det_kd_loss`.

    Recipe (the teacher is step 1's detector, ``teacher.classes`` = the old classes)::

        distill:
          - {loss: old_det_kd, bins: 8, weight: 1}

    Args:
        bins: The detectors' ``box_bins`` (0: direct distances).
        threshold: Old-model score from which a location is one of its detections (box distillation, normaliser).
        box_weight: Weight of the box and centerness distillation at those locations.
    """

    reads_logits = frozenset({"detections"})

    def __init__(self, *, bins: Annotated[int, Ge(0)] = 8, threshold: Annotated[float, Gt(0), Lt(1)] = 0.5,
                 box_weight: Annotated[float, Ge(0)] = 1.0) -> None:
        super().__init__()
        self.bins, self.threshold, self.box_weight = bins, threshold, box_weight

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """Dense outputs of 6 locations, 8 bins: 3 student classes (``3 + 36 + 1``), 2 old ones (``2 + 36 + 1``)."""
        return (6, 40), (6, 39)

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
        """Dense ``(L, K + box + 1)`` outputs of the same locations, at least one old class, ``K_o <= K_n``."""
        if len(student) != 2 or len(teacher) != 2 or student[0] != teacher[0] \
                or not 1 <= dense_classes(teacher[1], self.bins) <= dense_classes(student[1], self.bins):
            return (f"old_det_kd needs dense detector outputs (L, K + {box_channels(self.bins)} + 1) with "
                    f"bins={self.bins}, the old model's K_o in 1..the student's K_n, got {tuple(student)} and "
                    f"{tuple(teacher)}: set bins to the detectors' box_bins")
        return None

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """Response KD of the old classes; the targets are unused."""
        return old_det_kd_loss(student, teacher, self.bins, self.threshold, self.box_weight)
