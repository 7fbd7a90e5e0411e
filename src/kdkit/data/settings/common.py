"""What the settings share: a new training split from chosen images, class relabelling, class-index checks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kdkit.data.base import UNLABELLED, ImageData
from kdkit.errors import KdkitError


def check_classes(classes: Sequence[int], num_classes: int, param: str, *, at_least: int = 1) -> tuple[int, ...]:
    """``classes`` as a tuple, checked: distinct indices in ``[0, num_classes)``, at least ``at_least`` of them.

    Raises:
        KdkitError: Naming ``data.setting.<param>``, the valid indices and the fix.
    """
    chosen = tuple(int(c) for c in classes)
    where = f"data.setting.{param}"
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad:
        raise KdkitError(f"class index {bad[0]} is out of range: the dataset has {num_classes} classes",
                         choices=[str(i) for i in range(num_classes)], bad=str(bad[0]),
                         fix=f"list class indices in [0, {num_classes})", where=where)
    if len(set(chosen)) != len(chosen):
        raise KdkitError(f"{param} {list(chosen)} repeats a class", fix="list each class once", where=where)
    if len(chosen) < at_least:
        raise KdkitError(f"{param} {list(chosen)} has {len(chosen)} classes, fewer than {at_least}",
                         fix=f"list at least {at_least} classes", where=where)
    return chosen


def relabel(labels: Tensor, order: Sequence[int]) -> Tensor:
    """Class ``order[i]`` becomes label ``i``; every other class becomes :data:`UNLABELLED`."""
    out = torch.full_like(labels, UNLABELLED)
    for new, old in enumerate(order):
        out[labels == old] = new
    return out


def of_classes(labels: Tensor, classes: Sequence[int]) -> Tensor:
    """Indices (ascending) of the samples whose label is one of ``classes``."""
    return torch.isin(labels, torch.as_tensor(list(classes), dtype=labels.dtype)).nonzero().flatten()


def with_train(data: ImageData, index: Tensor, labels: Tensor, *, name: str, source: str,
               images: Tensor | None = None, classes: Sequence[int] | None = None,
               novel: tuple[int, ...] = (), mean: tuple[float, ...] | None = None,
               std: tuple[float, ...] | None = None, test_images: Tensor | None = None) -> ImageData:
    """A dataset whose training split is ``data``'s images at ``index`` with new ``labels``.

    Args:
        data: The dataset the setting draws from.
        index: Training images kept (their dense targets follow them).
        labels: Their labels in the new class numbering (:data:`UNLABELLED` for unlabelled ones).
        name: The new dataset's name.
        source: Appended to ``data.source`` after ``"; "``.
        images: Replacement images for the kept ones (a shifted pool, a second modality); default ``data``'s.
        classes: The old class indices that make the new classes, in their new order (the test split is restricted
            to them and relabelled); default: every class, unchanged.
        novel: New class indices to discover (:attr:`ImageData.novel_classes`).
        mean: Per-channel mean of the new images (default ``data``'s).
        std: Per-channel std (default ``data``'s).
        test_images: Replacement test images (same order as ``data``'s), e.g. with a derived channel.
    """
    test_images = data.test_images if test_images is None else test_images
    test_labels, test_targets = data.test_labels, data.test_targets
    names = data.classes
    if classes is not None:
        keep = of_classes(data.test_labels, classes)
        test_images, test_labels = test_images[keep], relabel(data.test_labels[keep], classes)
        test_targets = {key: value[keep] for key, value in data.test_targets.items()}
        names = tuple(data.classes[c] for c in classes)
    return ImageData(
        name=name,
        train_images=(data.train_images[index] if images is None else images).contiguous(),
        train_labels=labels.contiguous(),
        test_images=test_images.contiguous(),
        test_labels=test_labels.contiguous(),
        classes=names,
        mean=data.mean if mean is None else mean,
        std=data.std if std is None else std,
        source=f"{data.source}; {source}",
        train_targets={key: value[index].contiguous() for key, value in data.train_targets.items()},
        test_targets=test_targets,
        novel_classes=novel,
        warnings=data.warnings,
    )


def labelled_only(data: ImageData, setting: str) -> None:
    """Refuse a dataset with unlabelled training samples (a setting draws labelled ones from it)."""
    if data.num_labelled < len(data.train_labels):
        raise KdkitError(f"setting {setting!r} needs every training label, but {data.name!r} has "
                         f"{len(data.train_labels) - data.num_labelled} unlabelled training samples",
                         fix="apply the setting to a labelled dataset (one setting per recipe)", where="data.setting")


def uniform_choice(candidates: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` of ``candidates`` drawn uniformly without replacement, ascending."""
    return candidates[torch.randperm(len(candidates), generator=generator)[:n]].sort().values
