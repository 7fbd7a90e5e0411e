"""FerKD's hard-region mining on a teacher cache: rank each image's stored views (regions) by the teacher's
confidence on the true class and drop the easiest and the hardest ones before training."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdkit.cache import TeacherCache
from kdkit.distill import pick


def discarded(views: int, easy: float, hard: float) -> tuple[int, int]:
    """How many of an image's ``views`` stored views are dropped as easiest and as hardest: ``floor(views * f)``."""
    return math.floor(views * easy), math.floor(views * hard)


def view_confidence(cache: TeacherCache, labels: Tensor, tap: str, batch: int = 4096) -> Tensor:
    """The teacher's probability of the true class on every stored view: ``(N, K)`` float32.

    Args:
        cache: The opened cache.
        labels: ``(N,)`` class labels of the cached training images (in the cache's order).
        tap: The stored logits' tap spec (``topk`` storage reads back as log-probabilities: same softmax).
        batch: Images per lookup.
    """
    n, k = cache.num_samples, cache.num_views
    out = torch.empty(n, k)
    for start in range(0, n, batch):
        index = torch.arange(start, min(start + batch, n))
        for view in range(k):
            logits = pick(cache.lookup(index, torch.full_like(index, view)), tap).float()
            out[index, view] = logits.softmax(1).gather(1, labels[index].long().view(-1, 1)).squeeze(1).cpu()
    return out


def kept_views(confidence: Tensor, easy: int, hard: int) -> Tensor:
    """Per image, the views left after dropping the ``easy`` most and the ``hard`` least confident ones.

    Ties are broken by view index (a stable sort), so the selection is a pure function of the cache.

    Args:
        confidence: ``(N, K)`` teacher confidence on the true class per stored view.
        easy: Views dropped per image from the top.
        hard: Views dropped per image from the bottom.

    Returns:
        ``(N, K - easy - hard)`` int64 view indices, ascending in each row.
    """
    k = confidence.shape[1]
    if easy + hard >= k:
        raise ValueError(f"dropping {easy} easy + {hard} hard of {k} views leaves none")
    order = torch.sort(confidence, dim=1, stable=True).indices  # ascending confidence
    return order[:, hard:k - easy].sort(dim=1).values
