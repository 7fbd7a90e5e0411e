"""WAD's knowledge generation: pseudo-labels and weights of the unlabelled samples from a frozen representation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def class_similarities(unlabelled: Tensor, labelled: Tensor, labelled_classes: Tensor, classes: int,
                       chunk: int = 2048) -> Tensor:
    r"""``s[i, c] = max_{j : y_j = c} cos(u_i, l_j)``: each unlabelled sample's nearest labelled sample of each class.

    WAD's ``get_scores`` (official ``evals/eval.py``): the features are L2-normalised, every labelled sample of class
    ``c`` is one axis of the class, and the score is the largest cosine similarity to them (summed over CSI's shift
    transforms in the official code; kdkit uses one view).

    Args:
        unlabelled: ``(N, ...)`` features of the unlabelled samples (flattened).
        labelled: ``(M, ...)`` features of the labelled samples.
        labelled_classes: ``(M,)`` their classes in ``0..classes-1``; every class needs one sample at least.
        classes: Number of known classes ``C``.
        chunk: Unlabelled rows per similarity block (bounds the memory to ``chunk x M``).

    Returns:
        ``(N, C)`` scores in ``[-1, 1]``, in the features' precision (never below float32).

    Raises:
        ValueError: A class without a labelled sample.
    """
    missing = sorted(set(range(classes)) - set(labelled_classes.tolist()))
    if missing:
        raise ValueError(f"classes {missing} have no labelled sample to compare with")
    dtype = torch.promote_types(torch.promote_types(unlabelled.dtype, labelled.dtype), torch.float32)
    u = F.normalize(unlabelled.reshape(len(unlabelled), -1).to(dtype), dim=1)
    v = F.normalize(labelled.reshape(len(labelled), -1).to(dtype), dim=1)
    onehot = F.one_hot(labelled_classes.to(u.device), classes).bool()  # (M, C)
    blocks = []
    for start in range(0, len(u), chunk):
        sim = u[start:start + chunk] @ v.T  # (n, M)
        masked = sim.unsqueeze(2).masked_fill(~onehot.unsqueeze(0), float("-inf"))  # (n, M, C)
        blocks.append(masked.amax(1))
    return torch.cat(blocks) if blocks else u.new_zeros(0, classes)


def pseudo_labels_and_weights(scores: Tensor) -> tuple[Tensor, Tensor]:
    r"""WAD's pseudo-label (the most similar class) and weight of each unlabelled sample.

    Official ``knowledge_generation``: with :math:`s_{(1)} \ge s_{(2)}` the two largest class scores, the weight is
    :math:`s_{(1)}(1 - s_{(2)}/s_{(1)}) = s_{(1)} - s_{(2)}`: high when the sample is close to one known class and far
    from the others (the paper's pointwise mutual information between the sample and its class, large for a sample
    of a known class), near 0 when two classes are equally close (typically an unseen class's sample between them).

    Args:
        scores: ``(N, C)`` class similarities (:func:`class_similarities`), ``C >= 2``.

    Returns:
        ``(N,)`` pseudo-labels (int64) and ``(N,)`` weights (``>= 0``, the scores' dtype).
    """
    top = scores.topk(2, dim=1).values
    return scores.argmax(1), top[:, 0] - top[:, 1]
