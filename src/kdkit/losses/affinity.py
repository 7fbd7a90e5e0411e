"""Affinity mimicking (TinyCLIP, Wu et al., ICCV 2023) for any two paired embeddings."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from annotated_types import Gt
from torch import Tensor

from kdkit.losses.base import DistillLoss, register_loss


def affinity_matrix(a: Tensor, b: Tensor, scale: float | Tensor) -> Tensor:
    r"""``A = scale * normalize(a) normalize(b)^T``: the ``(B, B)`` scaled cosine affinities (CLIP logits)."""
    return scale * (F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T)


def _soft_cross_entropy(logits: Tensor, target_logits: Tensor) -> Tensor:
    """Mean over rows of ``-sum_j softmax(target)_ij log_softmax(logits)_ij`` (no ``log`` of a probability)."""
    return -(F.softmax(target_logits, dim=1) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def affinity_loss(s_a: Tensor, s_b: Tensor, t_a: Tensor, t_b: Tensor, scale_s: float | Tensor = 100.0,
                  scale_t: float | Tensor = 100.0) -> Tensor:
    r"""Affinity mimicking of Wu et al., "TinyCLIP: CLIP Distillation via Affinity Mimicking and Weight
    Inheritance" (ICCV 2023).

    .. math::
        A = s\,\hat E_a \hat E_b^\top,\quad \hat E = E / \|E\|_2 \text{ (per row)};\qquad
        L = \tfrac12\big[\mathrm{CE}(A_s, \mathrm{softmax}\,A_t)
            + \mathrm{CE}(A_s^\top, \mathrm{softmax}\,A_t^\top)\big]

    ``CE(X, P) = -(1/B) sum_i sum_j P_ij log softmax(X)_ij`` is the soft-target cross-entropy over the rows;
    the first term distils the ``a -> b`` affinities (image-to-text), the second the ``b -> a`` ones
    (text-to-image). Defined for any two paired embeddings (image/text, two views, ...). The minimum over
    the student, reached at ``A_s = A_t``, is the mean row entropy of the teacher's two softmaxes (not 0):
    ``L = H + KL`` and only the KL part depends on the student.

    Scales: in TinyCLIP (``ClipSoftLoss``) the student's affinities use the student's own learned CLIP
    ``logit_scale.exp()`` and the teacher's use the teacher's (``teacher_model.logit_scale.exp()``, 100 for
    trained CLIP models, optionally overridden by ``--logit-scale``). Pass tensors to keep them learnable.

    Args:
        s_a: ``(B, D_s)`` student embeddings of the first member of each pair (e.g. images).
        s_b: ``(B, D_s)`` student embeddings of the second member (e.g. texts).
        t_a: ``(B, D_t)`` teacher embeddings of the first member; ``D_t`` may differ from ``D_s``.
        t_b: ``(B, D_t)`` teacher embeddings of the second member.
        scale_s: Student logit scale (CLIP's ``exp(logit_scale)``, 100 once trained).
        scale_t: Teacher logit scale.

    Returns:
        Scalar loss, in ``s_a``'s dtype.
    """
    dtype = torch.float64 if s_a.dtype == torch.float64 else torch.float32
    a_s = affinity_matrix(s_a.to(dtype), s_b.to(dtype), scale_s)
    a_t = affinity_matrix(t_a.to(dtype), t_b.to(dtype), scale_t)
    loss = 0.5 * (_soft_cross_entropy(a_s, a_t) + _soft_cross_entropy(a_s.T, a_t.T))
    return loss.to(s_a.dtype)


@register_loss("affinity", help="TinyCLIP affinity mimicking on paired embeddings stacked (B, 2, D) (ICCV 2023)")
class AffinityLoss(DistillLoss):
    """Affinity mimicking between the paired embeddings of student and teacher; see :func:`affinity_loss`.

    Each tap holds the two paired embeddings stacked on dim 1, ``(B, 2, D)`` (e.g. a module returning
    ``torch.stack([image_emb, text_emb], 1)``); ``D`` may differ between student and teacher. Name the
    taps explicitly (there is no standard default). TinyCLIP weights this soft loss by ``alpha * w`` and
    CLIP's contrastive (hard) loss by ``(1 - alpha) * w`` (``--distillation-alpha``, ``--distillation-weight``)::

        distill:
          - {loss: affinity, student: pair_embed, teacher: pair_embed, weight: 1.0, scale: 100}

    The pair can also be two augmented views of the same images (``pairs: views``): with
    ``data: {views: 2}`` the batch is ``[weak; strong]``, and the embeddings of the first half are paired
    with those of the second (any per-sample shape; flattened)::

        data: {views: 2}
        distill:
          - {loss: affinity, student: penultimate, teacher: penultimate, pairs: views, scale: 10}

    Args:
        scale: Student logit scale (default 100, CLIP's trained ``exp(logit_scale)``). TinyCLIP learns the
            student's scale; here it is a fixed number.
        teacher_scale: Teacher logit scale; ``null`` (default) uses ``scale``.
        pairs: ``stacked`` (default): taps of shape ``(B, 2, D)``; ``views``: the two halves of a
            two-view batch ``(2B, ...)`` are the pair.
    """

    default_student_tap = "penultimate"
    default_teacher_tap = "penultimate"

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """Two stacked paired embeddings per sample; the widths differ."""
        return (2, 6), (2, 8)

    def __init__(self, *, scale: Annotated[float, Gt(0)] = 100.0, teacher_scale: Annotated[float, Gt(0)] | None = None,
                 pairs: Literal["stacked", "views"] = "stacked") -> None:
        super().__init__()
        self.scale = scale
        self.teacher_scale = scale if teacher_scale is None else teacher_scale
        self.pairs = pairs

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
        """Both per-sample shapes must be ``(2, D)`` (``pairs: stacked``); ``D`` may differ."""
        if self.pairs == "views":
            return None
        for who, shape in (("student", student), ("teacher", teacher)):
            if len(shape) != 2 or shape[0] != 2:
                return (f"affinity needs taps of per-sample shape (2, D) (two paired embeddings stacked on dim 1), "
                        f"but the {who} tap has {tuple(shape)}")
        return None

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """Affinity loss of ``(B, 2, D_s)`` and ``(B, 2, D_t)`` paired embeddings; labels are unused."""
        if self.pairs == "views":
            if student.shape[0] % 2:
                raise ValueError(f"pairs: views needs a two-view batch (set data.views: 2); got {student.shape[0]} "
                                 "rows")
            s, t = student.flatten(1), teacher.flatten(1)
            half = s.shape[0] // 2
            return affinity_loss(s[:half], s[half:], t[:half], t[half:], self.scale, self.teacher_scale)
        return affinity_loss(student[:, 0], student[:, 1], teacher[:, 0], teacher[:, 1], self.scale,
                             self.teacher_scale)
