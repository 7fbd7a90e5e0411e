"""``novel_classes``: novel class discovery -- labelled known classes, unlabelled novel classes to discover.

The standard split (Han et al., ICCV 2019; CIFAR-10 5/5): every training image of a known class is labelled,
every training image of a novel class is unlabelled. Classes are renumbered known first (in their original order),
then novel, so a model's outputs ``0..k-1`` are the known classes and ``k..K-1`` the slots of the novel clusters.
The test split keeps every class; the classification task then also reports ``novel_acc``: clustering accuracy on
the novel-class test images, their argmax over the novel slots matched to the true classes by the Hungarian
algorithm (:func:`kdkit.tasks.classification.cluster_accuracy`).

``part: known`` keeps the known classes' labelled images only, with the same numbering and outputs: the *known-class
model* that discovery methods start from or distil (Cr-KD's teacher), and the labels-only baseline of a discovery
suite. Its test split still has every class (its novel outputs never learned anything: ``novel_acc`` is a floor).
"""

from __future__ import annotations

from typing import Literal

import torch

from kdkit.data.base import UNLABELLED, ImageData
from kdkit.data.settings.common import check_classes, labelled_only, relabel, with_train
from kdkit.data.settings.registry import register_setting
from kdkit.errors import KdkitError


@register_setting("novel_classes", help="known classes labelled, novel classes unlabelled (metric novel_acc: "
                                        "Hungarian clustering accuracy)")
def novel_classes(data: ImageData, *, seed: int, novel: tuple[int, ...] | None = None,
                  part: Literal["all", "known"] = "all") -> ImageData:
    """Label the known classes' training images; leave the novel classes' unlabelled, to be discovered.

    Args:
        data: The dataset.
        seed: Not used (the split is fixed by ``novel``); accepted like every setting's.
        novel: The novel classes; default the last half (5-9 of 10).
        part: ``all``: every training image, the novel classes' unlabelled (the discovery run's data); ``known``:
            the known classes' labelled images alone (the known-class model's data).

    Returns:
        The part's training images (novel ones unlabelled), classes renumbered known first, ``novel_classes`` set.
    """
    labelled_only(data, "novel_classes")
    k = data.num_classes
    novel = check_classes(novel if novel is not None else tuple(range(k - k // 2, k)), k, "novel")
    known = tuple(c for c in range(k) if c not in novel)
    if not known:
        raise KdkitError(f"novel lists all {k} classes; discovery needs labelled known classes",
                         fix="leave at least one class out of data.setting.novel", where="data.setting.novel")
    order = known + novel
    labels = relabel(data.train_labels, known)  # the novel classes' images become UNLABELLED
    index = torch.arange(len(labels))
    if part == "known":
        keep = labels != UNLABELLED
        return with_train(data, index[keep], labels[keep], classes=order, novel=tuple(range(len(known), k)),
                          name=f"{data.name}-novel{len(novel)}-known",
                          source=f"novel classes: the known classes {list(known)} alone, labelled (the novel "
                                 f"classes {list(novel)} are renumbered {len(known)}..{k - 1} and never seen)")
    return with_train(data, index, labels, classes=order, novel=tuple(range(len(known), k)),
                      name=f"{data.name}-novel{len(novel)}",
                      source=f"novel classes: {list(known)} labelled, {list(novel)} unlabelled and to discover "
                             f"(renumbered {len(known)}..{k - 1})")
