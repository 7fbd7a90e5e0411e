"""``class_incremental``: class-incremental segmentation and detection in two steps, with the background shift.

The standard two-step protocols: continual segmentation (Cermelli et al., MiB, CVPR 2020; "overlapped") and
incremental object detection (Shmelkov et al., "Incremental Learning of Object Detectors without Catastrophic
Forgetting", ICCV 2017; the "10 + 10" VOC protocol of IOD papers). Step 1 learns classes ``0..base-1``, step 2
adds ``base..K-1``, starting from step 1's model (its frozen copy is the *old model*, the recipe's ``teacher:`` with
``classes: base``). Class ``k`` keeps its index at both steps (mask value ``k + 1``, box label ``k``), so the
step-2 network is step 1's with more outputs (``model.init: teacher`` grows its classifier).

* Step 1: the training scenes showing at least one step-1 class; every other class is unlabelled (its pixels
  background, its boxes dropped). The test scenes showing a step-1 class, future classes unlabelled; ``base``
  classes.
* Step 2: the training scenes showing at least one new class, labelling the new classes only: an old class's
  pixels are background and its boxes are dropped, so its objects are background to the detector's loss (the
  *background shift*; IOD's "old-class objects in new images are unannotated"). Every test scene with every class
  (``K`` classes); ``old_classes`` = ``0..base-1``, so the segmentation task also reports ``miou_old``
  (background + old classes, MiB's convention) and ``miou_new``, and the detection task ``map_old`` and
  ``map_new`` (the mean AP over the old and the new classes).

The setting rewrites every target of the two tasks that the dataset carries, the same way: ``semantic`` masks and
``boxes`` / ``box_labels`` (kept boxes first, dropped ones become padding: label -1, coordinates 0); other targets
are not carried over. A scene *shows* a class when its mask has a pixel of it or a box of it (on the Fashion-MNIST
scenes both agree: every listed object keeps half of its pixels visible). A scene's image-level label (unused by
both tasks) is the smallest class of the step that it shows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from kdkit.data.base import ImageData
from kdkit.data.settings.common import labelled_only
from kdkit.data.settings.registry import register_setting
from kdkit.errors import KdkitError

MASKS, BOXES, BOX_LABELS = "semantic", "boxes", "box_labels"


def _old_model(params: Mapping[str, Any]) -> int | None:
    """Step 2 continues step 1's model of ``base`` classes."""
    return int(params.get("base", 5)) if params.get("step") == 2 else None


def step_masks(masks: Tensor, first: int, last: int) -> Tensor:
    """``masks`` (0 background, ``k + 1`` class ``k``) with every class outside ``[first, last)`` made background."""
    shown = (masks >= first + 1) & (masks <= last)
    return torch.where(shown, masks, torch.zeros_like(masks))


def step_boxes(boxes: Tensor, labels: Tensor, first: int, last: int) -> tuple[Tensor, Tensor]:
    """``boxes`` ``(N, M, 4)`` and ``labels`` ``(N, M)`` (-1 padding) keeping the boxes of classes in
    ``[first, last)``: kept boxes first in their order, the others padding (label -1, coordinates 0)."""
    kept = (labels >= first) & (labels < last)
    order = torch.sort((~kept).to(torch.uint8), dim=1, stable=True).indices  # kept rows first, order unchanged
    kept = kept.gather(1, order)
    labels = torch.where(kept, labels.gather(1, order), torch.full_like(labels, -1))
    boxes = torch.where(kept.unsqueeze(-1), boxes.gather(1, order.unsqueeze(-1).expand_as(boxes)),
                        torch.zeros_like(boxes))
    return boxes, labels


def shown_classes(targets: Mapping[str, Tensor], classes: int) -> Tensor:
    """``(N, classes)`` bool: which classes each scene shows, by a mask pixel or a box of the class."""
    shown = None
    if MASKS in targets:
        values = targets[MASKS].flatten(1).long()
        shown = torch.stack([(values == k + 1).any(1) for k in range(classes)], dim=1)
    if BOX_LABELS in targets:
        labels = targets[BOX_LABELS]
        boxed = torch.stack([(labels == k).any(1) for k in range(classes)], dim=1)
        shown = boxed if shown is None else shown | boxed
    assert shown is not None, "class_incremental checks that the dataset has masks or boxes"
    return shown


