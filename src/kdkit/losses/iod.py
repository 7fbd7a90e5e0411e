"""Within-class and between-class distillation for incremental object detection (Kang et al., ICCV 2023)."""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Lt
from torch import Tensor

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss
from kdkit.losses.old_det_kd import binary_kl, box_channels, dense_classes, teacher_instances

TERMS = ("within_semantic", "within_feature", "between_semantic", "between_feature")


def dense_features(levels: list[Tensor]) -> Tensor:
    """``(B, L, C)`` features at the dense output's locations: each level ``(B, C, H, W)`` row-major, finest first
    (the order in which a kdkit detector concatenates its head's outputs)."""
    return torch.cat([level.flatten(2).transpose(1, 2) for level in levels], dim=1)


def class_means(values: Tensor, classes: Tensor, present: Tensor) -> Tensor:
    """``(Q, D)`` mean of the rows of ``values`` ``(P, D)`` of each class of ``present`` ``(Q,)``."""
    onehot = (classes.unsqueeze(1) == present.unsqueeze(0)).to(values.dtype)  # (P, Q)
    return (onehot.t() @ values) / onehot.sum(0).unsqueeze(1)


def class_balanced_mean(per_instance: Tensor, classes: Tensor, present: Tensor) -> Tensor:
    """Mean over the classes of ``present`` of the mean of ``per_instance`` ``(P,)`` over each class's instances."""
    return class_means(per_instance.unsqueeze(1), classes, present).mean()


def pairwise_sq_distances(x: Tensor) -> Tensor:
    """``(Q, Q)`` squared Euclidean distances between the rows of ``x`` (as differences: exact zero diagonal)."""
    return ((x.unsqueeze(1) - x.unsqueeze(0)) ** 2).sum(-1)


