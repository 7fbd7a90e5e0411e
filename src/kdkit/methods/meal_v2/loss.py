"""MEAL V2's discriminator on the final outputs, and its loss (see :mod:`kdkit.methods.meal_v2`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor, nn

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss

Inputs = Literal["probabilities", "logits"]
Objective = Literal["adversarial", "joint"]


class Discriminator(nn.Module):
    """A three-layer MLP from a ``(B, K)`` output to two logits ``(student, teacher)``.

    The official ``Discriminator`` is the same stack written as 1x1 convolutions on ``x[:, :, None, None]``.

    Args:
        classes: Width ``K`` of the outputs it reads.
        hidden: Width of its two hidden layers.
        final_relu: Apply a ReLU to the two output logits too (the official code does).
    """

    def __init__(self, classes: int, hidden: int, final_relu: bool = False) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(classes, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                    nn.Linear(hidden, 2))
        self.final_relu = final_relu

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, 2)``: column 0 says "student", column 1 "teacher"."""
        out = self.layers(x)
        return F.relu(out) if self.final_relu else out


def discriminate(discriminator: nn.Module, x: Tensor, trainable: bool) -> Tensor:
    """``discriminator(x)`` in ``x``'s precision; with ``trainable`` False its parameters get no gradient (the
    student's fooling loss must not train the discriminator), while ``x`` still does."""
    params = {name: (p if trainable else p.detach()).to(x.dtype) for name, p in discriminator.named_parameters()}
    return torch.func.functional_call(discriminator, params, (x,))


def side_inputs(student_logits: Tensor, teacher_logits: list[Tensor], inputs: Inputs) -> tuple[Tensor, Tensor]:
    """What the discriminator reads of each side: the softmaxes (the teachers' averaged), or the logits (the
    teachers' averaged: the official code's ``soft_no_softmax``)."""
    dtype = compute_dtype(student_logits, *teacher_logits)
    student, teachers = student_logits.to(dtype), torch.stack([t.to(dtype) for t in teacher_logits])
    if inputs == "probabilities":
        return student.softmax(1), teachers.softmax(2).mean(0)
    return student, teachers.mean(0)


def meal_v2_discriminator_loss(student_logits: Tensor, teacher_logits: list[Tensor], discriminator: nn.Module,
                               inputs: Inputs = "probabilities", objective: Objective = "adversarial") -> Tensor:
    r"""MEAL V2's discriminator term (Shen & Savvides, 2020).

    The discriminator :math:`D` gives two logits per output; the target of a student output is ``(1, 0)``, of the
    teachers' ``(0, 1)``, and :math:`\mathrm{BCE}` is the mean binary cross-entropy with logits over every entry
    (the official ``discriminatorLoss``, ``BCEWithLogitsLoss``). With :math:`s` and :math:`t` the two sides'
    inputs (:func:`side_inputs`):

    * ``adversarial`` (the paper's game, default):
      :math:`\mathrm{BCE}(D([\mathrm{sg}(s); t]), [\text{student}; \text{teacher}])
      + \mathrm{BCE}(\mathrm{sg}(D)(s), \text{teacher})`: the first part trains only :math:`D` (the student's output
      is detached), the second, the fooling loss, trains only the student (:math:`D`'s parameters are detached);
    * ``joint`` (the official code): :math:`\mathrm{BCE}(D([s; t]), [\text{student}; \text{teacher}])`, minimised by
      the discriminator and the student alike.

    Args:
        student_logits: ``(B, K)`` student logits.
        teacher_logits: ``M`` tensors ``(B, K)``, one per teacher.
        discriminator: Maps ``(N, K)`` to ``(N, 2)`` logits.
        inputs: ``probabilities`` or ``logits`` (see :func:`side_inputs`).
        objective: ``adversarial`` or ``joint`` (above).

    Returns:
        Scalar, in the computing precision (float64 for float64 inputs, else float32).
    """
    if not teacher_logits:
        raise ValueError("meal_v2_discriminator needs at least one teacher's logits")
    s, t = side_inputs(student_logits, teacher_logits, inputs)
    is_student = s.new_tensor([1.0, 0.0]).repeat(len(s), 1)
    is_teacher = s.new_tensor([0.0, 1.0]).repeat(len(t), 1)
    target = torch.cat([is_student, is_teacher])
    if objective == "joint":
        return F.binary_cross_entropy_with_logits(discriminate(discriminator, torch.cat([s, t]), True), target)
    tell = F.binary_cross_entropy_with_logits(discriminate(discriminator, torch.cat([s.detach(), t]), True), target)
    fool = F.binary_cross_entropy_with_logits(discriminate(discriminator, s, False), is_teacher)
    return tell + fool


@register_loss("meal_v2_discriminator", help="MEAL V2 (Shen & Savvides, 2020): a discriminator on the final outputs "
                                             "tells the teachers' from the student's; the student learns to fool it")
class MealV2DiscriminatorLoss(DistillLoss):
    """MEAL V2's discriminator term; see :func:`meal_v2_discriminator_loss`. Its discriminator is built by
    :meth:`setup` from the logit width: a loss head, trained with the student by the run's optimiser and never
    deployed. Recipe, beside the similarity term (``multi_teacher_kd`` at temperature 1) and ``ce_weight: 0``::

        distill:
          - {loss: multi_teacher_kd, teacher: [t1.logits, t2.logits], temperature: 1}
          - {loss: meal_v2_discriminator, teacher: [t1.logits, t2.logits]}

    Args:
        hidden: Width of the discriminator's two hidden layers.
        inputs: ``probabilities`` (the paper's final outputs) or ``logits`` (the official code's).
        objective: ``adversarial`` (the paper: the student fools the discriminator) or ``joint`` (the official code:
            student and discriminator minimise the discriminator's loss together).
        final_relu: ReLU on the discriminator's output logits (the official code's; default off).
    """
    reads_logits = frozenset({"classes"})

    pairwise = False
    teacher_list = True

    def __init__(self, *, hidden: Annotated[int, Ge(1)] = 64, inputs: Inputs = "probabilities",
                 objective: Objective = "adversarial", final_relu: bool = False) -> None:
        super().__init__()
        self.hidden, self.inputs, self.objective, self.final_relu = hidden, inputs, objective, final_relu
        self.discriminator: Discriminator | None = None

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        return (10,), [(10,), (10,)]

    def check_shapes(self, student: Any, teacher: Any) -> str | None:
        """One ``(K,)`` student tap and ``(K,)`` teacher taps (a list, or one)."""
        shapes = teacher if isinstance(teacher, list) else [teacher]
        if len(tuple(student)) != 1 or any(tuple(t) != tuple(student) for t in shapes):
            return f"needs (K,) logits on both sides, got student {tuple(student)} and teachers {shapes}"
        return None

    def setup(self, student_shape: Any, teacher_shape: Any, num_samples: int) -> None:
        """Build the discriminator for ``K``-wide outputs."""
        self.discriminator = Discriminator(next(iter(student_shape)), self.hidden, self.final_relu)

    def forward(self, student: Tensor, teacher: Tensor | list[Tensor], labels: Tensor) -> Tensor:
        """The term of ``(B, K)`` student logits against the teachers' ``(B, K)`` logits."""
        if self.discriminator is None:
            raise RuntimeError("meal_v2_discriminator: call setup() first (it builds the discriminator)")
        teachers = teacher if isinstance(teacher, list) else [teacher]
        return meal_v2_discriminator_loss(student, teachers, self.discriminator, self.inputs, self.objective)
