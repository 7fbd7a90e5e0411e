"""``class_incremental``: class-incremental semantic segmentation in two steps, with the background shift.

The standard continual-segmentation protocol (Cermelli et al., MiB, CVPR 2020; "overlapped"): step 1 learns
classes ``0..base-1``, step 2 adds ``base..K-1``, starting from step 1's model (its frozen copy is the *old model*,
the recipe's ``teacher:`` with ``classes: base``). Class ``k`` keeps mask value ``k + 1`` at both steps, so the
step-2 network is step 1's with more outputs (``model.init: teacher`` grows its classifier).

* Step 1: the training scenes showing at least one step-1 class; every other class's pixels are background (0).
  The test scenes showing a step-1 class, future classes background; ``base`` classes.
* Step 2: the training scenes showing at least one new class, whose masks label the new classes only: an old
  class's pixels are background (the *background shift*). Every test scene with every class (``K`` classes);
  ``old_classes`` = ``0..base-1``, so the segmentation task also reports ``miou_old`` (background + old classes,
  MiB's convention) and ``miou_new``.

A scene's image-level label (unused by segmentation) is the smallest class of the step that it shows. Segmentation
only: the masks (``semantic`` targets) are what the setting rewrites.
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

TARGET = "semantic"


def _old_model(params: Mapping[str, Any]) -> int | None:
    """Step 2 continues step 1's model of ``base`` classes."""
    return int(params.get("base", 5)) if params.get("step") == 2 else None


def step_masks(masks: Tensor, first: int, last: int) -> Tensor:
    """``masks`` (0 background, ``k + 1`` class ``k``) with every class outside ``[first, last)`` made background."""
    shown = (masks >= first + 1) & (masks <= last)
    return torch.where(shown, masks, torch.zeros_like(masks))


def _showing(masks: Tensor, first: int, last: int) -> tuple[Tensor, Tensor]:
    """Indices of the scenes showing a class in ``[first, last)``, and each one's smallest such class."""
    flat = masks.flatten(1).long() - 1
    inside = (flat >= first) & (flat < last)
    keep = inside.any(1).nonzero().flatten()
    smallest = torch.where(inside, flat, torch.full_like(flat, last)).min(1).values
    return keep, smallest[keep]


@register_setting("class_incremental", tasks=("segmentation",), old_model=_old_model,
                  help="class-incremental segmentation: step 1 classes 0..base-1, step 2 the rest with old classes "
                       "labelled background (metrics miou_old / miou_new)")
def class_incremental(data: ImageData, *, seed: int, step: Literal[1, 2], base: int = 5) -> ImageData:
    """One step of the two-step class-incremental protocol.

    Args:
        data: A segmentation dataset (``semantic`` masks, 0 background, ``k + 1`` for class ``k``).
        seed: Not used (no random choice); accepted like every setting's.
        step: 1 (classes ``0..base-1``) or 2 (classes ``base..K-1`` added; old ones labelled background).
        base: Classes of step 1, in ``1..K-1`` (default 5: 5 + 5 on Fashion-MNIST scenes).

    Returns:
        The step's training scenes and masks; at step 1 ``base`` classes, at step 2 every class with
        ``old_classes = 0..base-1``.

    Raises:
        KdkitError: A dataset without masks, or ``base`` outside ``1..K-1``.
    """
    labelled_only(data, "class_incremental")
    k = data.num_classes
    if TARGET not in data.train_targets:
        raise KdkitError(f"setting 'class_incremental' rewrites {TARGET!r} masks, which {data.name!r} does not have",
                         fix="use a segmentation dataset (e.g. fashion_mnist_scenes) with task: segmentation",
                         where="data.setting")
    if not 1 <= base <= k - 1:
        raise KdkitError(f"base {base} must leave classes for both steps: 1..{k - 1} on {k} classes",
                         bad=str(base), choices=[str(c) for c in sorted(range(1, k), key=lambda c: abs(c - base))],
                         fix=f"set data.setting.base in 1..{k - 1}", where="data.setting.base")
    first, last = (0, base) if step == 1 else (base, k)
    train_masks = data.train_targets[TARGET]
    index, labels = _showing(train_masks, first, last)
    masks = step_masks(train_masks[index], first, last)
    test_masks, test_images, test_labels = data.test_targets[TARGET], data.test_images, data.test_labels
    test_keep = None
    if step == 1:  # evaluated on the scenes showing a step-1 class, the future classes background
        test_keep, test_labels = _showing(test_masks, 0, base)
        test_images, test_masks = test_images[test_keep], step_masks(test_masks[test_keep], 0, base)
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
               + (f"classes 0..{base - 1}, later classes background" if step == 1 else
                  f"new classes {base}..{k - 1} labelled, old classes 0..{base - 1} labelled background"),
        train_targets={TARGET: masks.contiguous()},
        test_targets={TARGET: test_masks.contiguous() if test_keep is not None else test_masks},
        old_classes=tuple(range(old)),
        warnings=data.warnings,
    )
