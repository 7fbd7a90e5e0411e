"""The contract every distillation loss follows, and the loss registry.

A loss sees tensors, never models: ``loss(student, teacher, labels) -> scalar``. Weights and warm-up
schedules are applied once, by :class:`kdkit.objective.Objective`, never inside a loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdkit.registry import Registry


class DistillLoss(nn.Module):
    """Base class of the thin module that wraps each pure loss function.

    Class attributes tell the recipe builder which taps a term reads when the recipe names none.

    Attributes:
        default_student_tap: Tap read from the student when a term gives no ``student:``.
        default_teacher_tap: Tap read from the teacher when a term gives no ``teacher:``.
    """

    default_student_tap: ClassVar[str] = "logits"
    default_teacher_tap: ClassVar[str] = "logits"
    #: With lists of taps (several stages), the loss is applied to each (student, teacher) pair and
    #: summed; a loss that needs all stages at once sets this False and receives the lists. (ReviewKD
    #: fuses the stages in its bridge, so its loss stays pairwise.)
    pairwise: ClassVar[bool] = True
    #: The loss needs the dataset indices of the batch's samples (``index=`` keyword), e.g. CRD.
    needs_index: ClassVar[bool] = False
    #: The loss compares the student with a teacher tensor (False: it runs in recipes without a teacher).
    needs_teacher: ClassVar[bool] = True
    #: The registered bridge whose output the loss reads (``None``: any bridge or none).
    requires_bridge: ClassVar[str | None] = None

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
        """Say why these per-sample shapes cannot be compared, or ``None`` when they can.

        The default asks for identical shapes; losses comparing e.g. Gram matrices override it.
        """
        if tuple(student) != tuple(teacher):
            return f"student shape {tuple(student)} differs from teacher shape {tuple(teacher)}"
        return None

    def setup(self, student_shape: Any, teacher_shape: Any, num_samples: int) -> None:
        """Create state that depends on the probed tap shapes or the dataset size (called once, before
        the optimiser is built). The default has none; CRD builds its embedding heads and memory here.

        Args:
            student_shape: Per-sample shape of the (bridged) student tap, or a list for several taps.
            teacher_shape: Per-sample shape of the teacher tap(s).
            num_samples: Training samples in the dataset.
        """

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:  # pragma: no cover
        """Return the unweighted scalar loss."""
        raise NotImplementedError

    def compute(self, student: Tensor | list[Tensor], teacher: Tensor | list[Tensor], labels: Tensor,
                index: Tensor | None = None) -> Tensor:
        """What the objective calls: handles lists of taps (see :attr:`pairwise`) and sample indices."""
        extra = {"index": index} if self.needs_index else {}
        if isinstance(student, list) and self.pairwise:
            values = [self(s, t, labels, **extra) for s, t in zip(student, teacher, strict=True)]
            return torch.stack([v.float() for v in values]).sum().to(values[0].dtype)
        return self(student, teacher, labels, **extra)


LOSSES: Registry[type[DistillLoss]] = Registry("loss", fix="run `kdkit ls losses`")


def register_loss(name: str, help: str | None = None) -> Callable[[type[DistillLoss]], type[DistillLoss]]:
    """Register a :class:`DistillLoss` subclass; its keyword-only ``__init__`` args are the recipe params."""
    return LOSSES.register(name, help)
