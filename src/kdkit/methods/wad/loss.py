"""WAD's weighted pseudo-label cross-entropy on the unlabelled samples (``wad`` loss)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.data.base import UNLABELLED
from kdkit.losses.base import DistillLoss, compute_dtype, register_loss


def weighted_pseudo_label_ce(logits: Tensor, labels: Tensor, pseudo: Tensor, weight: Tensor) -> Tensor:
    r"""WAD's unlabelled term (official ``SSL/train/train.py``): :math:`\frac{1}{|U|}\sum_{i\in U} w_i\,
    \mathrm{CE}(z_i, \hat y_i)` over the batch's unlabelled samples :math:`U`, with fixed pseudo-labels
    :math:`\hat y` and weights :math:`w` (:func:`~kdkit.methods.wad.knowledge.pseudo_labels_and_weights`).

    Args:
        logits: ``(B, C)`` student logits.
        labels: ``(B,)`` labels; only which are :data:`UNLABELLED` matters.
        pseudo: ``(B,)`` pseudo-labels of the rows (read on the unlabelled rows only).
        weight: ``(B,)`` weights of the rows (read on the unlabelled rows only).

    Returns:
        Scalar in the computing precision; 0 (with zero gradient) when the batch has no unlabelled sample.
    """
    dtype = compute_dtype(logits)
    unlabelled = labels.reshape(-1) == UNLABELLED
    z = logits.to(dtype)
    if not unlabelled.any():
        return z.sum() * 0.0
    ce = F.cross_entropy(z[unlabelled], pseudo[unlabelled], reduction="none")
    return (weight[unlabelled].to(dtype) * ce).mean()


@register_loss("wad", help="WAD (Du et al., ICCV 2023): pseudo-labels and weights of the unlabelled samples from a "
                           "representation (nearest labelled sample per class): the teacher's or WAD's own "
                           "contrastive one (representation: contrastive), weighted CE")
class WadLoss(DistillLoss):
    """WAD's weighted pseudo-label CE (see :func:`weighted_pseudo_label_ce`).

    The pseudo-label and weight of every training sample are computed once before training by the ``wad`` method,
    and looked up by sample index, from one of two representations:

    * ``representation: teacher`` (default): the teacher tap the term names (``teacher: penultimate`` by default);
    * ``representation: contrastive``: a SimCLR network the method trains first on the labelled and unlabelled
      images (:mod:`kdkit.methods.wad.contrastive`, settings in the recipe's ``wad.contrastive``), as the paper and
      its official code do; the term then reads no teacher and the recipe needs none.

    Args:
        representation: Where the knowledge comes from (above).
    """
    reads_logits = frozenset({"classes"})

    default_teacher_tap = "penultimate"
    needs_index = True

    def __init__(self, *, representation: Literal["teacher", "contrastive"] = "teacher") -> None:
        super().__init__()
        self.representation = representation
        self.register_buffer("pseudo", torch.zeros(0, dtype=torch.int64), persistent=False)
        self.register_buffer("weight", torch.zeros(0), persistent=False)

    @classmethod
    def teacher_needed(cls, params: Mapping[str, Any]) -> bool:
        """A teacher only for ``representation: teacher`` (the default)."""
        return params.get("representation", "teacher") == "teacher"

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """6-class logits (the class_mismatch default) and a 32-wide representation."""
        return (6,), (32,)

    @classmethod
    def example_inputs(cls, batch: int, generator: torch.Generator | None = None) -> tuple[Any, Any, Tensor, Tensor]:
        """Every other sample unlabelled."""
        student, teacher, labels, index = super().example_inputs(batch, generator)
        labels = labels.clone() % 6
        labels[1::2] = UNLABELLED
        return student, teacher, labels, index

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
        """Student logits ``(C,)``, C >= 2; any teacher representation."""
        if len(student) != 1 or student[0] < 2:
            return f"wad trains logits (C,) with C >= 2 classes, got student shape {tuple(student)}"
        return None

    def setup(self, student_shape: Any, teacher_shape: Any, num_samples: int) -> None:
        """Tables for ``num_samples`` samples: placeholders (pseudo-label 0, weight 1) that the ``wad`` method replaces
        with :meth:`set_knowledge` before the first step of a run."""
        self.pseudo = torch.zeros(num_samples, dtype=torch.int64, device=self.pseudo.device)
        self.weight = torch.ones(num_samples, device=self.weight.device)

    def set_knowledge(self, pseudo: Tensor, weight: Tensor) -> None:
        """The pseudo-label and weight of every training sample (labelled ones are never read)."""
        self.pseudo = pseudo.to(self.pseudo.device, torch.int64)
        self.weight = weight.to(self.weight.device, torch.float32)

    def forward(self, student: Tensor, teacher: Any, labels: Tensor, index: Tensor | None = None) -> Tensor:
        """The weighted CE of the ``(B, C)`` logits against the looked-up pseudo-labels."""
        if index is None:
            raise ValueError("wad looks its pseudo-labels up by sample index; none given")
        if len(self.pseudo) == 0:
            raise RuntimeError("wad's tables are empty: setup() (the recipe builder) sizes them first")
        index = index.to(self.pseudo.device)
        return weighted_pseudo_label_ce(student, labels, self.pseudo[index].to(student.device),
                                        self.weight[index].to(student.device))
