"""BCKD: binary-classification distillation of a dense detector's class maps and IoU distillation of its boxes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor

from kdkit.errors import KdkitError
from kdkit.losses.base import DistillLoss, compute_dtype, register_loss

#: Added to the union (and enclosing area) of two boxes, as torchvision's box IoU losses do.
IOU_EPS = 1e-7


def edge_distances(box: Tensor, bins: int, coding: Literal["exp", "linear"] = "exp") -> Tensor:
    """Left/top/right/bottom distances ``(..., 4)`` in strides from a dense detector's box regression.

    Args:
        box: ``(..., 4 (bins + 1))`` distribution logits (``bins > 0``, GFL: the expectation over ``0..bins``) or
            ``(..., 4)`` direct regressions (``bins = 0``).
        bins: The detector's ``box_bins``.
        coding: For direct regressions: ``exp`` (``exp(raw)``, clamped at ``e^8`` as the detection task decodes) or
            ``linear`` (``raw``, torchvision's ReLU'd FCOS head).
    """
    if bins:
        probs = box.unflatten(-1, (4, bins + 1)).softmax(-1)
        return (probs * torch.arange(bins + 1, device=box.device, dtype=probs.dtype)).sum(-1)
    return torch.exp(box.clamp(max=8.0)) if coding == "exp" else box


def centred_iou(student: Tensor, teacher: Tensor, kind: Literal["iou", "giou"] = "iou") -> Tensor:
    r"""IoU (or GIoU) of the two boxes ``(-l, -t, r, b)`` that edge distances ``(..., 4)`` describe around one point.

    The student's and the teacher's boxes at a location share its point and stride, and (G)IoU does not change
    when both boxes move or scale together, so the distances in strides give the IoU of the decoded pixel boxes.
    """
    ls, ts, rs, bs = student.unbind(-1)
    lt, tt, rt, bt = teacher.unbind(-1)
    inter = (torch.minimum(ls, lt) + torch.minimum(rs, rt)).clamp(min=0) * \
        (torch.minimum(ts, tt) + torch.minimum(bs, bt)).clamp(min=0)
    union = (ls + rs) * (ts + bs) + (lt + rt) * (tt + bt) - inter
    iou = inter / (union + IOU_EPS)
    if kind == "iou":
        return iou
    enclosing = (torch.maximum(ls, lt) + torch.maximum(rs, rt)) * (torch.maximum(ts, tt) + torch.maximum(bs, bt))
    return iou - (enclosing - union) / (enclosing + IOU_EPS)


def bckd_terms(student: Tensor, teacher: Tensor, num_classes: int, bins: int, *, beta: float = 1.0,
               coding: Literal["exp", "linear"] = "exp", iou: Literal["iou", "giou"] = "iou") -> tuple[
        Tensor, Tensor]:
    r"""BCKD's two sums over the locations (not yet normalised): ``(classification, localization)``.

    .. math::
        L_{cls} = \sum_{l}\sum_{k} \big|p^t_{lk} - p^s_{lk}\big|^{\beta}\,
                  \mathrm{BCE}\big(p^s_{lk}, p^t_{lk}\big),\qquad
        L_{loc} = \sum_{l} w_l\,\big(1 - \mathrm{IoU}(b^s_l, b^t_l)\big),\quad
        w_l = \max_k \big|p^t_{lk} - p^s_{lk}\big|

    with :math:`p = \sigma(\text{class logit})`, :math:`\mathrm{BCE}(p^s, p^t) = -p^t \log p^s - (1 - p^t)
    \log(1 - p^s)` and :math:`b_l` the box the location predicts. The teacher is detached; so is :math:`w_l`
    (the official code computes it from detached scores), while the classification factor
    :math:`|p^t - p^s|^\beta` is differentiated (the official ``novel_kd_loss`` computes it from the live
    student score, as Quality Focal Loss does).

    Args:
        student: ``(B, L, C)`` dense detector output (``K`` class logits, box regression, centerness).
        teacher: ``(B, L, C)`` the teacher's, same layout.
        num_classes: ``K``.
        bins: The detectors' ``box_bins`` (0: 4 direct regressions).
        beta: :math:`\beta`.
        coding: Direct regressions' coding (``bins = 0`` only).
        iou: ``iou`` (:math:`1 - \mathrm{IoU}`) or ``giou`` (:math:`1 - \mathrm{GIoU}`).
    """
    k, box = num_classes, (4 * (bins + 1) if bins else 4)
    teacher = teacher.detach()
    logit_s, logit_t = student[..., :k], teacher[..., :k]
    p_s, p_t = torch.sigmoid(logit_s), torch.sigmoid(logit_t)
    gap = (p_t - p_s).abs()
    bce = F.binary_cross_entropy_with_logits(logit_s, p_t, reduction="none")
    cls = (bce * gap.pow(beta)).sum()
    d_s = edge_distances(student[..., k:k + box], bins, coding)
    d_t = edge_distances(teacher[..., k:k + box], bins, coding)
    loc = (gap.detach().amax(-1) * (1.0 - centred_iou(d_s, d_t, iou))).sum()
    return cls, loc


@register_loss("bckd", help="BCKD: per-class binary-classification distillation of the class maps + teacher-gap "
                            "weighted IoU distillation of the boxes, dense detectors (ICCV 2023)")
class BCKDLoss(DistillLoss):
    r"""Yang, Zhou, Li, Qiao, Li, Yang, Wang and Li, "Bridging Cross-task Protocol Inconsistency for Distillation
    in Dense Object Detection" (ICCV 2023).

    On the dense outputs ``(B, L, C)`` of two detectors with one layout (:class:`kdkit.models.detector.DenseSpec`):
    every class map is a binary classifier, distilled by a sigmoid BCE towards the teacher's probability and
    weighted by their gap; every location's box is distilled by an IoU loss towards the teacher's box, weighted
    by the location's largest class gap (see :func:`bckd_terms`):

    .. math:: L = \frac{1}{N}\big(\lambda_{cls} L_{cls} + \lambda_{loc} L_{loc}\big)

    Defaults are the official GFL config (``configs/bckd``): :math:`\beta = 1`, :math:`\lambda_{cls} = 1`
    (``NovelKDLoss``), :math:`\lambda_{loc} = 4` (``loss_score_kd``), every location distilled.

    Paper vs official code (``TinyTigerPan/BCKD``, ``mmdet/models/dense_heads/ld_head.py``):

    * **Box loss** (``iou``): the paper's IoU-based localization distillation is :math:`1 - \mathrm{IoU}`
      (default ``iou``); the official config computes it with mmdetection's ``GIoULoss`` (``giou``).
    * **Normaliser** :math:`N`: the code divides by the positive locations of its label assignment, which a loss
      does not see; kdkit divides by the GT boxes of the batch (from the detection targets). An FCOS-style
      assignment with center sampling gives a few positives per box (up to 9 at one level), so this is that many
      times the code's value: a matter of the recipe ``weight``.

    Shapes: student and teacher ``(B, L, K + box + 1)`` (``box = 4 (bins + 1)``, or 4 when ``bins = 0``), targets
    ``(B, M, 5)`` (GT boxes, label -1 for padding).

    Args:
        bins: The detectors' ``box_bins`` (0: 4 direct regressions per location).
        box_coding: How direct regressions (``bins: 0``) code a distance: ``exp`` (kdkit's detectors) or ``linear``
            (``tv_fcos``).
        beta: :math:`\beta`, the power of the class gap weighting the BCE.
        cls_weight: :math:`\lambda_{cls}`.
        loc_weight: :math:`\lambda_{loc}`.
        iou: ``iou`` (the paper's :math:`1 - \mathrm{IoU}`) or ``giou`` (the official config's GIoU loss).
    """
    reads_logits = frozenset({"detections"})

    uses_labels = True  # it counts the GT boxes of the detection targets

    def __init__(self, *, bins: Annotated[int, Ge(0)] = 8, box_coding: Literal["exp", "linear"] = "exp",
                 beta: Annotated[float, Ge(0)] = 1.0, cls_weight: Annotated[float, Ge(0)] = 1.0,
                 loc_weight: Annotated[float, Ge(0)] = 4.0, iou: Literal["iou", "giou"] = "iou") -> None:
        super().__init__()
        self.bins, self.box_coding, self.beta = bins, box_coding, beta
        self.cls_weight, self.loc_weight, self.iou = cls_weight, loc_weight, iou

    @property
    def box_channels(self) -> int:
        """Box regression channels per location."""
        return 4 * (self.bins + 1) if self.bins else 4

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """Dense outputs of 6 locations, 3 classes, 8 bins: ``3 + 36 + 1`` channels."""
        return (6, 40), (6, 40)

    @classmethod
    def example_inputs(cls, batch: int, generator: torch.Generator | None = None) -> tuple[Any, Any, Tensor, Tensor]:
        """Random dense outputs and, per image, one box and one padding row (targets ``(B, 2, 5)``)."""
        student, teacher, _, index = super().example_inputs(batch, generator)
        boxes = torch.zeros(batch, 2, 5)
        boxes[:, 0, :4] = torch.tensor([0.1, 0.1, 0.5, 0.6])
        boxes[:, 1, 4] = -1.0
        return student, teacher, boxes, index

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
        """Two dense detector outputs ``(L, C)`` of one layout, with room for a class, the boxes and the centerness."""
        if len(student) != 2 or student[-1] < self.box_channels + 2:
            return (f"BCKD reads a dense detector output (L, K + box + 1) with bins={self.bins} (box = "
                    f"{self.box_channels} channels), got {tuple(student)}: use it with task: detection on the "
                    f"detectors' `logits`, and set `bins` to the detectors' box_bins")
        if tuple(student) != tuple(teacher):
            return (f"student output {tuple(student)} differs from the teacher's {tuple(teacher)}; BCKD needs two "
                    "detectors with the same strides, classes and box_bins")
        return None

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """BCKD of two dense outputs, normalised by the GT boxes of ``labels`` (the detection targets)."""
        if labels.ndim != 3 or labels.shape[-1] != 5:
            raise KdkitError(f"bckd counts the GT boxes of the detection task's targets (B, M, 5), got targets of "
                             f"shape {tuple(labels.shape)}", fix="use bckd with task: detection", where="distill")
        dtype = compute_dtype(student, teacher)
        k = student.shape[-1] - self.box_channels - 1
        cls, loc = bckd_terms(student.to(dtype), teacher.to(dtype), k, self.bins, beta=self.beta,
                              coding=self.box_coding, iou=self.iou)
        boxes = (labels[..., 4] >= 0).sum().clamp(min=1).to(dtype)
        return (self.cls_weight * cls + self.loc_weight * loc) / boxes
