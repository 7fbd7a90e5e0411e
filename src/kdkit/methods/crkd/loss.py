"""Cr-KD's class-relation distillation: the known-class model's class relations kept on the novel samples."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor

from kdkit.data.base import UNLABELLED
from kdkit.losses.base import DistillLoss, compute_dtype, register_loss

Weighting = Literal["learnable", "detached", "none"]


def class_relation_kd(student: Tensor, teacher: Tensor, labels: Tensor, known: int, tau: float = 0.1,
                      temperature: float = 4.0, weighting: Weighting = "learnable") -> Tensor:
    r"""Cr-KD's weighted class-relation distillation (Gu, Zhang, Xu, He, "Class-relation Knowledge Distillation for
    Novel Class Discovery", ICCV 2023; official code github.com/kleinzcy/Cr-KD-NCD, ``model/losses.py: KD``).

    On the unlabelled (novel-class) samples :math:`U` of the batch, with :math:`s = \tau T` and :math:`k` known classes:
    the class relation of a novel sample is the known-class model's distribution over the known classes,
    :math:`p_i = \mathrm{softmax}(z^t_{i,1..k}/s)`; the student's known-class logits are matched to it by the soft
    cross-entropy, each sample weighted by how much the student itself still places it among the known classes,

    .. math:: w_i = \sum_{c\le k}\mathrm{softmax}(z^s_i/s)_c, \qquad \hat w_i = w_i / \tfrac{1}{|U|}\sum_{j\in U} w_j,
    .. math:: \mathcal{L} = \frac{1}{|U|}\sum_{i\in U} T^2\,\hat w_i
              \sum_{c\le k} -p_{ic}\log\mathrm{softmax}(z^s_{i,1..k}/s)_c .

    ``weighting``: ``learnable`` (default, the official code's): :math:`w` is a function of the student's logits and
    the gradient flows through it too: the student can learn to lower the weight of a novel sample unrelated to the
    known classes (the paper's learnable weighting function); ``detached``: the same weights, no gradient through
    them; ``none``: :math:`\hat w = 1` (plain distillation of the class relation, the paper's ablation without the
    weighting function). The teacher is the model trained on the known classes (the official code's frozen copy of the
    supervised pre-trained model); its outputs beyond ``known`` are ignored.

    Args:
        student: ``(B, K)`` student logits, known classes first (``novel_classes`` numbering).
        teacher: ``(B, K_t)`` known-class model logits, ``K_t >= known``, its first ``known`` the known classes.
        labels: ``(B,)`` labels; only which are :data:`UNLABELLED` matters.
        known: Number of known classes ``k``.
        tau: The logits' scale ``tau`` (official: 0.1, the temperature of its cosine-classifier logits).
        temperature: ``T`` (official ``kd_temperature``: 4), with the :math:`T^2` factor.
        weighting: ``learnable``, ``detached`` or ``none`` (above).

    Returns:
        Scalar in the computing precision; 0 (with zero gradient) when the batch has no unlabelled sample.
    """
    dtype = compute_dtype(student, teacher)
    unlabelled = labels.reshape(-1) == UNLABELLED
    z_s, z_t = student.to(dtype)[unlabelled], teacher.to(dtype)[unlabelled]
    if not len(z_s):
        return student.to(dtype).sum() * 0.0
    scale = tau * temperature
    relation = F.softmax(z_t[:, :known] / scale, dim=1)
    soft_ce = -(relation * F.log_softmax(z_s[:, :known] / scale, dim=1)).sum(1)
    if weighting == "none":
        weight = torch.ones_like(soft_ce)
    else:
        on_known = F.softmax(z_s / scale, dim=1)[:, :known].sum(1)
        on_known = on_known.detach() if weighting == "detached" else on_known
        weight = on_known / on_known.mean()
    return (weight * soft_ce).mean() * temperature**2


@register_loss("crkd", help="Cr-KD (Gu et al., ICCV 2023): the known-class model's class relations on the novel "
                            "samples, weighted by the student's known-class probability (novel_classes setting)")
class CrKdLoss(DistillLoss):
    """Cr-KD's class-relation KD (see :func:`class_relation_kd`); reads the known-class teacher's logits.

    Args:
        known: Number of known classes (the ``novel_classes`` setting's; the method checks it against the data).
        tau: Scale of both models' logits. The official 0.1 divides cosine-classifier logits (``|z| <= 1``); kdkit's
            models end in a linear layer whose logits span about ten times that range, hence 1 in the shipped recipes.
        temperature: ``T`` (official 4), with the ``T^2`` factor.
        weighting: ``learnable`` (official), ``detached`` or ``none`` (the ablation without the weighting function).
    """
    reads_logits = frozenset({"classes"})

    def __init__(self, *, known: Annotated[int, Ge(1)] = 5, tau: Annotated[float, Gt(0)] = 0.1,
                 temperature: Annotated[float, Gt(0)] = 4.0, weighting: Weighting = "learnable") -> None:
        super().__init__()
        self.known, self.tau, self.temperature, self.weighting = known, tau, temperature, weighting

    @classmethod
    def example_inputs(cls, batch: int, generator: torch.Generator | None = None) -> tuple[Any, Any, Tensor, Tensor]:
        """10-class logits with every other sample unlabelled (a novel-class sample)."""
        student, teacher, labels, index = super().example_inputs(batch, generator)
        labels = labels.clone()
        labels[1::2] = UNLABELLED
        return student, teacher, labels, index

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
        """Logits ``(K,)`` and ``(K_t,)`` with at least ``known`` known classes on both sides."""
        if len(student) != 1 or len(teacher) != 1:
            return f"crkd compares logits (K,), got student {tuple(student)} and teacher {tuple(teacher)}"
        if min(student[0], teacher[0]) < self.known:
            return (f"crkd reads the first known={self.known} logits, but the student has {student[0]} and the "
                    f"teacher {teacher[0]}")
        return None

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """The weighted class-relation KD of ``(B, K)`` student logits against the known-class model's."""
        return class_relation_kd(student, teacher, labels, self.known, self.tau, self.temperature, self.weighting)
