"""Logit standardisation: a pre-processing option shared by the logit losses (KD, DKD, DIST, MLKD)."""

from __future__ import annotations

from torch import Tensor

from kdkit.losses.base import widen


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    r"""Z-score each sample's logits (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024).

    .. math:: \tilde z = \frac{z - \operatorname{mean}(z)}{\operatorname{std}(z) + \epsilon}

    with the unbiased standard deviation over classes, as in the official code. Applied to both teacher
    and student before the loss, with a base temperature (2, or 3 for some pairs); the paper's CIFAR
    setting is KD weight 9, CE 0.1. Select it with ``standardize: true`` on ``kd``, ``dkd``, ``dist``
    or ``mlkd`` -- one option, not a copy of each loss.

    Args:
        logits: ``(B, K)`` logits.
        eps: Added to the std (guards constant logits).

    Returns:
        ``(B, K)`` standardised logits, in float32 (float64 for float64 logits).
    """
    z = widen(logits)
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + eps)
