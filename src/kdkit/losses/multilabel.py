"""Multi-label KD (L2D, ICCV 2023): per-class binary KL on sigmoid logits, and label-wise embedding relations."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval
from torch import Tensor

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss

_PAPER = 'Yang, Xie, Zong, Feng, Niu, Sugiyama, Huang, "Multi-Label Knowledge Distillation", ICCV 2023'


def mld_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
             clamp_eps: float = 0.0) -> Tensor:
    r"""Multi-label logits distillation (MLD) of Yang et al., "Multi-Label Knowledge Distillation", ICCV 2023.

    A multi-label (sigmoid) head is split one-versus-all into ``K`` binary problems; each is distilled with
    the KL divergence between the teacher's and the student's Bernoulli distributions:

    .. math::
        L = \frac{T^2}{B}\sum_{b}\sum_{k} \mathrm{KL}\big(\mathrm{Bern}(\sigma(z_t^{bk}/T))\,\|\,
            \mathrm{Bern}(\sigma(z_s^{bk}/T))\big),
        \quad \mathrm{KL}(\mathrm{Bern}(p)\|\mathrm{Bern}(q)) = p\log\tfrac{p}{q} + (1-p)\log\tfrac{1-p}{1-q}.

    Summed over classes and averaged over the batch, as the official code (penghui-yang/L2D, ``MLD`` with
    its default ``reduction="batchmean"``). The logs are ``logsigmoid(z)`` and ``logsigmoid(-z)``, so
    saturated outputs never give ``log 0``.

    Choices against the paper / official code:

    - Temperature: neither the paper nor the official code uses one (``T = 1``, the default, reproduces
      them); ``temperature`` with the usual ``T^2`` factor is a kdkit extension.
    - Clamping: the official code clamps both probabilities to ``[1e-8, 1 - 1e-8]`` before taking logs;
      the paper's formula does not. Default ``clamp_eps=0`` is the exact formula; ``clamp_eps=1e-8``
      reproduces the official code (implemented as clamping ``z/T`` to ``±log((1-eps)/eps)``, which is the
      same thing since the sigmoid is monotone; like the official code it stops the gradient of outputs
      beyond the clamp). Note that in float32 the official upper bound ``1 - 1e-8`` rounds to 1, so the
      official code still takes ``log 0`` (inf/NaN) once a sigmoid saturates at 1 (logit > ~17); kdkit
      applies the clamp as intended (the official code's float64 values) and stays finite.

    The paper's total loss is ``BCE + 10·MLD + 100·CD + 1000·ID`` (see :func:`label_relation_loss`).

    Args:
        student_logits: ``(B, K)`` student sigmoid logits (any trailing shape is summed over like ``K``).
        teacher_logits: Teacher logits of the same shape.
        temperature: Softening temperature ``T`` (default 1: the paper's and official code's setting).
        clamp_eps: Clamp the probabilities to ``[eps, 1 - eps]`` first (official code: ``1e-8``).

    Returns:
        Scalar loss, in the student's dtype.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() < 2:
        raise ValueError(f"multilabel_kd needs (B, K) student and teacher logits of one shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    dtype = compute_dtype(student_logits, teacher_logits)
    z_s = student_logits.to(dtype) / temperature
    z_t = teacher_logits.to(dtype) / temperature
    if clamp_eps > 0:
        bound = math.log((1 - clamp_eps) / clamp_eps)
        z_s, z_t = z_s.clamp(-bound, bound), z_t.clamp(-bound, bound)
    log_p_s, log_q_s = F.logsigmoid(z_s), F.logsigmoid(-z_s)  # log sigma(z), log(1 - sigma(z))
    log_p_t, log_q_t = F.logsigmoid(z_t), F.logsigmoid(-z_t)
    kl = log_p_t.exp() * (log_p_t - log_p_s) + log_q_t.exp() * (log_q_t - log_q_s)
    loss = kl.sum() / student_logits.shape[0] * temperature**2
    return loss.to(student_logits.dtype)


def _relation_term(student: Tensor, teacher: Tensor, member: Tensor, reduction: str, eps: float) -> Tensor:
    """Distance-relation loss of ``G`` groups of ``n`` embeddings: ``(G, n, D_s)``, ``(G, n, D_t)``.

    ``member`` ``(G, n)`` says which embeddings take part in each group; groups with fewer than 2 members are
    skipped. Per group: pairwise Euclidean distances among its members, divided by their mean over distinct
    pairs; smooth-L1 between student and teacher summed over pairs and divided by the member count.
    """
    n = student.shape[1]
    pairs = member.unsqueeze(2) & member.unsqueeze(1) & ~torch.eye(n, dtype=torch.bool, device=student.device)
    pairs_f = pairs.to(student.dtype)
    n_pairs = pairs_f.sum(dim=(1, 2))

    def normalised_distances(e: Tensor) -> Tensor:
        sq = e.pow(2).sum(dim=2)
        d = (sq.unsqueeze(2) + sq.unsqueeze(1) - 2 * e @ e.transpose(1, 2)).clamp(min=eps).sqrt() * pairs_f
        mean = d.sum(dim=(1, 2)) / n_pairs.clamp(min=1)
        return d / mean.clamp(min=eps).view(-1, 1, 1)

    diff = F.smooth_l1_loss(normalised_distances(student), normalised_distances(teacher), reduction="none")
    count = member.sum(dim=1)
    used = count >= 2
    per_group = (diff * pairs_f).sum(dim=(1, 2)) / count.clamp(min=1) * used
    if reduction == "mean":
        return per_group.sum() / used.sum().clamp(min=1)
    return per_group.sum()


def label_relation_loss(student_emb: Tensor, teacher_emb: Tensor, labels: Tensor | None = None,
                        class_weight: float = 1.0, instance_weight: float = 10.0,
                        reduction: Literal["sum", "mean"] = "sum", eps: float = 1e-12) -> Tensor:
    r"""Label-wise embedding distillation (LED) of Yang et al., "Multi-Label Knowledge Distillation", ICCV 2023.

    On label-wise embeddings ``e[b, k]`` (one ``D``-vector per sample and label, e.g. from a query/ML-Decoder
    head), two relation terms match the teacher's geometry with RKD-style normalised distances:

    - class-aware (CD): for each class ``k``, the distances between the embeddings ``e[:, k]`` of the
      samples of the batch that are positive for ``k`` (compactness of each class across instances);
    - instance-aware (ID): for each sample ``b``, the distances between the embeddings ``e[b, :]`` of its
      positive labels (separation of the labels within one image).

    For a group of ``n >= 2`` embeddings, :math:`\psi_{ij} = \lVert e_i - e_j\rVert_2 / \mu` with :math:`\mu`
    the mean distance over the pairs ``i != j``; the group's loss is
    :math:`\frac{1}{n}\sum_{i \ne j} \mathrm{smooth\_L1}(\psi^s_{ij} - \psi^t_{ij})` (Huber, threshold 1).
    Groups with fewer than 2 members are skipped. Then

    .. math:: L = w_c \sum_{k} L^{CD}_k + w_i \sum_b L^{ID}_b.

    This follows the official code (penghui-yang/L2D, ``le_based/cd.py``, ``id.py``, ``huber_dist.py``):
    positives come from the ground-truth labels, distances via the Gram expansion clamped at ``eps``
    before the square root, and the per-class / per-sample losses are **summed** (``reduction="sum"``, the
    default; its scale grows with the number of classes and the batch size, and the paper's weights were
    tuned with it). ``reduction="mean"`` averages over the groups that have >= 2 members instead -- a kdkit
    option. The paper's text gives the same definitions; its exact normalisation could not be checked
    beyond the official code, which is what is implemented. With ``labels=None`` every label of every
    sample takes part (the plain "pairwise distances normalised by their mean" description, usable without
    multi-hot labels). The paper's weights are ``100·CD + 1000·ID``: the defaults ``class_weight=1,
    instance_weight=10`` keep that ratio, so a term weight of 100 reproduces it.

    Args:
        student_emb: ``(B, K, D_s)`` student label-wise embeddings.
        teacher_emb: ``(B, K, D_t)`` teacher label-wise embeddings (``D_t`` may differ from ``D_s``).
        labels: ``(B, K)`` multi-hot ground truth (positive where ``> 0.5``), or ``None`` to use all.
        class_weight: Weight of the class-aware term.
        instance_weight: Weight of the instance-aware term.
        reduction: ``"sum"`` over classes / samples (official code) or ``"mean"`` over the groups used.
        eps: Clamp of the squared distances (official code: ``1e-12``).

    Returns:
        Scalar loss, in the student's dtype.
    """
    if student_emb.dim() != 3 or teacher_emb.dim() != 3 or student_emb.shape[:2] != teacher_emb.shape[:2]:
        raise ValueError(f"label_relation needs (B, K, D) student and teacher embeddings with equal B and K, got "
                         f"{tuple(student_emb.shape)} and {tuple(teacher_emb.shape)}")
    batch, classes = student_emb.shape[:2]
    if labels is None:
        member = torch.ones(batch, classes, dtype=torch.bool, device=student_emb.device)
    else:
        if tuple(labels.shape) != (batch, classes):
            raise ValueError(f"label_relation needs multi-hot labels of shape ({batch}, {classes}), got "
                             f"{tuple(labels.shape)}; for single-label data set use_labels: false")
        member = labels > 0.5
    dtype = compute_dtype(student_emb, teacher_emb)
    e_s, e_t = student_emb.to(dtype), teacher_emb.to(dtype)
    loss = e_s.new_zeros(())
    if class_weight:
        cd = _relation_term(e_s.transpose(0, 1), e_t.transpose(0, 1), member.t(), reduction, eps)
        loss = loss + class_weight * cd
    if instance_weight:
        loss = loss + instance_weight * _relation_term(e_s, e_t, member, reduction, eps)
    return loss.to(student_emb.dtype)


@register_loss("multilabel_kd", help="multi-label KD: per-class binary KL of sigmoid logits (L2D MLD, ICCV 2023)")
class MultiLabelKDLoss(DistillLoss):
    """Multi-label logits distillation for sigmoid heads; see :func:`mld_loss`.

    Recipe (the paper's weight 10, next to the BCE task loss)::

        distill:
          - {loss: multilabel_kd, weight: 10}
          - {loss: label_relation, weight: 100}   # 100·CD + 1000·ID

    Args:
        temperature: Softening temperature (default 1, as the paper; the loss is scaled by ``T^2``).
        clamp_eps: Clamp probabilities to ``[eps, 1 - eps]`` (0: exact; ``1e-8``: the official code).
    """
    reads_logits = frozenset({"labels", "classes"})  # per-class binary KL: single-label logits too (L2D MLD)

    def __init__(self, *, temperature: Annotated[float, Gt(0)] = 1.0,
                 clamp_eps: Annotated[float, Interval(ge=0, lt=0.5)] = 0.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.clamp_eps = clamp_eps

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """MLD loss of ``(B, K)`` sigmoid logits; labels are unused."""
        return mld_loss(student, teacher, self.temperature, self.clamp_eps)


@register_loss("label_relation", help="L2D label-wise embedding relations: class- and instance-aware (ICCV 2023)")
class LabelRelationLoss(DistillLoss):
    """Class- and instance-aware relations of label-wise embeddings; see :func:`label_relation_loss`.

    Reads ``(B, K, D)`` label-wise embeddings (tap ``label_embeddings``); student and teacher widths may
    differ, the number of labels ``K`` may not. Recipe (the paper's ``100·CD + 1000·ID``)::

        distill:
          - {loss: label_relation, weight: 100}

    To log the two terms separately::

        distill:
          - {loss: label_relation, weight: 100, instance_weight: 0}
          - {loss: label_relation, weight: 1000, class_weight: 0, instance_weight: 1}

    Args:
        class_weight: Weight of the class-aware term (default 1).
        instance_weight: Weight of the instance-aware term (default 10, the paper's ratio 1000/100).
        reduction: ``"sum"`` over classes / samples (official code) or ``"mean"`` over them.
        use_labels: Restrict each relation to the positive labels (paper); ``false`` uses every label, e.g.
            when the batch's labels are class indices rather than multi-hot vectors.
    """

    default_student_tap = "label_embeddings"
    default_teacher_tap = "label_embeddings"

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """Five label-wise embeddings per sample, of different widths."""
        return (5, 6), (5, 8)

    @classmethod
    def example_inputs(cls, batch: int, generator: torch.Generator | None = None) -> tuple[Any, Any, Tensor, Tensor]:
        """Multi-hot ``(B, K)`` labels (each sample and label positive with probability 1/2)."""
        student, teacher, _, index = super().example_inputs(batch, generator)
        classes = cls.example_shapes()[0][0]
        return student, teacher, (torch.rand(batch, classes, generator=generator) < 0.5).float(), index

    def __init__(self, *, class_weight: Annotated[float, Ge(0)] = 1.0, instance_weight: Annotated[float, Ge(0)] = 10.0,
                 reduction: Literal["sum", "mean"] = "sum", use_labels: bool = True) -> None:
        super().__init__()
        if class_weight == 0 and instance_weight == 0:
            raise ValueError("class_weight and instance_weight are both 0: the loss would always be 0")
        self.class_weight = class_weight
        self.instance_weight = instance_weight
        self.reduction = reduction
        self.use_labels = use_labels
        self.uses_labels = use_labels  # the relations are restricted to each image's positive labels

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
        """Needs 2-d ``(K, D)`` per-sample embeddings with the same ``K``; ``D`` may differ."""
        if len(student) != 2 or len(teacher) != 2:
            return (f"label_relation needs (K, D) label-wise embeddings per sample, got student {tuple(student)} "
                    f"and teacher {tuple(teacher)}")
        if student[0] != teacher[0]:
            return f"student has {student[0]} label embeddings, teacher {teacher[0]}: K must match"
        return None

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """Relation loss of ``(B, K, D)`` embeddings, restricted to the ``(B, K)`` multi-hot positives."""
        return label_relation_loss(student, teacher, labels if self.use_labels else None, self.class_weight,
                                   self.instance_weight, self.reduction)
