"""Semantic segmentation: per-pixel cross-entropy, mIoU and pixel accuracy (torchmetrics), best by mIoU.

Targets are the dataset's per-image class maps (``ImageData.train_targets["semantic"]``, ``uint8 (N, S, S)``:
0 for background, ``k + 1`` where an object of class ``k`` shows), read by the batch's sample indices. The
network outputs ``K + 1`` logits per pixel at the input's resolution, ``(B, K + 1, H, W)``, channel 0 being
background: :meth:`Segmentation.outputs` makes every model of a segmentation recipe be built with ``K + 1``
outputs. ``softmax`` over the channels gives each pixel's class probabilities.

mIoU is the mean over the ``K + 1`` classes, background included (as Pascal VOC's 21-class mIoU), of
``TP / (TP + FP + FN)`` counted over every test pixel; pixel accuracy is the share of test pixels whose argmax
is their class. On a class-incremental step 2 (``ImageData.old_classes`` set) the task also reports ``miou_old``
(background and the old classes, MiB's convention) and ``miou_new`` (the classes added by this step): the means of
the same per-class IoUs over those channels.

**Augmentation.** The masks follow each training image's random crop and flip (``data.augment``): the task declares
:attr:`~kdkit.task.Task.pixel_targets`, and :meth:`BoundSegmentation.follow` moves each mask by its image's view, by
nearest neighbour (:func:`kdkit.data.augment.follow_maps`). Pixels that come from the crop's padding are void
(ignored by the loss and the training score), not background: they are no part of the scene, so "background"
would be a label the data never gave (an object cut by the image border does not end there), and it would teach
that the padding's black band is background, a shortcut no test image has. Other geometric changes (the strong
view, a method's learned augmentation) are refused.

A report draws a class map as a colour per class over the image (:func:`class_drawings`): the ground truth's, and the
deployed network's argmax over the channels; background and void pixels are left uncoloured.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.data.augment import follow_maps
from kdkit.data.base import UNLABELLED
from kdkit.data.dense import IGNORE
from kdkit.distill import labelled_cross_entropy
from kdkit.distributed import DistContext, all_reduce_sum
from kdkit.task import Drawing, Task, register_task

OLD, NEW = "miou_old", "miou_new"  # class-incremental step 2 only


def old_channels(data: Any) -> tuple[int, ...]:
    """The output channels of ``data``'s old classes, background (0) first; empty when none were learned before."""
    old = tuple(getattr(data, "old_classes", ()) or ())
    return (0, *(c + 1 for c in old)) if old else ()


def class_drawings(maps: Tensor) -> list[Drawing]:
    """One :class:`~kdkit.task.Drawing` per class map ``(B, H, W)`` (0 background, ``k + 1`` class ``k``,
    :data:`IGNORE` void): its mask is the class index ``k``, -1 on background and void pixels (drawn uncoloured)."""
    maps = maps.long()
    masks = torch.where((maps == 0) | (maps == IGNORE), torch.full_like(maps, -1), maps - 1)
    no_boxes = torch.zeros(0, 4, device=maps.device)
    return [Drawing(no_boxes, torch.zeros(0, dtype=torch.long, device=maps.device), mask=m) for m in masks]


class SegmentationEvaluator:
    """mIoU and pixel accuracy (%) from torchmetrics over every test pixel, and the mean per-pixel cross-entropy.

    Under DDP torchmetrics gathers the states of every process when it computes (``torch.distributed``); the
    cross-entropy sums are reduced with :func:`~kdkit.distributed.all_reduce_sum`.

    Args:
        num_classes: Classes including background (``K + 1``).
        device: Device of the metric states.
        ctx: Distributed context.
        old: Channels of the classes a previous step learned, background included (empty: not incremental).
    """

    def __init__(self, num_classes: int, device: torch.device, ctx: DistContext, old: tuple[int, ...] = ()) -> None:
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        self.ctx, self.old = ctx, old
        self.per_class = MulticlassJaccardIndex(num_classes=num_classes, average="none",
                                                ignore_index=UNLABELLED).to(device) if old else None
        # void pixels (targets UNLABELLED) are scored by no metric
        self.iou = MulticlassJaccardIndex(num_classes=num_classes, average="macro", ignore_index=UNLABELLED).to(device)
        self.acc = MulticlassAccuracy(num_classes=num_classes, average="micro", ignore_index=UNLABELLED).to(device)
        self.totals = torch.zeros(2, dtype=torch.float64, device=device)  # ce sum over pixels, pixels

    def update(self, logits: Tensor, targets: Tensor) -> None:
        predicted, truth = logits.argmax(1), targets.long()
        self.iou.update(predicted, truth)
        if self.per_class is not None:
            self.per_class.update(predicted, truth)
        self.acc.update(predicted, truth)
        ce = F.cross_entropy(logits.float(), truth, reduction="sum", ignore_index=UNLABELLED)
        scored = (truth != UNLABELLED).sum().double()
        self.totals += torch.stack([ce.double(), scored])

    def compute(self) -> dict[str, float]:
        ce, pixels = all_reduce_sum(self.totals, self.ctx).tolist()
        out = {"miou": 100.0 * float(self.iou.compute()), "pixel_acc": 100.0 * float(self.acc.compute()),
               "loss": ce / max(pixels, 1.0)}
        if self.per_class is not None:
            ious = self.per_class.compute().double()
            new = [c for c in range(len(ious)) if c not in self.old]
            out[OLD] = 100.0 * float(ious[list(self.old)].mean())
            out[NEW] = 100.0 * float(ious[new].mean())
        return out


