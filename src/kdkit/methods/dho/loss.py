"""DHO's distillation loss: KD of the teacher's predictions into the KD head, on labelled and unlabelled samples."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from annotated_types import Gt
from torch import Tensor

from kdkit.data.base import UNLABELLED
from kdkit.losses.base import DistillLoss, compute_dtype, register_loss

Average = Literal["union", "split"]


def dho_kd_loss(kd_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 2.0,
                average: Average = "union") -> Tensor:
    r"""The KD term of Dual-Head Optimization (Kang et al., "Simple Semi-supervised Knowledge Distillation from
    Vision-Language Models via Dual-Head Optimization", 2025), on the KD head's logits.

    Per sample, :math:`\ell_i = T^2\,\mathrm{KL}(\mathrm{softmax}(z_t^i/T)\,\|\,\mathrm{softmax}(z_{KD}^i/T))`, on
    labelled and unlabelled samples alike (:data:`~kdkit.data.base.UNLABELLED` marks the latter). ``average``:

    * ``union`` (default, the paper's :math:`\mathcal{L}_{KD}` over :math:`\mathcal{D}_l \cup \mathcal{D}_u`): the
      mean of :math:`\ell_i` over the batch;
    * ``split`` (the official code, ``train_*.py``): the mean over the batch's labelled samples plus the mean over its
      unlabelled ones, as the code adds ``kl_div(..., 'batchmean')`` of a labelled and of an unlabelled batch (an
      empty part adds 0).

    The full DHO objective is :math:`\lambda\,\mathcal{L}_{CE}(h_{CE}) + (1-\lambda)\,\mathcal{L}_{KD}(h_{KD})`:
    ``train.ce_weight`` is :math:`\lambda` and this term's weight :math:`1-\lambda`.

    Args:
        kd_logits: ``(B, K)`` logits of the KD head.
        teacher_logits: ``(B, K)`` teacher logits.
        labels: ``(B,)`` labels; only which are :data:`UNLABELLED` matters (``split``).
        temperature: ``T`` (2 in the official code), with the :math:`T^2` factor.
        average: ``union`` or ``split`` (above).

    Returns:
        Scalar, in the computing precision (float64 for float64 inputs, else float32).
    """
    dtype = compute_dtype(kd_logits, teacher_logits)
    log_p_s = F.log_softmax(kd_logits.to(dtype) / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=1)
    per_sample = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1) * temperature**2
    if average == "union":
        return per_sample.mean()
    is_unlabelled = labels.reshape(-1) == UNLABELLED
    labelled, unlabelled = (~is_unlabelled).to(dtype), is_unlabelled.to(dtype)
    return ((per_sample * labelled).sum() / labelled.sum().clamp_min(1)
            + (per_sample * unlabelled).sum() / unlabelled.sum().clamp_min(1))


@register_loss("dho", help="DHO (Kang et al., 2025): KD of the teacher into a second (KD) head, labelled + unlabelled")
class DhoLoss(DistillLoss):
    """DHO's KD term on the ``dho_head`` bridge's logits; see :func:`dho_kd_loss`. Needs no labels.

    Recipe (``train.ce_weight: 0.5`` is :math:`\\lambda`, the CE head's weight)::

        distill:
          - {loss: dho, weight: 0.5, student: penultimate, bridge: dho_head, temperature: 2,
             bridge_params: {alpha: 0.5, beta: 1.0}}

    Args:
        temperature: Softening temperature (2, the official code's).
        average: ``union``: one mean over labelled and unlabelled samples (the paper's); ``split``: the labelled
            samples' mean plus the unlabelled ones' (the official code's two batches).
    """

    default_student_tap = "penultimate"
    requires_bridge = "dho_head"

    def __init__(self, *, temperature: Annotated[float, Gt(0)] = 2.0, average: Average = "union") -> None:
        super().__init__()
        self.temperature, self.average = temperature, average

    @classmethod
    def example_inputs(cls, batch: int, generator: torch.Generator | None = None) -> tuple[Any, Any, Tensor, Tensor]:
        """KD-head and teacher logits with every other sample unlabelled (the setting DHO is for)."""
        student, teacher, labels, index = super().example_inputs(batch, generator)
        labels = labels.clone()
        labels[1::2] = UNLABELLED
        return student, teacher, labels, index

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """The KD term of ``(B, K)`` KD-head logits against the teacher's."""
        return dho_kd_loss(student, teacher, labels, self.temperature, self.average)
