"""WAD's rounds (official ``distillation_main.py``): confident unlabelled samples join the labelled set.

The official code trains the classifier in ``split + 1`` rounds. After round ``i`` it predicts every remaining
unlabelled sample, ranks them by the cross-entropy between that prediction and the sample's pseudo-label, and moves
the ``alpha_i |U_i|`` best-agreeing ones, with their pseudo-labels, into the labelled set, where they are trained by the
cross-entropy and become class axes of the nearest-labelled-sample scores; the pseudo-labels and weights of the samples
still unlabelled are then recomputed. ``alpha_i`` decays as ``polynomial_decay(i, alpha, 0, split, power=2)``:
``alpha (1 - min(i, split) / split)^2``, so the last two rounds promote nothing.

kdkit's ``wad.rounds`` is the official ``split + 1`` (the code's default split 5 is ``rounds: 6``); the run's epochs are
divided evenly among the rounds (round ``r`` starts at epoch ``floor(r E / R)``); ``rounds: 1`` (kdkit's default) is
the single round of the paper's description.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.losses.base import widen


def promotion_fraction(completed: int, rounds: int, alpha: float) -> float:
    r"""Share of the remaining unlabelled samples promoted after round ``completed`` (1-based) of ``rounds``.

    The official ``polynomial_decay(i, alpha, 0, split, 2)`` with ``split = rounds - 1``:
    :math:`\alpha (1 - \min(i, s)/s)^2`.

    Args:
        completed: The round just finished, ``1..rounds-1``.
        rounds: Rounds in the run, ``>= 2``.
        alpha: Share after the first round of a long schedule (the code's ``--alpha``, 0.1).

    Returns:
        The fraction, in ``[0, alpha)``.
    """
    split = rounds - 1
    return alpha * (1 - min(completed, split) / split) ** 2


def round_starts(epochs: int, rounds: int) -> list[int]:
    """The epoch (0-based) each round starts at: ``floor(r * epochs / rounds)``; every round has one epoch at least
    when ``rounds <= epochs``."""
    return [r * epochs // rounds for r in range(rounds)]


def most_confident(logits: Tensor, pseudo: Tensor, count: int) -> Tensor:
    """The ``count`` rows whose logits give their pseudo-label the smallest cross-entropy (official
    ``calculate_loss_logits_pseudo``: ``topk(-CE)``), as row positions; ties keep the lower position first.

    Args:
        logits: ``(N, C)`` predictions of the unlabelled samples.
        pseudo: ``(N,)`` their pseudo-labels.
        count: How many to pick, ``0..N``.
    """
    if count <= 0:
        return torch.zeros(0, dtype=torch.int64, device=logits.device)
    ce = F.cross_entropy(widen(logits), pseudo, reduction="none")
    order = torch.sort(ce, stable=True).indices  # stable: equal losses keep dataset order (topk's is unspecified)
    return order[:count]


class RoundsState(nn.Module):
    """What the rounds changed, checkpointed with the run: every training sample's label (a promoted sample carries
    its pseudo-label) and how many rounds have finished."""

    def __init__(self, labels: Tensor) -> None:
        super().__init__()
        self.register_buffer("labels", labels.clone())
        self.register_buffer("completed", torch.zeros((), dtype=torch.int64))
