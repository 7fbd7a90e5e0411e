"""``pruned``: a fraction of the training images kept, chosen at random or by a teacher's score.

The setting of "Distilling the Knowledge in Data Pruning" (Ben-Baruch et al., 2024): train (and distil) on a
pruned training set. ``score: random`` keeps a uniform random fraction. ``score: teacher_margin`` ranks the images
by the margin of the recipe's frozen teacher on the un-augmented image,
``m = p_T(y | x) - max_{k != y} p_T(k | x)`` (softmax at temperature 1), a confidence score in the spirit of EL2N
(Paul et al., NeurIPS 2021) computed with the trained teacher instead of early-training students (EL2N and the
forgetting score need models trained for the purpose; the suite's teacher is at hand). Low margin = hard.
``retain: hardest`` keeps the lowest margins (EL2N's rule), ``easiest`` the highest (the better choice when little
data is kept, Sorscher et al., NeurIPS 2022). Ties keep the lower index. The teacher is a dependency of this score: a
recipe without ``teacher:`` is refused before training.

``balance: global`` (the default) ranks or draws over the whole training set, so the kept classes follow the score
(a teacher's easiest images can be mostly of a few classes); ``balance: class`` keeps ``round(keep * N_c)`` images of
each class ``c`` by the same rule, the kept set's class histogram the training set's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch
from annotated_types import Gt, Le
from torch import Tensor

from kdkit.data.base import ImageData
from kdkit.data.settings.common import labelled_only, with_train
from kdkit.data.settings.registry import register_setting
from kdkit.errors import KdkitError


def teacher_margin(logits: Tensor, labels: Tensor) -> Tensor:
    """``p(y) - max_{k != y} p(k)`` per sample (softmax of ``logits``, computed in float64)."""
    probs = logits.double().softmax(1)
    true = probs.gather(1, labels[:, None]).squeeze(1)
    others = probs.scatter(1, labels[:, None], float("-inf")).max(1).values
    return true - others


def kept_count(total: int, keep: float) -> int:
    """Images kept of ``total`` for fraction ``keep`` (rounded, at least one)."""
    return max(1, round(keep * total))


def ranked(order: Tensor, labels: Tensor, n: int, balance: str, keep: float) -> Tensor:
    """The first ``n`` of ``order`` (``balance: global``), or the first ``round(keep * N_c)`` of each class in it
    (``balance: class``); sorted dataset indices."""
    if balance == "global":
        return order[:n].sort().values
    ordered = labels[order]
    chosen = [order[ordered == c][:round(keep * int((labels == c).sum()))] for c in labels.unique().tolist()]
    return torch.cat(chosen).sort().values


def _reads_teacher(params: Mapping[str, Any]) -> bool:
    return params.get("score", "random") != "random"


@register_setting("pruned", help="keep a fraction of the training images: random, or by the teacher's margin",
                  reads_teacher=_reads_teacher)
def pruned(data: ImageData, *, seed: int, keep: Annotated[float, Gt(0), Le(1)] = 0.5,
           score: Literal["random", "teacher_margin"] = "random",
           retain: Literal["hardest", "easiest"] = "hardest", balance: Literal["global", "class"] = "global",
           teacher_logits: Tensor | None = None) -> ImageData:
    """Keep ``round(keep * N)`` training images (``balance: class``: ``round(keep * N_c)`` of each class).

    Args:
        data: The dataset.
        seed: Seed of the random choice (``score: random``).
        keep: Fraction of the training images kept.
        score: ``random`` (uniform), or ``teacher_margin`` (the frozen teacher's margin; needs ``teacher:``).
        retain: With a score: keep the ``hardest`` (lowest margin) or the ``easiest`` images.
        balance: ``global``: rank or draw over all images; ``class``: within each class.
        teacher_logits: ``(N, K)`` teacher logits on the training images, filled in by kdkit for ``teacher_margin``.

    Returns:
        The kept images in their original order; test split unchanged.

    Raises:
        KdkitError: A score that needs the teacher's logits without them.
    """
    labelled_only(data, "pruned")
    labels = data.train_labels
    n = kept_count(len(labels), keep)
    if score == "random":
        index = ranked(torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)), labels, n, balance,
                       keep)
        how = "random"
    else:
        if teacher_logits is None or tuple(teacher_logits.shape) != (len(labels), data.num_classes):
            got = "none" if teacher_logits is None else f"shape {tuple(teacher_logits.shape)}"
            raise KdkitError(f"score {score!r} ranks the training images by a teacher's logits "
                             f"({len(labels)} x {data.num_classes}), got {got}",
                             choices=["random", "teacher_margin"], bad=score,
                             fix="give the recipe a `teacher:` (its logits are computed before training), or use "
                                 "score: random", where="data.setting.score")
        margin = teacher_margin(teacher_logits, labels)
        order = torch.sort(margin, stable=True, descending=retain == "easiest").indices
        index = ranked(order, labels, n, balance, keep)
        how = f"the {retain} by teacher margin"
    per_class = ""
    if balance == "class":
        per_class, how = "-per-class", f"{how} within each class"
    return with_train(data, index, labels[index], name=f"{data.name}-pruned{keep:g}-{score}{per_class}-seed{seed}",
                      source=f"pruned: {len(index)}/{len(labels)} training images kept, {how} (setting seed {seed})")
