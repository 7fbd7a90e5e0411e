"""``class_mismatch``: semi-supervised learning whose unlabelled pool also holds classes absent from the labels.

The setting of Oliver et al. (NeurIPS 2018, "Realistic evaluation of deep semi-supervised learning algorithms"):
the labelled images come from the *known* classes only; the unlabelled pool has a fixed size, a fraction
``mismatch`` of it drawn from the other (*unseen*) classes and the rest from the known classes' remaining images.
The model predicts the known classes only, and the test split is restricted to them (relabelled 0..k-1 in the
order given). Unlabelled images of unseen classes carry :data:`~kdkit.data.base.UNLABELLED` like the others: the
run cannot tell them apart, which is the point.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Le

from kdkit.data.base import UNLABELLED, ImageData, balanced_indices
from kdkit.data.settings.common import check_classes, labelled_only, of_classes, relabel, with_train
from kdkit.data.settings.registry import register_setting
from kdkit.errors import KdkitError


def default_known(num_classes: int) -> tuple[int, ...]:
    """The first 60 % of the classes (6 of 10, Oliver et al.'s CIFAR-10 split size)."""
    return tuple(range(max(1, round(0.6 * num_classes))))


def draw(labels: torch.Tensor, candidates: torch.Tensor, n: int, seed: int, what: str) -> torch.Tensor:
    """``n`` of ``candidates`` (indices into ``labels``), balanced over their classes, ascending."""
    if n > len(candidates):
        raise KdkitError(f"the unlabelled pool needs {n} images of the {what} classes but only {len(candidates)} "
                         "are available", fix="lower data.setting.unlabelled or data.setting.labelled, or change "
                         "data.setting.mismatch", where="data.setting.unlabelled")
    if n == 0:
        return candidates[:0]
    sub = labels[candidates]
    classes = sub.unique()
    dense = torch.searchsorted(classes, sub)  # class ids 0..m-1 for the balanced draw
    return candidates[balanced_indices(dense, len(classes), n, seed)]


@register_setting("class_mismatch", help="semi-supervised with unseen classes in the unlabelled pool (fraction "
                                         "mismatch); test on the known classes")
def class_mismatch(data: ImageData, *, seed: int, known: tuple[int, ...] | None = None,
                   labelled: Annotated[int, Ge(1)] = 2400, unlabelled: Annotated[int, Ge(1)] = 20000,
                   mismatch: Annotated[float, Ge(0), Le(1)] = 0.5) -> ImageData:
    """Labels from the known classes; an unlabelled pool of which ``mismatch`` comes from the unseen classes.

    Args:
        data: The dataset.
        seed: Seed of every draw.
        known: The known classes (labelled, predicted, tested), relabelled 0..k-1 in this order; default the
            first 60 % of the classes (0-5 of 10).
        labelled: Labelled images, class-balanced over the known classes.
        unlabelled: Size of the unlabelled pool.
        mismatch: Fraction of the pool drawn from the unseen classes (class-balanced); the rest comes from the known
            classes' images that are not labelled.

    Returns:
        Labelled + pooled images in their original order, ``len(known)`` classes, the test split restricted to them.
    """
    labelled_only(data, "class_mismatch")
    known = check_classes(known if known is not None else default_known(data.num_classes), data.num_classes,
                          "known")
    unseen = tuple(c for c in range(data.num_classes) if c not in known)
    if not unseen and mismatch > 0:
        raise KdkitError(f"mismatch {mismatch} needs unseen classes, but known lists all {data.num_classes}",
                         fix="leave some classes out of data.setting.known, or set mismatch: 0",
                         where="data.setting.known")
    labels = data.train_labels
    known_idx = of_classes(labels, known)
    local = relabel(labels[known_idx], known)
    if not len(known) <= labelled <= len(known_idx):
        raise KdkitError(f"labelled {labelled} is out of range ({len(known_idx)} images of the known classes)",
                         fix=f"choose labelled between {len(known)} and {len(known_idx)}",
                         where="data.setting.labelled")
    chosen = known_idx[balanced_indices(local, len(known), labelled, seed)]
    rest = known_idx[~torch.isin(known_idx, chosen)]
    n_unseen = round(unlabelled * mismatch)
    pool = torch.cat([draw(labels, rest, unlabelled - n_unseen, seed + 1, "known"),
                      draw(labels, of_classes(labels, unseen), n_unseen, seed + 2, "unseen")])
    index = torch.cat([chosen, pool]).sort().values
    new = torch.full_like(labels, UNLABELLED)
    new[chosen] = relabel(labels[chosen], known)
    return with_train(data, index, new[index], classes=known,
                      name=f"{data.name}-mismatch{mismatch:g}-seed{seed}",
                      source=f"class mismatch: {labelled} labelled images of classes {list(known)}, an unlabelled "
                             f"pool of {unlabelled} ({n_unseen} from classes {list(unseen)}); test on the known "
                             f"classes (setting seed {seed})")
