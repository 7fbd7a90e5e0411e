"""ORC's pieces as pure functions, and the ``orc`` loss that trains a whole network group in one term.

The term reads every trained network's logits (``student: [model.logits, ..., pivot.logits]``): the last tap is the
pivot teacher, the others form the student group. See :mod:`kdkit.methods.orc` for the procedure and what differs
from the paper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Lt
from torch import Tensor

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss
from kdkit.losses.kd import kd_loss

Feedback = Literal["any", "all"]
Teaching = Literal["individual", "mean"]


def ranking_losses(students: list[Tensor], labels: Tensor) -> Tensor:
    """``(S,)`` cross-entropy of each student-group network on the batch (detached): what ranks them."""
    dtype = compute_dtype(*students)
    return torch.stack([F.cross_entropy(s.detach().to(dtype), labels) for s in students])


def promoted(ranking: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` top-ranked networks (lowest loss first; a tie goes to the lower index)."""
    if not 0 < count < len(ranking):
        raise ValueError(f"promote {count} of {len(ranking)} students: at least one must stay a student")
    return torch.sort(ranking, stable=True).indices[:count]


def feedback_mask(students: list[Tensor], labels: Tensor, rule: Feedback = "any") -> Tensor:
    """``(B,)`` the students' error samples: misclassified (arg-max not the label) by ``any`` student, or by ``all``."""
    wrong = torch.stack([s.detach().argmax(1) != labels for s in students])
    return wrong.any(0) if rule == "any" else wrong.all(0)


