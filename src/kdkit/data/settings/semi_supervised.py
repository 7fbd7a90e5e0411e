"""``semi_supervised``: a class-balanced labelled subset; the other training images unlabelled.

The labelled images are exactly those of ``data.subset: LABELLED`` with ``data.subset_seed: SEED`` (the same rule,
:func:`kdkit.data.base.balanced_indices`), so a labels-only baseline trains on the same labels with ``data.subset``.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge

from kdkit.data.base import UNLABELLED, ImageData, balanced_indices
from kdkit.data.settings.common import labelled_only, uniform_choice, with_train
from kdkit.data.settings.registry import register_setting
from kdkit.errors import KdkitError


def split_labelled(labels: torch.Tensor, num_classes: int, labelled: int, unlabelled: int | None,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The labelled indices (class-balanced) and the unlabelled ones (the rest, or ``unlabelled`` of them drawn
    uniformly), both ascending and disjoint; a pure function of the arguments.

    Raises:
        KdkitError: More labels or unlabelled samples than the split holds, or fewer labels than classes.
    """
    total = len(labels)
    if not num_classes <= labelled <= total:
        raise KdkitError(f"labelled {labelled} is out of range ({total} training images, {num_classes} classes)",
                         fix=f"choose labelled between {num_classes} and {total}", where="data.setting.labelled")
    chosen = balanced_indices(labels, num_classes, labelled, seed)
    rest = torch.ones(total, dtype=torch.bool)
    rest[chosen] = False
    others = rest.nonzero().flatten()
    if unlabelled is None:
        return chosen, others
    if unlabelled > len(others):
        raise KdkitError(f"unlabelled {unlabelled} is more than the {len(others)} images left after {labelled} "
                         "labelled ones", fix=f"choose unlabelled <= {len(others)}, or omit it to use all of them",
                         where="data.setting.unlabelled")
    # a generator of its own (seed + 1): the labelled choice stays data.subset's whatever `unlabelled` is
    return chosen, uniform_choice(others, unlabelled, torch.Generator().manual_seed(seed + 1))


@register_setting("semi_supervised", help="a class-balanced labelled subset (labelled), the rest unlabelled")
def semi_supervised(data: ImageData, *, seed: int, labelled: Annotated[int, Ge(1)] = 3000,
                    unlabelled: Annotated[int, Ge(0)] | None = None) -> ImageData:
    """A class-balanced labelled subset of the training split; the other training images unlabelled.

    Args:
        data: The dataset.
        seed: Seed of the choices (the labelled images are ``data.subset``'s with this ``subset_seed``).
        labelled: Labelled training images (class-balanced).
        unlabelled: Unlabelled training images, drawn uniformly from the rest; default: all the rest.

    Returns:
        The labelled and unlabelled images in their original order; test split unchanged.
    """
    labelled_only(data, "semi_supervised")
    chosen, pool = split_labelled(data.train_labels, data.num_classes, labelled, unlabelled, seed)
    index = torch.cat([chosen, pool]).sort().values
    labels = torch.full((len(data.train_labels),), UNLABELLED, dtype=torch.int64)
    labels[chosen] = data.train_labels[chosen]
    return with_train(data, index, labels[index], name=f"{data.name}-semi{labelled}+{len(pool)}-seed{seed}",
                      source=f"semi-supervised: {labelled} labelled (class-balanced) + {len(pool)} unlabelled "
                             f"training images (setting seed {seed})")
