"""``few_classes``: a 2-, 3- (or k-)class problem made of some of the dataset's classes, relabelled 0..k-1.

The default pair is Fashion-MNIST's most confused one, T-shirt/top (0) vs Shirt (6), so the problem is not trivial;
``[2, 4, 6]`` (Pullover, Coat, Shirt) is its hardest 3-class one. Training and test splits keep only those classes.
"""

from __future__ import annotations

from typing import Annotated

from annotated_types import MinLen

from kdkit.data.base import ImageData
from kdkit.data.settings.common import check_classes, labelled_only, of_classes, relabel, with_train
from kdkit.data.settings.registry import register_setting


@register_setting("few_classes", help="a k-class problem of the listed classes (default [0, 6]), relabelled 0..k-1")
def few_classes(data: ImageData, *, seed: int, classes: Annotated[tuple[int, ...], MinLen(2)] = (0, 6)) -> ImageData:
    """Keep the listed classes only, relabelled ``0..k-1`` in the order given.

    Args:
        data: The dataset.
        seed: Not used (no random choice); accepted like every setting's.
        classes: The classes, at least two (default ``[0, 6]``, T-shirt/top vs Shirt on Fashion-MNIST).

    Returns:
        Train and test images of those classes, ``len(classes)`` classes.
    """
    labelled_only(data, "few_classes")
    chosen = check_classes(classes, data.num_classes, "classes", at_least=2)
    index = of_classes(data.train_labels, chosen)
    names = ", ".join(data.classes[c] for c in chosen)
    return with_train(data, index, relabel(data.train_labels[index], chosen), classes=chosen,
                      name=f"{data.name}-classes{'_'.join(map(str, chosen))}",
                      source=f"{len(chosen)} classes: {names} (relabelled 0..{len(chosen) - 1})")