def background_chance(masks: Tensor, num_classes: int) -> dict[str, float]:
    """What a model that calls every pixel background scores on ``masks`` (%).

    Pixel accuracy is the background share ``b``; background's IoU is ``b`` too (every pixel is in the union),
    every other class's is 0 (predicted nowhere), so mIoU is ``b / num_classes``.

    Args:
        masks: Class maps ``(N, H, W)``, 0 for background, :data:`~kdkit.data.dense.IGNORE` for void pixels.
        num_classes: Classes including background.
    """
    scored = masks != IGNORE  # void pixels count for no metric
    share = float((masks == 0).sum()) / float(scored.sum()) if scored.any() else 0.0
    return {"miou": 100.0 * share / num_classes, "pixel_acc": 100.0 * share}


class BoundSegmentation:
    """Semantic segmentation on one run's data: each sample's class map, gathered by index.

    Args:
        task: The registered task.
        data: The dataset (its ``semantic`` targets).
        device: Device of the batches.
        label_smoothing: Of the per-pixel cross-entropy.
    """

    def __init__(self, task: Task, data: Any, device: torch.device, label_smoothing: float) -> None:
        self.task, self.device, self.metrics = task, device, task.metrics_for(data)
        self.label_smoothing = label_smoothing
        self.old = old_channels(data)
        self.num_classes = task.outputs(data.num_classes)
        self.split_targets = {split: getattr(data, f"{split}_targets")[task.target].to(device).long()
                              for split in ("train", "test")}
        self._test_masks = data.test_targets[task.target]  # where the data lives (the device may be meta)

    def targets(self, labels: Tensor, index: Tensor, split: str) -> Tensor:
        masks = self.split_targets[split].index_select(0, index)
        # an unlabelled sample's pixels are ignored by the loss and the training score, like its label; so are the
        # void pixels of a dataset (IGNORE: VOC's object borders, COCO's crowd regions), pixel by pixel
        return masks.masked_fill((labels == UNLABELLED).view(-1, 1, 1) | (masks == IGNORE), UNLABELLED)

    def follow(self, targets: Tensor, view: Tensor) -> Tensor:
        # padding is void: no truth is known there (module docstring)
        return follow_maps(targets, view, UNLABELLED)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return labelled_cross_entropy(logits, targets, self.label_smoothing)

    def train_score(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        # each labelled sample's pixel accuracy over its scored (non-void) pixels, summed over the batch
        scored = (targets != UNLABELLED).flatten(1)
        right = ((logits.detach().argmax(1) == targets).flatten(1) & scored).sum(1)
        pixels = scored.sum(1)
        labelled = pixels > 0
        return (right / pixels.clamp_min(1)).sum(), labelled.sum().float()

    def evaluator(self, ctx: DistContext) -> SegmentationEvaluator:
        return SegmentationEvaluator(self.num_classes, self.device, ctx, self.old)

    def chance(self) -> dict[str, float]:
        return background_chance(self._test_masks, self.num_classes)


@register_task
class Segmentation(Task):
    """Semantic segmentation: per-pixel cross-entropy, mIoU and pixel accuracy (torchmetrics, %), best by mIoU."""

    name = "segmentation"
    target = "semantic"
    metrics = ("miou", "pixel_acc", "loss", OLD, NEW)
    best = "miou"
    loss_name = "ce"
    train_metric = "pixel_acc"
    deployed_output = ("per-pixel logits (B, K + 1, H, W), channel 0 background; softmax over the channels gives "
                       "each pixel's class probabilities")
    probabilities = "softmax"
    pixel_targets = True
    logits_layout = "pixels"
    drawn = "each pixel's predicted class (argmax over the channels; background uncoloured)"

    def metrics_for(self, data: Any) -> tuple[str, ...]:
        if data is None or not old_channels(data):  # old / new are defined on an incremental step 2 only
            return tuple(m for m in self.metrics if m not in (OLD, NEW))
        return self.metrics

    def outputs(self, num_classes: int) -> int:
        """Background plus the ``num_classes`` object classes."""
        return num_classes + 1

    def check_data(self, data: Any) -> str | None:
        problem = super().check_data(data)
        if problem is not None:
            return problem
        masks = data.train_targets[self.target]
        if masks.shape[1:] != data.train_images.shape[2:]:
            return (f"needs {self.target!r} targets of the images' size (N, {data.train_images.shape[2]}, "
                    f"{data.train_images.shape[3]}), got {tuple(masks.shape)}")
        return None

    def drawn_targets(self, targets: dict[str, Tensor]) -> list[Drawing]:
        """Each image's class map (:func:`class_drawings`)."""
        return class_drawings(targets[self.target])

    def drawn_outputs(self, outputs: Tensor, model: nn.Module, image_size: int) -> list[Drawing]:
        """Each pixel's argmax class (:func:`class_drawings`)."""
        return class_drawings(outputs.argmax(1))

    def bind(self, data: Any, device: torch.device, *, label_smoothing: float = 0.0,
             model: nn.Module | None = None) -> BoundSegmentation:
        return BoundSegmentation(self, data, device, label_smoothing)