def _showing(targets: Mapping[str, Tensor], classes: int, first: int, last: int) -> tuple[Tensor, Tensor]:
    """Indices of the scenes showing a class in ``[first, last)``, and each one's smallest such class."""
    inside = shown_classes(targets, classes)[:, first:last]
    keep = inside.any(1).nonzero().flatten()
    return keep, inside[keep].to(torch.uint8).argmax(1) + first  # argmax takes the first of the maxima


def step_targets(targets: Mapping[str, Tensor], index: Tensor | None, first: int, last: int) -> dict[str, Tensor]:
    """The masks and boxes of ``targets`` (those it has) of the scenes ``index`` (``None``: all), labelling the
    classes in ``[first, last)`` only."""
    if index is None:
        index = torch.arange(len(next(iter(targets.values()))))
    out = {}
    if MASKS in targets:
        out[MASKS] = step_masks(targets[MASKS][index], first, last).contiguous()
    if BOX_LABELS in targets:
        boxes, labels = step_boxes(targets[BOXES][index], targets[BOX_LABELS][index], first, last)
        out[BOXES], out[BOX_LABELS] = boxes.contiguous(), labels.contiguous()
    return out


@register_setting("class_incremental", tasks=("segmentation", "detection"), old_model=_old_model,
                  help="class-incremental segmentation or detection: step 1 classes 0..base-1, step 2 the rest with "
                       "old classes unlabelled (background; metrics miou_old / miou_new, map_old / map_new)")
def class_incremental(data: ImageData, *, seed: int, step: Literal[1, 2], base: int = 5) -> ImageData:
    """One step of the two-step class-incremental protocol (segmentation masks and detection boxes).

    Args:
        data: A dataset with ``semantic`` masks (0 background, ``k + 1`` for class ``k``) or ``boxes`` and
            ``box_labels`` (class ``k``, -1 padding), or both.
        seed: Not used (no random choice); accepted like every setting's.
        step: 1 (classes ``0..base-1``) or 2 (classes ``base..K-1`` added; old ones unlabelled).
        base: Classes of step 1, in ``1..K-1`` (default 5: 5 + 5 on Fashion-MNIST scenes).

    Returns:
        The step's training scenes and targets; at step 1 ``base`` classes, at step 2 every class with
        ``old_classes = 0..base-1``.

    Raises:
        KdkitError: A dataset without masks or boxes, or ``base`` outside ``1..K-1``.
    """
    labelled_only(data, "class_incremental")
    k = data.num_classes
    if MASKS not in data.train_targets and BOX_LABELS not in data.train_targets:
        raise KdkitError(f"setting 'class_incremental' rewrites {MASKS!r} masks or {BOXES!r} with {BOX_LABELS!r}, "
                         f"which {data.name!r} does not have",
                         fix="use a segmentation or detection dataset (e.g. fashion_mnist_scenes) with task: "
                             "segmentation or detection", where="data.setting")
    if not 1 <= base <= k - 1:
        raise KdkitError(f"base {base} must leave classes for both steps: 1..{k - 1} on {k} classes",
                         bad=str(base), choices=[str(c) for c in sorted(range(1, k), key=lambda c: abs(c - base))],
                         fix=f"set data.setting.base in 1..{k - 1}", where="data.setting.base")
    first, last = (0, base) if step == 1 else (base, k)
    index, labels = _showing(data.train_targets, k, first, last)
    test_images, test_labels = data.test_images, data.test_labels
    if step == 1:  # evaluated on the scenes showing a step-1 class, the future classes unlabelled
        test_keep, test_labels = _showing(data.test_targets, k, 0, base)
        test_images, test_targets = test_images[test_keep], step_targets(data.test_targets, test_keep, 0, base)
    else:  # every test scene with every class
        test_targets = step_targets(data.test_targets, None, 0, k)
    old = base if step == 2 else 0
    return ImageData(
        name=f"{data.name}-inc{base}-step{step}",
        train_images=data.train_images[index].contiguous(),
        train_labels=labels.contiguous(),
        test_images=test_images.contiguous(),
        test_labels=test_labels.contiguous(),
        classes=data.classes[:base] if step == 1 else data.classes,
        mean=data.mean, std=data.std,
        source=f"{data.source}; class-incremental step {step} of 2: "
               + (f"classes 0..{base - 1}, later classes unlabelled" if step == 1 else
                  f"new classes {base}..{k - 1} labelled, old classes 0..{base - 1} unlabelled (background)"),
        train_targets=step_targets(data.train_targets, index, first, last),
        test_targets=test_targets,
        old_classes=tuple(range(old)),
        warnings=data.warnings,
    )
