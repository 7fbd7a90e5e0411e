"""Multi-task dense prediction: semantic segmentation and object boundaries from one output tensor.

The networks output ``K + 2`` channels per pixel, ``(B, K + 2, H, W)``: channels ``0..K`` are the segmentation
logits (0 background, as :mod:`kdkit.tasks.segmentation`), the last channel is the boundary logit (``sigmoid`` gives
the probability that the pixel lies on an object boundary). :meth:`SegBoundary.outputs` makes every model of such a
recipe be built with ``K + 2`` outputs; the layout is :data:`kdkit.task.LOGITS_LAYOUTS` ``"pixels_boundary"``.

**Boundary targets** are derived exactly from the dataset's instance masks (``instances``: 0 background, ``j + 1``
where object ``j`` shows): a pixel is a boundary pixel when one of its 4-neighbours inside the image has another
instance id. Both sides of every edge are marked (an object's outermost ring and the background ring around it; where
two objects touch, both of their edge pixels), so boundaries are 2 pixels thick; the image border is no edge.

**Supervised loss**: per-pixel cross-entropy on the segmentation channels plus a class-balanced binary
cross-entropy on the boundary channel (weight 1). The balance is per image, by inverse frequency with mean weight 1:
a boundary pixel weighs ``0.5 / rho`` and another pixel ``0.5 / (1 - rho)``, ``rho`` being the image's share of
boundary pixels (boundaries are ~10-20 % of a scene's pixels; unweighted, the channel learns "never a boundary").

**Metrics**: mIoU (best) and pixel accuracy of the segmentation channels (as the segmentation task), and the boundary
F-score ``bf`` (%) at the fixed threshold 0.5 (logit > 0) with a 1-pixel tolerance: a predicted boundary pixel is
right when a true one lies within Chebyshev distance 1 (its 3x3 neighbourhood), a true one is found when a predicted
one lies within distance 1; precision and recall count every test pixel of the split, F = 2PR / (P + R). ``loss``
is the mean supervised loss per image.

Targets are one ``(B, 2, H, W)`` long tensor: plane 0 the class map, plane 1 the boundary map (0/1), both
:data:`~kdkit.data.base.UNLABELLED` for an unlabelled sample (and plane 0 for void pixels).

**Augmentation.** Both planes follow each training image's random crop and flip (``data.augment``,
:func:`kdkit.data.augment.follow_maps`); the pixels that come from the crop's padding are
:data:`~kdkit.data.base.UNLABELLED` in both planes (void, as the segmentation task's padding), so the balanced BCE
skips them pixel by pixel. A flip commutes with the boundary derivation; a crop keeps every boundary pixel of the
original image, and its border, next to the void padding, stays "no edge" as the image border was.
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
from kdkit.tasks.segmentation import class_drawings

#: Threshold of the boundary probability for the boundary F-score.
BOUNDARY_THRESHOLD = 0.5
#: Tolerance (pixels, Chebyshev distance) of the boundary F-score's matching.
BOUNDARY_TOLERANCE = 1


def boundary_map(instances: Tensor) -> Tensor:
    """The boundary map of instance masks: 1 where a 4-neighbour inside the image has another id, else 0.

    Args:
        instances: Instance ids ``(N, H, W)`` (any integer dtype; 0 background).

    Returns:
        ``uint8 (N, H, W)`` of 0/1.
    """
    ids = instances.long()
    edge = torch.zeros_like(ids, dtype=torch.bool)
    vertical = ids[:, 1:, :] != ids[:, :-1, :]  # between rows i and i + 1
    horizontal = ids[:, :, 1:] != ids[:, :, :-1]
    edge[:, 1:, :] |= vertical
    edge[:, :-1, :] |= vertical
    edge[:, :, 1:] |= horizontal
    edge[:, :, :-1] |= horizontal
    return edge.to(torch.uint8)


def near(mask: Tensor, tolerance: int) -> Tensor:
    """Pixels within Chebyshev distance ``tolerance`` of a pixel of ``mask`` ``(N, H, W)`` (a max-pool dilation)."""
    size = 2 * tolerance + 1
    return F.max_pool2d(mask.float().unsqueeze(1), size, stride=1, padding=tolerance).squeeze(1) > 0


def balanced_bce(logit: Tensor, boundary: Tensor) -> Tensor:
    """Class-balanced binary cross-entropy of the boundary channel, averaged over the labelled images' scored pixels.

    Args:
        logit: Boundary logits ``(B, H, W)``.
        boundary: 0/1 targets ``(B, H, W)``, :data:`UNLABELLED` on the pixels that are not scored: an unlabelled
            image's, and the padding of a random crop. ``rho`` and the mean are over each image's scored pixels.

    Returns:
        Scalar in the logits' precision (never below float32); 0, zero gradient, for a batch without a labelled image.
    """
    scored = boundary != UNLABELLED
    pixels = scored.flatten(1).sum(1)
    labelled = pixels > 0
    target = boundary.clamp_min(0).to(logit.dtype)
    rho = (target.flatten(1).sum(1) / pixels.clamp_min(1)).clamp(1e-6, 1 - 1e-6).view(-1, 1, 1)
    weight = torch.where(target > 0, 0.5 / rho, 0.5 / (1 - rho)) * scored
    per_pixel = F.binary_cross_entropy_with_logits(logit, target, weight=weight, reduction="none")
    per_image = per_pixel.flatten(1).sum(1) / pixels.clamp_min(1)
    count = labelled.sum()
    return torch.where(count > 0, (per_image * labelled).sum() / count.clamp_min(1), per_image.new_zeros(()))


class SegBoundaryEvaluator:
    """mIoU and pixel accuracy (torchmetrics), boundary F-score and the mean supervised loss, over every test pixel.

    Args:
        num_classes: Segmentation classes including background (``K + 1``).
        device: Device of the metric states.
        ctx: Distributed context.
    """

    def __init__(self, num_classes: int, device: torch.device, ctx: DistContext) -> None:
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        self.ctx, self.num_classes = ctx, num_classes
        self.iou = MulticlassJaccardIndex(num_classes=num_classes, average="macro", ignore_index=UNLABELLED).to(device)
        self.acc = MulticlassAccuracy(num_classes=num_classes, average="micro", ignore_index=UNLABELLED).to(device)
        # predicted, predicted near truth, true, true near prediction, loss sum, images
        self.totals = torch.zeros(6, dtype=torch.float64, device=device)

    def update(self, logits: Tensor, targets: Tensor) -> None:
        seg, truth = logits[:, : self.num_classes], targets[:, 0]
        self.iou.update(seg.argmax(1), truth)
        self.acc.update(seg.argmax(1), truth)
        predicted = logits[:, -1] > 0  # sigmoid > BOUNDARY_THRESHOLD
        true = targets[:, 1] == 1
        loss = labelled_cross_entropy(seg.float(), truth) + balanced_bce(logits[:, -1].float(), targets[:, 1])
        self.totals += torch.stack([
            predicted.sum().double(), (predicted & near(true, BOUNDARY_TOLERANCE)).sum().double(),
            true.sum().double(), (true & near(predicted, BOUNDARY_TOLERANCE)).sum().double(),
            loss.double() * len(logits), torch.tensor(float(len(logits)), dtype=torch.float64, device=logits.device)])

    def compute(self) -> dict[str, float]:
        predicted, right, true, found, loss, images = all_reduce_sum(self.totals, self.ctx).tolist()
        precision = right / predicted if predicted else 0.0
        recall = found / true if true else 0.0
        bf = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"miou": 100.0 * float(self.iou.compute()), "pixel_acc": 100.0 * float(self.acc.compute()),
                "bf": 100.0 * bf, "loss": loss / max(images, 1.0)}


class BoundSegBoundary:
    """The multi-task dense task on one run's data: each sample's class map and boundary map, gathered by index.

    Args:
        task: The registered task.
        data: The dataset (its ``semantic`` and ``instances`` targets).
        device: Device of the batches.
        label_smoothing: Of the segmentation cross-entropy.
    """

    def __init__(self, task: Task, data: Any, device: torch.device, label_smoothing: float) -> None:
        self.task, self.device, self.metrics = task, device, task.metrics_for(data)
        self.label_smoothing = label_smoothing
        self.num_classes = data.num_classes + 1
        self.split_targets = {}
        for split in ("train", "test"):
            targets = getattr(data, f"{split}_targets")
            planes = torch.stack([targets["semantic"].long(), boundary_map(targets["instances"]).long()], 1)
            self.split_targets[split] = planes.to(device)

    def targets(self, labels: Tensor, index: Tensor, split: str) -> Tensor:
        planes = self.split_targets[split].index_select(0, index)
        unlabelled = (labels == UNLABELLED).view(-1, 1, 1, 1)
        void = torch.stack([planes[:, 0] == IGNORE, torch.zeros_like(planes[:, 1], dtype=torch.bool)], 1)
        return planes.masked_fill(unlabelled | void, UNLABELLED)

    def follow(self, targets: Tensor, view: Tensor) -> Tensor:
        # padding is void in both planes (module docstring)
        return follow_maps(targets, view, UNLABELLED)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        seg = labelled_cross_entropy(logits[:, : self.num_classes], targets[:, 0], self.label_smoothing)
        return seg + balanced_bce(logits[:, -1], targets[:, 1])

    def train_score(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        # each labelled sample's segmentation pixel accuracy over its scored pixels, summed over the batch
        truth = targets[:, 0]
        scored = (truth != UNLABELLED).flatten(1)
        right = ((logits.detach()[:, : self.num_classes].argmax(1) == truth).flatten(1) & scored).sum(1)
        pixels = scored.sum(1)
        return (right / pixels.clamp_min(1)).sum(), (pixels > 0).sum().float()

    def evaluator(self, ctx: DistContext) -> SegBoundaryEvaluator:
        return SegBoundaryEvaluator(self.num_classes, self.device, ctx)

    def chance(self) -> dict[str, float]:
        return {}


@register_task
class SegBoundary(Task):
    """Segmentation + object boundaries from one (B, K + 2, H, W) output: CE + balanced BCE, mIoU and boundary F."""

    name = "seg_boundary"
    target = "instances"
    metrics = ("miou", "pixel_acc", "bf", "loss")
    best = "miou"
    loss_name = "ce_bce"
    train_metric = "pixel_acc"
    deployed_output = ("per-pixel logits (B, K + 2, H, W): channels 0..K the classes (softmax over them, 0 "
                       "background), the last the boundary logit (sigmoid)")
    probabilities = ""
    pixel_targets = True
    logits_layout = "pixels_boundary"
    drawn = ("each pixel's predicted class (argmax over the class channels; background uncoloured); the boundary "
             "channel is not drawn")

    def outputs(self, num_classes: int) -> int:
        """Background, the ``num_classes`` object classes and the boundary channel."""
        return num_classes + 2

    def check_data(self, data: Any) -> str | None:
        for key in ("semantic", "instances"):
            if key not in data.train_targets:
                have = ", ".join(sorted(data.train_targets)) or "none"
                return (f"needs per-sample 'semantic' and 'instances' targets, which dataset {data.name!r} does not "
                        f"provide (it has: {have})")
            if data.train_targets[key].shape[1:] != data.train_images.shape[2:]:
                return (f"needs {key!r} targets of the images' size (N, {data.train_images.shape[2]}, "
                        f"{data.train_images.shape[3]}), got {tuple(data.train_targets[key].shape)}")
        return None

    def drawn_targets(self, targets: dict[str, Tensor]) -> list[Drawing]:
        """Each image's class map (``semantic``, as the segmentation task draws it)."""
        return class_drawings(targets["semantic"])

    def drawn_outputs(self, outputs: Tensor, model: nn.Module, image_size: int) -> list[Drawing]:
        """Each pixel's argmax over the class channels (all but the last, the boundary)."""
        return class_drawings(outputs[:, :-1].argmax(1))

    def bind(self, data: Any, device: torch.device, *, label_smoothing: float = 0.0,
             model: nn.Module | None = None) -> BoundSegBoundary:
        return BoundSegBoundary(self, data, device, label_smoothing)