def distance_gap(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over the class pairs ``c < c'`` of the squared gap of the two ``(Q, Q)`` distance matrices (0 for
    fewer than two classes)."""
    q = student.shape[0]
    if q < 2:
        return student.new_zeros(())
    upper = torch.triu(torch.ones(q, q, dtype=torch.bool, device=student.device), diagonal=1)
    return ((student - teacher)[upper] ** 2).mean()


def iod_terms(student_features: Tensor, teacher_features: Tensor, student_dense: Tensor, teacher_dense: Tensor,
              bins: int = 8, threshold: float = 0.5) -> dict[str, Tensor]:
    r"""The four terms of the within-class / between-class distillation (see :class:`IODLoss`), unweighted.

    Args:
        student_features: ``(B, L, C)`` the student's features at the dense locations (:func:`dense_features`).
        teacher_features: ``(B, L, C)`` the old model's.
        student_dense: ``(B, L, K_n + box + 1)`` the student's dense output.
        teacher_dense: ``(B, L, K_o + box + 1)`` the old model's, ``K_o <= K_n``.
        bins: The detectors' ``box_bins``.
        threshold: The old model's score from which a location is an instance (one of its detections).

    Returns:
        ``within_semantic``, ``within_feature``, ``between_semantic``, ``between_feature``: scalars in the inputs'
        precision (at least float32); all zero when the old model detects nothing in the batch.
    """
    dtype = compute_dtype(student_features, teacher_features, student_dense, teacher_dense)
    old = dense_classes(teacher_dense.shape[-1], bins)
    positive, cls = teacher_instances(teacher_dense[..., :old], threshold)
    if not bool(positive.any()):
        zero = student_dense.new_zeros((), dtype=dtype)
        return dict.fromkeys(TERMS, zero)
    classes = cls[positive]  # (P,)
    present = torch.unique(classes)
    zs, zt = student_dense[..., :old].to(dtype)[positive], teacher_dense[..., :old].to(dtype)[positive]  # (P, K_o)
    hs, ht = student_features.to(dtype)[positive], teacher_features.to(dtype)[positive]  # (P, C)
    within_semantic = class_balanced_mean(binary_kl(zs, zt).sum(-1), classes, present)
    within_feature = class_balanced_mean(((hs - ht) ** 2).mean(-1), classes, present)
    ps, pt = class_means(torch.sigmoid(zs), classes, present), class_means(torch.sigmoid(zt), classes, present)
    between_semantic = distance_gap(pairwise_sq_distances(ps), pairwise_sq_distances(pt))
    ms = F.normalize(class_means(hs, classes, present), dim=-1)
    mt = F.normalize(class_means(ht, classes, present), dim=-1)
    between_feature = distance_gap(pairwise_sq_distances(ms), pairwise_sq_distances(mt))
    return {"within_semantic": within_semantic, "within_feature": within_feature,
            "between_semantic": between_semantic, "between_feature": between_feature}


@register_loss("iod", help="IOD (ICCV 2023): within-class (instance semantic + feature KD per class) and between-class "
                           "(class prototypes' semantic and feature distances) distillation from the old detector; "
                           "student/teacher: [FPN levels..., logits]")
class IODLoss(DistillLoss):
    r"""Kang, Zhang, Zhang, Wang, Chen, Ma & Huang, "Alleviating Catastrophic Forgetting of Incremental Object
    Detection via Within-Class and Between-Class Knowledge Distillation", ICCV 2023.

    The paper: forgetting in IOD destroys the *semantic feature space*; the old model (teacher) preserves it by
    distilling, with Deformable DETR, *within-class consistency* (instance-level semantic and feature information
    within each category) and *between-class discriminativeness* (class-level semantic distance and feature
    distance among categories), next to response distillation of the old classes (here the separate term
    ``old_det_kd``, :func:`~kdkit.losses.old_det_kd.old_det_kd_loss`).

    **Reconstruction.** Only the abstract could be read here (no official code was found); the formulas below are
    kdkit's reading of it, for kdkit's dense FCOS-style detectors instead of DETR's queries:

    * *Instances* are the old model's detections: the locations whose top old-class sigmoid probability reaches
      ``threshold``, each of the class :math:`y_i` of that top probability (DETR's queries matched to the old
      model's predictions; step 2's ground truth annotates only new classes, which the old model does not know, so
      only its own detections carry old-class semantics). They are pooled over the batch.
    * *Semantic information* of instance :math:`i`: its old-class probabilities :math:`s_i = \sigma(z_i) \in
      [0, 1]^{K_o}` (the student's first :math:`K_o` logits); *feature information*: the FPN feature
      :math:`h_i \in \mathbb{R}^C` at that location (the taps before the dense output, one per level).
    * Within-class consistency, each class :math:`c` of the batch's instances :math:`P_c` weighing alike:

      .. math::
          L_{ws} = \frac{1}{|Y|}\sum_{c \in Y}\frac{1}{|P_c|}\sum_{i \in P_c}\sum_{k<K_o}
                   \mathrm{KL}\big(\sigma(z^t_{ik})\,\|\,\sigma(z^s_{ik})\big),\qquad
          L_{wf} = \frac{1}{|Y|}\sum_{c \in Y}\frac{1}{|P_c|}\sum_{i \in P_c}\frac{\lVert h^s_i - h^t_i\rVert^2}{C}

    * Between-class discriminativeness on the class prototypes (means over :math:`P_c`): semantic
      :math:`\pi_c = \overline{s_i}`, feature :math:`\mu_c = \overline{h_i} / \lVert\overline{h_i}\rVert` (unit
      length, so only their directions count), with :math:`D_{cc'} = \lVert x_c - x_{c'}\rVert^2`:

      .. math::
          L_{bs} = \frac{2}{|Y|(|Y| - 1)}\sum_{c < c'}\big(D^s_{cc'}(\pi) - D^t_{cc'}(\pi)\big)^2,\qquad
          L_{bf} = \text{the same with } \mu

      (0 with fewer than two classes in the batch). Student prototypes average the student's values over the
      *same* instances (the old model's), so the two matrices compare like with like.

    The loss is :math:`w_{ws} L_{ws} + w_{wf} L_{wf} + w_{bs} L_{bs} + w_{bf} L_{bf}`, every weight 1 by default
    (the paper's weights are not known here). The paper's "dynamic" distillation is read as the instances and
    prototypes being recomputed from the old model's predictions on every batch (no stored prototypes).

    Recipe (step 2, both detectors of one arch, the teacher step 1's; taps: the FPN levels then the dense output)::

        distill:
          - {loss: old_det_kd, bins: 8}
          - {loss: iod, bins: 8, student: [p2, p3, p4, logits], teacher: [p2, p3, p4, logits]}

    Args:
        bins: The detectors' ``box_bins`` (0: direct distances).
        threshold: Old-model score from which a location is an instance.
        within_semantic: :math:`w_{ws}`.
        within_feature: :math:`w_{wf}`.
        between_semantic: :math:`w_{bs}`.
        between_feature: :math:`w_{bf}`.
    """

    pairwise = False
    reads_logits = frozenset({"detections"})

    def __init__(self, *, bins: Annotated[int, Ge(0)] = 8, threshold: Annotated[float, Gt(0), Lt(1)] = 0.5,
                 within_semantic: Annotated[float, Ge(0)] = 1.0, within_feature: Annotated[float, Ge(0)] = 1.0,
                 between_semantic: Annotated[float, Ge(0)] = 1.0,
                 between_feature: Annotated[float, Ge(0)] = 1.0) -> None:
        super().__init__()
        self.bins, self.threshold = bins, threshold
        self.weights = {"within_semantic": within_semantic, "within_feature": within_feature,
                        "between_semantic": between_semantic, "between_feature": between_feature}

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """FPN levels ``(4, 2, 2)`` and ``(4, 1, 1)`` (5 locations) and dense outputs of 8 bins: 3 student classes
        (``3 + 36 + 1``), 2 old ones."""
        return [(4, 2, 2), (4, 1, 1), (5, 40)], [(4, 2, 2), (4, 1, 1), (5, 39)]

    def check_shapes(self, student: Any, teacher: Any) -> str | None:
        """``[levels (C, H, W)..., dense (L, K + box + 1)]`` each, one feature layout, ``L`` = the levels'
        locations, ``1 <= K_o <= K_n``."""
        problem = (f"iod needs student and teacher taps [FPN levels..., logits]: per-sample [(C, H, W)..., (L, K + "
                   f"{box_channels(self.bins)} + 1)] with bins={self.bins}, the same levels, L their H x W summed, "
                   f"the old model's K_o in 1..the student's K_n; got {student} and {teacher}")
        try:
            s, t = [[tuple(x) for x in taps] for taps in (student, teacher)]
        except TypeError:
            return problem
        if len(s) < 2 or len(s) != len(t) or s[:-1] != t[:-1] or any(len(x) != 3 for x in s[:-1]) \
                or len(s[-1]) != 2 or len(t[-1]) != 2 or s[-1][0] != t[-1][0] \
                or s[-1][0] != sum(h * w for _, h, w in s[:-1]) or len({c for c, _, _ in s[:-1]}) != 1 \
                or not 1 <= dense_classes(t[-1][1], self.bins) <= dense_classes(s[-1][1], self.bins):
            return problem
        return None

    def forward(self, student: list[Tensor], teacher: list[Tensor], labels: Tensor) -> Tensor:
        """The weighted sum of :func:`iod_terms`; the targets are unused."""
        terms = iod_terms(dense_features(student[:-1]), dense_features(teacher[:-1]), student[-1], teacher[-1],
                          self.bins, self.threshold)
        return torch.stack([self.weights[name] * terms[name] for name in TERMS]).sum()
