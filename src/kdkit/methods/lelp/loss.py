r"""LELP's loss: distil the teacher's class probabilities split into pseudo-subclasses by its embedding projections.

Loo, Iliopoulos, Hu, Vee, "Linear Projections of Teacher Embeddings for Few-Class Distillation" (arXiv 2409.20449,
2024), Sec. 3.2-3.3. With the teacher's logits :math:`t`, its embedding :math:`h`, LELP's projections
(:mod:`~kdkit.methods.lelp.projection`) giving :math:`z_{c,s} = v_{c,s}^\top(h - \mu_c)`, and the student's
:math:`C \cdot S` pseudo-subclass logits :math:`u` (the ``lelp_head`` bridge):

.. math::
    p_{c,s} = \mathrm{softmax}(t/\tau)_c \cdot \mathrm{softmax}_s(z_{c,\cdot}/\beta)_s, \qquad
    q = \mathrm{softmax}(u) \text{ over all } C \cdot S, \qquad
    L = \frac{1}{B} \sum_b \mathrm{KL}(p^b \,\|\, q^b).

:math:`\sum_s p_{c,s}` is the teacher's class probability, so the targets refine KD's, never contradict them. The
paper writes the unified cross-entropy :math:`-\sum p \log q`; the KL differs from it by the teacher's entropy (a
constant), so the gradients are the same and the value is 0 when the student matches. The temperatures soften the
teacher's side only: the student's subclass softmax has none, so the deployed class probability
:math:`\sum_s q_{c,s}` (the ``lelp_head``'s logsumexp) is the one trained. (Dividing :math:`u` by :math:`\tau` too, as
Hinton's KD does, would train :math:`\sum_s \mathrm{softmax}(u/\tau)_{c,s}` while the deployed sum is at temperature
1, a different, sharpened aggregate whose argmax can differ: a 10-epoch run with that variant scored 74.8 % at
epoch 4 against KD's 85.1 %.)
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Gt
from torch import Tensor

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss
from kdkit.methods.lelp.projection import Projections, coordinates

#: The teacher taps the ``lelp`` term reads unless it says: the logits and the embedding that feeds them.
TEACHER_TAPS = ("logits", "penultimate")


def subclass_targets(teacher_logits: Tensor, coords: Tensor, temperature: float, subclass_temperature: float) -> Tensor:
    """``(B, C * S)`` log-probabilities :math:`\\log p_{c,s}` (class-major: index ``c * S + s``).

    Args:
        teacher_logits: ``(B, C)``.
        coords: ``(B, C, S)`` pseudo-subclass coordinates :math:`z` (:func:`.projection.coordinates`).
        temperature: :math:`\\tau`, of the class probabilities.
        subclass_temperature: :math:`\\beta`, of the split of each class into its subclasses.
    """
    log_class = F.log_softmax(teacher_logits / temperature, dim=1)
    log_split = F.log_softmax(coords / subclass_temperature, dim=2)
    return (log_class.unsqueeze(2) + log_split).flatten(1)


def lelp_loss(subclass_logits: Tensor, teacher_logits: Tensor, embeddings: Tensor, directions: Tensor, means: Tensor,
              temperature: float = 1.0, subclass_temperature: float = 1.0) -> Tensor:
    """Loo, Iliopoulos, Hu, Vee, "Linear Projections of Teacher Embeddings for Few-Class Distillation" (2024): the
    KL from the teacher's class probabilities split into pseudo-subclasses to the student's (module docstring).

    Args:
        subclass_logits: ``(B, C * S)`` student pseudo-subclass logits (class-major).
        teacher_logits: ``(B, C)`` teacher logits.
        embeddings: ``(B, ...)`` teacher embeddings (flattened to ``d``).
        directions: ``(C, S, d)`` LELP directions.
        means: ``(C, d)`` class means.
        temperature: :math:`\\tau`, of the teacher's class probabilities.
        subclass_temperature: :math:`\\beta`.

    Returns:
        Scalar, in the computing precision (float64 if an input is, else float32).
    """
    dtype = compute_dtype(subclass_logits, teacher_logits, embeddings)
    coords = coordinates(embeddings.to(dtype), directions.to(dtype), means.to(dtype))
    log_p = subclass_targets(teacher_logits.to(dtype), coords, temperature, subclass_temperature)
    log_q = F.log_softmax(subclass_logits.to(dtype), dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


@register_loss("lelp", help="LELP (Loo et al., 2024): KD of the teacher's classes split into pseudo-subclasses by "
                            "PCA projections of its embeddings (few-class problems)")
class LelpLoss(DistillLoss):
    r"""LELP's term (see :func:`lelp_loss`) on the ``lelp_head`` bridge's pseudo-subclass logits. It reads two teacher
    taps, the logits and the embedding that feeds the output layer (``teacher: [logits, penultimate]``, the
    default). The projections are computed by the ``lelp`` method from the frozen teacher before the first batch
    (:meth:`install`) and saved with the objective in every checkpoint. Recipe (``S = 4`` per class)::

        distill:
          - {loss: lelp, student: penultimate, bridge: lelp_head, bridge_params: {subclasses: 4},
             temperature: 1, subclass_temperature: 1}
        train: {ce_weight: 0}   # the paper's alpha = 0

    Args:
        temperature: :math:`\tau`, of the teacher's class probabilities (the student's softmax has none). 1: the
            paper's formula as written.
        subclass_temperature: :math:`\beta`, of the split into subclasses, in the embedding's units (the spread of
            each direction's coordinates is in ``summary.json``'s ``lelp`` section; the paper tunes it per task).
        null_space: Project the embeddings onto the null space of the teacher's output weights before the PCA (the
            paper's default; needs an embedding tap that is the input of a linear output layer).
        rotate: Rotate each class's directions by a random orthogonal matrix (the paper's default), seeded by
            ``train.seed``.
    """

    default_student_tap = "penultimate"
    default_teacher_tap = TEACHER_TAPS  # type: ignore[assignment]  # a list of taps, like an ensemble term's
    requires_bridge = "lelp_head"
    pairwise = False
    teacher_list = True

    def __init__(self, *, temperature: Annotated[float, Gt(0)] = 1.0,
                 subclass_temperature: Annotated[float, Gt(0)] = 1.0, null_space: bool = True,
                 rotate: bool = True) -> None:
        super().__init__()
        self.temperature, self.subclass_temperature = temperature, subclass_temperature
        self.null_space, self.rotate = null_space, rotate
        self.register_buffer("directions", torch.zeros(0, 0, 0))
        self.register_buffer("means", torch.zeros(0, 0))

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        return (6,), [(2,), (8,)]

    @classmethod
    def example_inputs(cls, batch: int, generator: torch.Generator | None = None) -> tuple[Any, Any, Tensor, Tensor]:
        """Subclass logits ``(B, 2 * 3)``, teacher logits ``(B, 2)`` and embeddings ``(B, 8)``, binary labels."""
        student, teacher, labels, index = super().example_inputs(batch, generator)
        return student, teacher, labels % 2, index

    def check_shapes(self, student: Any, teacher: Any) -> str | None:
        """Student ``(C * S,)``; teacher taps ``[(C,), (d...)]``: the logits, then the embedding."""
        if not isinstance(teacher, list) or len(teacher) != 2 or len(tuple(teacher[0])) != 1:
            return (f"reads two teacher taps, the logits (C,) and the embedding that feeds them, got {teacher} "
                    "(teacher: [logits, penultimate])")
        classes, width = teacher[0][0], tuple(student)
        if len(width) != 1 or width[0] % classes or width[0] < 2 * classes:
            return (f"needs the lelp_head bridge's C * S pseudo-subclass logits (S >= 2) for C = {classes} teacher "
                    f"classes, got student shape {width}")
        return None

    def setup(self, student_shape: Any, teacher_shape: Any, num_samples: int) -> None:
        """Size the projection buffers: ``(C, S, d)`` directions and ``(C, d)`` means, zeros until :meth:`install`
        (zero directions split every class uniformly: the loss is then KD of the class probabilities into the
        subclass head). A training run always installs the teacher's projections first (the ``lelp`` method)."""
        classes = teacher_shape[0][0]
        width = int(torch.Size(teacher_shape[1]).numel())
        self.directions = torch.zeros(classes, student_shape[0] // classes, width)
        self.means = torch.zeros(classes, width)

    def install(self, projections: Projections) -> None:
        """Take the projections the method computed from the teacher (before training)."""
        if self.directions.numel() and tuple(projections.directions.shape) != tuple(self.directions.shape):
            raise ValueError(f"LELP directions of shape {tuple(projections.directions.shape)} do not fit this term's "
                             f"{tuple(self.directions.shape)} (C, S, d)")
        device = self.directions.device
        self.directions = projections.directions.to(device, torch.float32)
        self.means = projections.means.to(device, torch.float32)

    def forward(self, student: Tensor, teacher: list[Tensor], labels: Tensor) -> Tensor:
        """The term of ``(B, C * S)`` pseudo-subclass logits against ``[teacher logits, teacher embeddings]``."""
        logits, embeddings = teacher
        return lelp_loss(student, logits, embeddings, self.directions, self.means, self.temperature,
                         self.subclass_temperature)