def mix_with_feedback(x: Tensor, labels: Tensor, mask: Tensor, draw: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Mixup of every training sample with an error sample: ``lam * x_i + (1 - lam) * x_f(i)``.

    Args:
        x: ``(B, ...)`` the batch.
        labels: ``(B,)`` its labels.
        mask: ``(B,)`` the error samples (at least one).
        draw: ``(B,)`` uniform numbers in ``[0, 1)``; sample ``i``'s partner is error sample
            ``floor(draw_i * F)`` of the ``F`` in batch order.
        lam: The mixing weight of the training sample.

    Returns:
        The mixed batch and each mixed sample's partner label.
    """
    errors = mask.nonzero().squeeze(1)
    if len(errors) == 0:
        raise ValueError("mix_with_feedback needs at least one error sample")
    partner = errors[(draw * len(errors)).long().clamp(max=len(errors) - 1)]
    return lam * x + (1.0 - lam) * x[partner], labels[partner]


def intensive_loss(pivot_mixed: Tensor, labels: Tensor, partner_labels: Tensor, lam: float) -> Tensor:
    """``L1 = lam * CE(y, p_PT(x~)) + (1 - lam) * CE(y_f, p_PT(x~))``: the pivot teacher on the mixed error samples."""
    z = pivot_mixed.to(compute_dtype(pivot_mixed))
    return lam * F.cross_entropy(z, labels) + (1.0 - lam) * F.cross_entropy(z, partner_labels)


def group_loss(students: list[Tensor], pivot: Tensor, labels: Tensor, teachers: Tensor, beta: float,
               temperature: float, teaching: Teaching = "individual") -> Tensor:
    r"""ORC's private and group teaching (Choi, Cho, Cheung & Hwang, "ORC: Network Group-based Knowledge Distillation
    using Online Role Change", ICCV 2023) of the student group, given who is promoted.

    A temporary teacher ``j`` (in ``teachers``) learns from the pivot teacher alone (private teaching),
    :math:`(1-\beta)\,\mathrm{CE}(y, z_j) + \beta\,\mathrm{KD}_T(z_j, z_{PT})`; every other student ``i`` from the
    whole teacher group (group teaching): with ``individual`` one KD term per teacher,
    :math:`(1-\beta)\,\mathrm{CE}(y, z_i) + \beta \sum_{t \in \{PT\} \cup TT} \mathrm{KD}_T(z_i, z_t)`, with ``mean``
    one KD term to the mean of the teachers' logits. :math:`\mathrm{KD}_T` is Hinton's
    :math:`T^2\,\mathrm{KL}(\mathrm{softmax}(z_t/T) \| \mathrm{softmax}(z/T))`; every target is detached.
    Summed over the networks (each network's parameters get only its own part).

    Args:
        students: ``S`` tensors ``(B, K)``, the student group's logits.
        pivot: ``(B, K)`` the pivot teacher's logits on the batch.
        labels: ``(B,)`` class indices.
        teachers: Indices (into ``students``) of the temporary teachers.
        beta: Weight of the distillation part (``1 - beta`` on the cross-entropy).
        temperature: ``T``.
        teaching: ``individual`` or ``mean`` (above).

    Returns:
        Scalar, in the computing precision (float64 for float64 logits, else float32).
    """
    dtype = compute_dtype(pivot, *students)
    zs = [s.to(dtype) for s in students]
    chosen = set(teachers.tolist())
    pt = pivot.detach().to(dtype)
    group = [pt, *(zs[j].detach() for j in sorted(chosen))]
    total = pt.new_zeros(())
    for i, z in enumerate(zs):
        ce = F.cross_entropy(z, labels)
        if i in chosen:
            kd = kd_loss(z, pt, temperature)
        elif teaching == "individual":
            kd = torch.stack([kd_loss(z, t, temperature) for t in group]).sum()
        else:
            kd = kd_loss(z, torch.stack(group).mean(0), temperature)
        total = total + (1.0 - beta) * ce + beta * kd
    return total


@dataclass
class OrcBatch:
    """What the ORC run hands the loss for one batch: the images the pivot teacher is refined on, and the draws.

    Attributes:
        x: ``(B, ...)`` the batch the networks saw.
        draw: ``(B,)`` uniform numbers picking each sample's error-sample partner.
        lam: The mixup weight of this batch.
        feedback: A sample is an error sample when ``any`` student misclassifies it, or ``all`` do.
    """

    x: Tensor
    draw: Tensor
    lam: float
    feedback: Feedback = "any"


@register_loss("orc", help="ORC (Choi et al., ICCV 2023): network groups with online role change; the term reads "
                           "every trained network's logits, the pivot teacher's last")
class OrcLoss(DistillLoss):
    """ORC's whole objective for one network group; see :func:`group_loss` and :func:`intensive_loss`.

    Each step the student group (every tap but the last) is ranked by cross-entropy on the batch, the ``promote``
    best become temporary teachers, and the group's error samples (:func:`feedback_mask`) mixed with the batch refine
    the pivot teacher (the last tap) through :attr:`refine`, the pivot's forward, which the ``orc:`` section's method
    sets, with each batch (:attr:`batch`). Without the section the term is the paper's ablation without intensive
    teaching: the pivot is only a target and is not refined. Recipe (``train.ce_weight: 0``: the term holds every
    network's cross-entropy)::

        orc: {alpha: 1.0, feedback: any}
        distill:
          - {loss: orc, student: [model.logits, peer.logits, pivot.logits]}

    The buffers count what happened, and are checkpointed with the objective: ``promotions`` how often each student
    was a temporary teacher, ``roles`` the last step's assignment (1: temporary teacher), ``feedback`` the error samples
    seen, ``refined`` the steps that refined the pivot and ``steps`` all steps.

    Args:
        promote: Temporary teachers per step (the paper's k; 1 is its best).
        beta: Weight of the distillation part of each student's loss (``1 - beta`` on its cross-entropy).
        temperature: KD temperature ``T``.
        teaching: ``individual`` (one KD term per teacher, the paper's) or ``mean`` (KD to the teachers' mean logits,
            the paper's ensemble ablation).
    """
    reads_logits = frozenset({"classes"})

    pairwise = False
    needs_teacher = False
    uses_labels = True

    def __init__(self, *, promote: Annotated[int, Ge(1)] = 1, beta: Annotated[float, Gt(0), Lt(1)] = 0.5,
                 temperature: Annotated[float, Gt(0)] = 4.0, teaching: Teaching = "individual") -> None:
        super().__init__()
        self.promote, self.beta, self.temperature, self.teaching = promote, beta, temperature, teaching
        self.refine: Callable[[Tensor], Tensor] | None = None
        self.batch: OrcBatch | None = None
        for name in ("feedback_samples", "refined", "steps"):
            self.register_buffer(name, torch.zeros((), dtype=torch.long))
        self.register_buffer("promotions", torch.zeros(0, dtype=torch.long))
        self.register_buffer("roles", torch.zeros(0, dtype=torch.long))

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        return [(10,), (10,), (10,)], (10,)

    def check_shapes(self, student: Any, teacher: Any) -> str | None:
        """At least ``promote + 2`` taps (a student left to teach, and the pivot), all the same ``(K,)`` logits."""
        shapes = [tuple(s) for s in student] if isinstance(student, list) else [tuple(student)]
        if len(shapes) < self.promote + 2:
            return (f"orc reads the student group and the pivot teacher, at least promote + 2 = {self.promote + 2} "
                    f"logit taps, got {len(shapes)}")
        if len(shapes[0]) != 1 or any(s != shapes[0] for s in shapes):
            return f"orc needs (K,) logits from every network, got {shapes}"
        return None

    def setup(self, student_shape: Any, teacher_shape: Any, num_samples: int) -> None:
        """One promotion counter per student-group network."""
        self.promotions = torch.zeros(len(student_shape) - 1, dtype=torch.long)
        self.roles = torch.zeros(len(student_shape) - 1, dtype=torch.long)

    def forward(self, student: list[Tensor], teacher: Tensor | None, labels: Tensor) -> Tensor:
        """The group's loss on ``(B, K)`` logits of every network (pivot last)."""
        *students, pivot = student
        teachers = promoted(ranking_losses(students, labels), self.promote)
        loss = group_loss(students, pivot, labels, teachers, self.beta, self.temperature, self.teaching)
        self._count(teachers, len(students))
        if self.refine is None:
            return loss
        if self.batch is None:
            raise RuntimeError("orc: the pivot is refined on this batch's images, and no batch was handed over")
        batch, self.batch = self.batch, None  # one batch, one refinement
        mask = feedback_mask(students, labels, batch.feedback)
        errors = int(mask.sum())
        self.feedback_samples += errors
        if errors == 0:  # nothing the students got wrong: nothing to refine the pivot on
            return loss
        self.refined += 1
        mixed, partner = mix_with_feedback(batch.x, labels, mask, batch.draw, batch.lam)
        return loss + intensive_loss(self.refine(mixed), labels, partner, batch.lam).to(loss.dtype)

    def _count(self, teachers: Tensor, students: int) -> None:
        """Record this step's roles."""
        if len(self.promotions) != students:
            raise RuntimeError(f"orc: set up for {len(self.promotions)} students, given {students}; call setup() with "
                               "the taps' shapes first")
        self.roles.zero_()
        self.roles[teachers] = 1
        self.promotions += self.roles
        self.steps += 1
