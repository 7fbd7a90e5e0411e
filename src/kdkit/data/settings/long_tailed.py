"""``long_tailed``: exponentially imbalanced classes, the CIFAR-10-LT rule (Cao et al., NeurIPS 2019, LDAM).

Class ``i`` of ``K`` keeps ``n_i = int(n_max * (1 / imbalance) ** (i / (K - 1)))`` training images, drawn uniformly
from its images, so class 0 is the head (``n_max``) and class ``K - 1`` the tail (``n_max / imbalance``); the
test split stays balanced. ``n_max`` defaults to the smallest class's size (every class can fill its quota).
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge

from kdkit.data.base import ImageData
from kdkit.data.settings.common import labelled_only, uniform_choice, with_train
from kdkit.data.settings.registry import register_setting
from kdkit.errors import KdkitError


def long_tail_counts(num_classes: int, n_max: int, imbalance: float) -> list[int]:
    """Images per class under the CIFAR-LT rule (module docstring), head first."""
    if num_classes < 2:
        return [n_max] * num_classes
    return [int(n_max * (1.0 / imbalance) ** (i / (num_classes - 1.0))) for i in range(num_classes)]


@register_setting("long_tailed", help="exponential class imbalance n_i = n_max * imbalance^(-i/(K-1)) (CIFAR-LT)")
def long_tailed(data: ImageData, *, seed: int, imbalance: Annotated[float, Ge(1)] = 100.0,
                max_per_class: Annotated[int, Ge(1)] | None = None) -> ImageData:
    """Keep ``int(n_max * (1/imbalance)^(i/(K-1)))`` training images of class ``i``.

    Args:
        data: The dataset.
        seed: Seed of the images kept in each class.
        imbalance: Ratio of the head class's count to the tail class's (100: CIFAR-10-LT's).
        max_per_class: ``n_max``, the head class's count; default the smallest class's size.

    Returns:
        The kept training images in their original order; test split unchanged (balanced).
    """
    labelled_only(data, "long_tailed")
    labels = data.train_labels
    available = torch.bincount(labels, minlength=data.num_classes)
    n_max = int(available.min()) if max_per_class is None else max_per_class
    counts = long_tail_counts(data.num_classes, n_max, imbalance)
    short = [(c, n, int(available[c])) for c, n in enumerate(counts) if n > available[c]]
    if short:
        c, n, have = short[0]
        raise KdkitError(f"class {c} needs {n} images for max_per_class {n_max} but has {have}",
                         fix=f"lower data.setting.max_per_class (at most {int(available.min())} fills every class) "
                             "or omit it", where="data.setting.max_per_class")
    gen = torch.Generator().manual_seed(seed)
    index = torch.cat([uniform_choice((labels == c).nonzero().flatten(), n, gen)
                       for c, n in enumerate(counts)]).sort().values
    return with_train(data, index, labels[index], name=f"{data.name}-lt{imbalance:g}-seed{seed}",
                      source=f"long-tailed: imbalance {imbalance:g}, {counts[0]}..{counts[-1]} images per class "
                             f"({len(index)} in all; setting seed {seed})")
