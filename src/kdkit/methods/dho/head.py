"""DHO's second head: a linear KD head on the student's feature, deployed with the model's own (CE) head.

The model's classifier is the CE head ``h_CE`` (trained by the objective's cross-entropy on the labelled samples);
this bridge is the KD head ``h_KD``, a linear layer on the same feature (the tap, flattened), trained by the ``dho``
loss on every sample. Both are part of the deployed network: :meth:`DhoHead.combine` gives

    p(x) = alpha * softmax(h_CE(f)) + (1 - alpha) * softmax(h_KD(f) / beta)

(the official code's ``evaluate``; ``beta`` rescales the KD head before its softmax), returned as its logarithm,
``log p`` (log-probabilities are valid logits: their softmax is ``p``, their argmax is ``p``'s, and the evaluation's
cross-entropy is the mixture's negative log-likelihood).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
from annotated_types import Ge, Gt, Le
from torch import Tensor, nn

from kdkit.bridges import register_bridge
from kdkit.bridges.roles import CombiningBridge
from kdkit.errors import KdkitError


def combine_heads(ce_logits: Tensor, kd_logits: Tensor, alpha: float, beta: float) -> Tensor:
    """``log(alpha * softmax(ce_logits) + (1 - alpha) * softmax(kd_logits / beta))``, row-wise, without underflow.

    Computed as a ``logsumexp`` of the two log-softmaxes shifted by ``log alpha`` and ``log(1 - alpha)`` (``alpha``
    of 0 or 1 selects one head exactly), in the logits' precision (never below float32).
    """
    dtype = torch.promote_types(torch.promote_types(ce_logits.dtype, kd_logits.dtype), torch.float32)
    log_ce = torch.log_softmax(ce_logits.to(dtype), dim=1)
    log_kd = torch.log_softmax(kd_logits.to(dtype) / beta, dim=1)
    if alpha >= 1.0:
        return log_ce
    if alpha <= 0.0:
        return log_kd
    return torch.logaddexp(log_ce + math.log(alpha), log_kd + math.log1p(-alpha))


class DhoHead(CombiningBridge):
    """The KD head ``h_KD``: flatten the student tap, one linear layer to the teacher's classes.

    Args:
        features: Width of the flattened student tap.
        classes: Classes (the teacher's logit width, the model's).
        alpha: Weight of the CE head's probabilities in the deployed prediction.
        beta: Temperature of the KD head's logits in the deployed prediction.
    """

    def __init__(self, features: int, classes: int, alpha: float, beta: float) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(features, classes)
        self.alpha, self.beta = alpha, beta

    def forward(self, feature: Tensor) -> Tensor:
        """KD-head logits ``(B, K)`` of the student tap ``(B, ...)``."""
        return self.linear(self.flatten(feature))

    def output_shape(self, input_shape: Any) -> tuple[int, ...]:
        """What the ``dho`` loss compares: the KD head's logits ``(K,)``."""
        return (self.linear.out_features,)

    def combine(self, model_logits: Tensor, out: Tensor) -> Tensor:
        """The deployed logits: ``log(alpha p_CE + (1 - alpha) p_KD^beta)`` (see :func:`combine_heads`)."""
        return combine_heads(model_logits, out, self.alpha, self.beta)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}"


@register_bridge("dho_head", help="DHO's KD head: a linear head on the student's feature, deployed as "
                                  "alpha * p_CE + (1 - alpha) * p_KD(./beta) with the model's own head",
                 example_shapes=((16,), (10,)))
def dho_head(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], *,
             alpha: Annotated[float, Ge(0), Le(1)] = 0.5, beta: Annotated[float, Gt(0)] = 1.0) -> DhoHead:
    """DHO's KD head on a student feature tap (Kang et al., 2025; see :mod:`kdkit.methods.dho`).

    Args:
        student_shape: Per-sample shape of the student tap (flattened by the head), e.g. ``penultimate``'s.
        teacher_shape: Per-sample shape of the teacher's logits ``(K,)``.
        alpha: Weight of the CE head (the model's classifier) in the deployed prediction; 1 - alpha is the KD
            head's. 0.5: the official ImageNet script's fixed value.
        beta: Temperature of the KD head's logits in the deployed prediction (1: the head's plain softmax; the
            official ImageNet script fixes 0.5, the few-shot script searches it on a validation split).
    """
    if len(teacher_shape) != 1:
        raise KdkitError(f"dho_head maps onto the teacher's logits (K,), got teacher tap shape {tuple(teacher_shape)}",
                         fix="give the dho term the teacher tap `logits` (its default)")
    return DhoHead(math.prod(student_shape), teacher_shape[0], alpha, beta)
