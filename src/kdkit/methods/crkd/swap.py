"""UNO's swapped prediction on the novel classes: the base objective Cr-KD regularises (``ncd_swap`` loss)."""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor

from kdkit.data.base import UNLABELLED
from kdkit.losses.base import DistillLoss, compute_dtype, register_loss
from kdkit.methods.crkd.sinkhorn import sinkhorn_knopp


def swapped_prediction_loss(logits: Tensor, labels: Tensor, known: int, temperature: float = 0.1,
                            epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    r"""UNO's swapped-prediction loss on the unlabelled (novel-class) samples of a ``[view 1; view 2]`` batch.

    Fini et al., "A Unified Objective for Novel Class Discovery" (ICCV 2021), the base objective of Cr-KD (Gu et al.,
    ICCV 2023, ``rKD.py``). Rows ``[:B]`` and ``[B:]`` are two augmented views of the same ``B`` images (kdkit's
    ``data.views: 2``). For each view :math:`v`, the pseudo-labels of its unlabelled rows are Sinkhorn-Knopp
    assignments of their novel-class logits (:func:`sinkhorn_knopp`, no gradient), zero on the ``known`` classes; the
    *other* view predicts them:

    .. math:: \mathcal{L} = \frac{1}{2}\sum_{v}\frac{1}{|U|}\sum_{i\in U} -\sum_{c} q^{v}_{ic}
              \log\mathrm{softmax}(z^{\bar v}_i/\tau)_c,

    the softmax over every class (known and novel), so the novel samples are also pushed off the known classes. The
    labelled samples' term of UNO (cross-entropy with the one-hot label, over every class) is the engine's
    cross-entropy (``train.ce_weight``).

    Args:
        logits: ``(2B, K)`` logits of the two views, known classes first (``novel_classes`` numbering).
        labels: ``(2B,)`` labels; only which are :data:`UNLABELLED` matters (the novel samples).
        known: Number of known classes ``k``; outputs ``k..K-1`` are the novel slots.
        temperature: ``tau`` of the predictions (UNO: 0.1 on cosine logits).
        epsilon: Sinkhorn's ``epsilon`` (UNO: 0.05 on cosine logits).
        iterations: Sinkhorn rounds (UNO: 3).

    Returns:
        Scalar in the computing precision; 0 (with zero gradient) when the batch has no unlabelled sample.

    Raises:
        ValueError: An odd number of rows (not two views of one batch).
    """
    if len(logits) % 2:
        raise ValueError(f"swapped prediction reads [view 1; view 2] batches; got {len(logits)} rows (odd)")
    dtype = compute_dtype(logits)
    z = logits.to(dtype)
    batch = len(z) // 2
    unlabelled = labels.reshape(-1)[:batch] == UNLABELLED
    views = (z[:batch][unlabelled], z[batch:][unlabelled])
    if not len(views[0]):
        return z.sum() * 0.0
    total = z.new_zeros(())
    for v, other in ((0, 1), (1, 0)):
        targets = torch.zeros_like(views[v])
        targets[:, known:] = sinkhorn_knopp(views[v][:, known:].detach(), epsilon, iterations)
        total = total - (targets * F.log_softmax(views[other] / temperature, dim=1)).sum(1).mean()
    return total / 2


@register_loss("ncd_swap", help="UNO's swapped prediction with Sinkhorn pseudo-labels on the novel classes "
                                "(Cr-KD's base novel-class-discovery objective; data.views: 2)")
class NcdSwapLoss(DistillLoss):
    """UNO's swapped prediction (see :func:`swapped_prediction_loss`); needs no teacher.

    Args:
        known: Number of known classes (the ``novel_classes`` setting's; the method checks it against the data).
        temperature: ``tau`` of the predictions. UNO's 0.1 is for cosine logits (``|z| <= 1``); kdkit's models end in
            a linear layer whose logits span about ten times that range, hence 1 in the shipped recipes.
        epsilon: Sinkhorn's entropic regularisation; UNO's 0.05 is for cosine logits (0.5 in the shipped recipes,
            for the same reason).
        iterations: Sinkhorn rounds (UNO: 3).
    """
    reads_logits = frozenset({"classes"})

    needs_teacher = False

    def __init__(self, *, known: Annotated[int, Ge(1)] = 5, temperature: Annotated[float, Gt(0)] = 0.1,
                 epsilon: Annotated[float, Gt(0)] = 0.05, iterations: Annotated[int, Ge(1)] = 3) -> None:
        super().__init__()
        self.known, self.temperature, self.epsilon, self.iterations = known, temperature, epsilon, iterations

    @classmethod
    def example_inputs(cls, batch: int, generator: torch.Generator | None = None) -> tuple[Any, Any, Tensor, Tensor]:
        """Two views of ``batch // 2`` images (``batch`` rows), every other image unlabelled."""
        student, teacher, labels, index = super().example_inputs(batch, generator)
        half = batch // 2
        labels = labels.clone()
        labels[:half][1::2] = UNLABELLED
        labels[half:2 * half] = labels[:half]
        return student, teacher, labels, index

    def forward(self, student: Tensor, teacher: Any, labels: Tensor) -> Tensor:
        """The swapped-prediction loss of the ``(2B, K)`` student logits."""
        return swapped_prediction_loss(student, labels, self.known, self.temperature, self.epsilon, self.iterations)
