"""BYOT's loss of one shallow classifier: CE, KL to the deepest classifier, hint to the deepest feature."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch.nn.functional as F
from annotated_types import Ge, Gt, Le
from torch import Tensor

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss

Hint = Literal["l2", "masked_sum"]


def hint_loss(feature: Tensor, target: Tensor, hint: Hint) -> Tensor:
    """``l2``: per-sample ``||F_i - F_C||^2`` averaged over the batch (the paper); ``masked_sum``: ``(F_i - F_C)^2``
    summed over the batch and the elements where either is positive (the re-implementation's
    ``feature_loss_function``)."""
    squared = (feature - target) ** 2
    if hint == "l2":
        return squared.flatten(1).sum(1).mean()
    return (squared * ((feature > 0) | (target > 0)).to(squared.dtype)).sum()


def byot_loss(feature: Tensor, logits: Tensor, deep_feature: Tensor, deep_logits: Tensor, labels: Tensor,
              alpha: float = 0.1, temperature: float = 3.0, hint_weight: float = 1e-4, hint: Hint = "l2") -> Tensor:
    r"""The loss of one BYOT shallow classifier (Zhang et al., ICCV 2019):

    .. math::
        (1-\alpha)\,\mathrm{CE}(q_i, y) + \alpha\,T^2\,\mathrm{KL}(\mathrm{softmax}(q_C/T)\,\|\,\mathrm{softmax}(q_i/T))
        + \lambda\,\mathrm{hint}(F_i, F_C)

    (batch means; :func:`hint_loss` for the hint). ``q_C`` and ``F_C`` are targets (no gradient).

    Args:
        feature: ``F_i``, the shallow classifier's feature ``(B, ...)``.
        logits: ``q_i``, its logits ``(B, K)``.
        deep_feature: ``F_C``, the feature the model's classifier reads, same shape as ``feature``.
        deep_logits: ``q_C``, the model's logits.
        labels: ``(B,)`` class indices.
        alpha: Weight of the KL term; ``1 - alpha`` weighs the CE.
        temperature: ``T``.
        hint_weight: ``lambda``.
        hint: ``l2`` or ``masked_sum``.

    Returns:
        Scalar, in the computing precision (float64 for float64 inputs, else float32).
    """
    dtype = compute_dtype(feature, logits, deep_feature, deep_logits)
    logits, deep_logits = logits.to(dtype), deep_logits.detach().to(dtype)
    ce = F.cross_entropy(logits, labels)
    log_p_i = F.log_softmax(logits / temperature, dim=1)
    log_p_c = F.log_softmax(deep_logits / temperature, dim=1)
    kl = F.kl_div(log_p_i, log_p_c, reduction="batchmean", log_target=True) * temperature**2
    hint_value = hint_loss(feature.to(dtype), deep_feature.detach().to(dtype), hint)
    return (1 - alpha) * ce + alpha * kl + hint_weight * hint_value


@register_loss("byot", help="Be Your Own Teacher (Zhang et al., ICCV 2019): a shallow classifier learns from the "
                            "labels, the deepest classifier and the deepest feature (self-distillation)")
class ByotLoss(DistillLoss):
    """One BYOT shallow classifier's loss on the ``byot_head`` bridge's output; see :func:`byot_loss`.

    Recipe (one term per shallow classifier; ``train.ce_weight: 0.9`` is the deepest classifier's ``1 - alpha``)::

        distill:
          - {loss: byot, student: [stage1, stage2, logits], bridge: byot_head, alpha: 0.1, temperature: 3}

    Args:
        alpha: Weight of the KL to the deepest classifier; ``1 - alpha`` weighs the CE.
        temperature: Softening temperature of both classifiers' outputs.
        hint_weight: ``lambda``, the weight of the feature hint.
        hint: ``l2`` (the paper's) or ``masked_sum`` (the re-implementation's).
    """

    needs_teacher = False
    pairwise = False
    requires_bridge = "byot_head"
    uses_labels = True

    def __init__(self, *, alpha: Annotated[float, Ge(0), Le(1)] = 0.1, temperature: Annotated[float, Gt(0)] = 3.0,
                 hint_weight: Annotated[float, Ge(0)] = 1e-4, hint: Hint = "l2") -> None:
        super().__init__()
        self.alpha, self.temperature, self.hint_weight, self.hint = alpha, temperature, hint_weight, hint

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        return [(4, 2, 2), (10,), (4, 2, 2), (10,)], (10,)

    def check_shapes(self, student: Any, teacher: Any) -> str | None:
        """The ``byot_head`` output: two features of one shape and two ``(K,)`` logits."""
        shapes = [tuple(s) for s in student] if isinstance(student, list) else []
        if len(shapes) != 4 or shapes[0] != shapes[2] or shapes[1] != shapes[3] or len(shapes[1]) != 1:
            return f"needs the byot_head output [F_i, q_i, F_C, q_C], got {student}"
        return None

    def forward(self, student: Any, teacher: Any, labels: Tensor) -> Tensor:
        """The loss of the bridge's ``(F_i, q_i, F_C, q_C)``."""
        feature, logits, deep_feature, deep_logits = student
        return byot_loss(feature, logits, deep_feature, deep_logits, labels, self.alpha, self.temperature,
                         self.hint_weight, self.hint)

