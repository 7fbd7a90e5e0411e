"""FerKD's label adaptation and its loss: calibrated soft labels, optionally mixed with a SelfMix partner's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
from annotated_types import Ge, Gt, Le, Lt
from torch import Tensor

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss


def calibrated_targets(teacher_logits: Tensor, labels: Tensor, calibrate_below: float, smoothing: float) -> Tensor:
    r"""FerKD's label adaptation of one region (a stored view) per row.

    With :math:`p = \mathrm{softmax}(z_t)` and :math:`c = p_y` the teacher's confidence on the true class:

    * :math:`c \ge` ``calibrate_below``: the teacher's soft label :math:`p` (a confident region);
    * otherwise the softened hard label :math:`(1 - \varepsilon)\,\mathrm{onehot}(y) + \varepsilon / C`
      (a less-confident region, calibrated to the image's ground truth; :math:`\varepsilon` = ``smoothing``).

    Args:
        teacher_logits: ``(B, C)`` stored teacher logits (or log-probabilities: only their softmax is read).
        labels: ``(B,)`` class indices.
        calibrate_below: Confidence threshold :math:`\tau`.
        smoothing: :math:`\varepsilon` of the softened hard label.

    Returns:
        ``(B, C)`` target distributions, in the computing precision.
    """
    dtype = compute_dtype(teacher_logits)
    probs = teacher_logits.to(dtype).softmax(1)
    classes = probs.shape[1]
    onehot = torch.nn.functional.one_hot(labels.long(), classes).to(dtype)
    softened = (1.0 - smoothing) * onehot + smoothing / classes
    confident = probs.gather(1, labels.long().view(-1, 1)) >= calibrate_below
    return torch.where(confident, probs, softened)


def soft_cross_entropy(student_logits: Tensor, targets: Tensor) -> Tensor:
    r""":math:`\frac1B\sum_i -\sum_c q_{ic}\log\mathrm{softmax}(z_s^i)_c` (FKD's ``SoftTargetCrossEntropy``)."""
    dtype = compute_dtype(student_logits, targets)
    log_p = torch.log_softmax(student_logits.to(dtype), dim=1)
    return -(targets.to(dtype) * log_p).sum(1).mean()


def ferkd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, calibrate_below: float = 0.5,
               smoothing: float = 0.1, partner_logits: Tensor | None = None, lam: Tensor | None = None) -> Tensor:
    r"""FerKD's objective on a batch of (kept) regions, at temperature 1 as FKD.

    Without a partner: :math:`\mathrm{SCE}(z_s, q(z_t, y))` with :math:`q` the calibrated target
    (:func:`calibrated_targets`). With SelfMix (each image pasted with a box of another kept region of the
    same image, :math:`\lambda_i` the share of the image's own region): the target is
    :math:`\lambda_i q(z_t^i, y_i) + (1 - \lambda_i) q(z_{t,b}^i, y_i)` -- the same label, both regions' soft
    labels, as CutMix mixes labels by area.

    Args:
        student_logits: ``(B, C)``.
        teacher_logits: ``(B, C)`` stored teacher logits of the replayed regions.
        labels: ``(B,)`` class indices.
        calibrate_below: Confidence threshold of the calibration.
        smoothing: Smoothing of the softened hard label.
        partner_logits: ``(B, C)`` stored teacher logits of the pasted regions (SelfMix), or ``None``.
        lam: ``(B,)`` share of each image's own region (with ``partner_logits``).

    Returns:
        Scalar, in the computing precision (float64 for float64 inputs, else float32).
    """
    targets = calibrated_targets(teacher_logits, labels, calibrate_below, smoothing)
    if partner_logits is not None:
        if lam is None:
            raise ValueError("ferkd_loss: a SelfMix partner needs its mixing weights `lam`")
        lam = lam.to(targets.dtype).view(-1, 1)
        partner = calibrated_targets(partner_logits, labels, calibrate_below, smoothing)
        targets = lam * targets + (1.0 - lam) * partner.to(targets.dtype)
    return soft_cross_entropy(student_logits, targets)


@dataclass
class SelfMixPartner:
    """What SelfMix pasted into the current batch: the pasted regions' stored teacher output and each image's own
    share ``lam``. Set by the method's batch transform, consumed (once) by the next :class:`FerkdLoss` call."""

    teacher: Tensor
    lam: Tensor


@register_loss("ferkd", help="FerKD (Shen & Xing, ICCV 2023): soft CE to teacher soft labels, less-confident regions "
                             "calibrated to softened hard labels; with the `ferkd:` section, hard-region mining and "
                             "SelfMix on the teacher cache")
class FerkdLoss(DistillLoss):
    """FerKD's term; see :func:`ferkd_loss`. Reads the labels. Alone it is the label rule on whatever the teacher
    sees (live or cached); the ``ferkd:`` section (which needs ``teacher.cache``) adds the mining and SelfMix::

        distill:
          - {loss: ferkd, calibrate_below: 0.5, smoothing: 0.1}

    Args:
        calibrate_below: A region whose teacher confidence on the true class is below it is calibrated.
        smoothing: Label smoothing of the calibrated (softened hard) label.
    """
    reads_logits = frozenset({"classes"})

    uses_labels = True

    def __init__(self, *, calibrate_below: Annotated[float, Gt(0), Le(1)] = 0.5,
                 smoothing: Annotated[float, Ge(0), Lt(1)] = 0.1) -> None:
        super().__init__()
        self.calibrate_below, self.smoothing = calibrate_below, smoothing
        self.partner: SelfMixPartner | None = None

    @classmethod
    def example_inputs(cls, batch: int, generator: torch.Generator | None = None) -> tuple[Any, Any, Tensor, Tensor]:
        """Logits with a spread teacher, so that some rows are calibrated and some are not."""
        student, teacher, labels, index = super().example_inputs(batch, generator)
        return student, teacher * 3, labels, index

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """The term of ``(B, C)`` student logits against the stored teacher logits (and a pending SelfMix
        partner's, which this call consumes)."""
        partner, self.partner = self.partner, None
        if partner is None:
            return ferkd_loss(student, teacher, labels, self.calibrate_below, self.smoothing)
        return ferkd_loss(student, teacher, labels, self.calibrate_below, self.smoothing, partner.teacher, partner.lam)
