"""The Sinkhorn-Knopp equipartition of UNO (Fini et al., ICCV 2021), the pseudo-labels of Cr-KD's base objective."""

from __future__ import annotations

import math

import torch
from torch import Tensor


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    r"""Soft assignments of ``B`` samples to ``K`` clusters, each cluster given an equal share of the batch.

    UNO's ``SinkhornKnopp`` (and Cr-KD's copy, ``model/losses.py``): :math:`Q = \exp(z/\epsilon)^\top`, normalised to
    sum 1, then ``iterations`` times: each cluster's row scaled to sum :math:`1/K`, each sample's column to :math:`1/B`;
    returned as :math:`B\,Q^\top`, so each sample's row sums to 1. Computed in the log domain (the same numbers
    without the overflow of :math:`\exp(z/\epsilon)` for logits larger than :math:`88\epsilon` in float32).

    Args:
        logits: ``(B, K)`` scores of the samples for the clusters (no gradient flows).
        epsilon: Entropic regularisation (0.05 in UNO, on cosine logits).
        iterations: Row/column normalisation rounds (3 in UNO).

    Returns:
        ``(B, K)`` assignments, rows summing to 1, in the logits' precision (never below float32).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    batch, clusters = logits.shape
    log_q = logits.to(dtype) / epsilon
    log_q = log_q - torch.logsumexp(log_q.reshape(-1), 0)
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, 0, keepdim=True) - math.log(clusters)  # each cluster: 1/K
        log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True) - math.log(batch)  # each sample: 1/B
    return (log_q + math.log(batch)).exp()
