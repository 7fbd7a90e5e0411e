"""Object detection: FCOS's (or RetinaNet's) loss on a dense detector's one-tensor output, COCO mAP by torchmetrics,
best by mAP.

Targets: each image's padded boxes and labels, gathered by the batch's sample indices from
``ImageData.train_targets["boxes"]`` ``(N, M, 4)`` (pixels, ``x0, y0, x1, y1``) and ``["box_labels"]``
``(N, M)`` (-1 for padding), as one tensor ``(B, M, 5)``: the boxes divided by the image size (so losses that
place boxes on a feature map need no image size) and the label (-1 for padding). See :func:`pack_targets`.

The deployed network outputs ``(B, L, C)`` dense predictions laid out as its ``dense_spec`` says
(:class:`kdkit.models.detector.DenseSpec`); the task reads that spec from the model it is bound with, so the
engine stays ignorant of strides and locations. An anchor-based detector (``tv_retinanet``) declares an
:class:`kdkit.models.retinanet.AnchorSpec` instead: its ``(B, L * A, K + 4)`` outputs are matched, trained and decoded
by RetinaNet's rules (:mod:`kdkit.tasks.anchors`); a two-stage detector (``tv_faster_rcnn``) a
:class:`kdkit.models.faster_rcnn.TwoStageSpec`, trained and decoded by Faster R-CNN's (:mod:`kdkit.tasks.two_stage`);
everything below is the anchor-free (FCOS) layout's. The supervised loss is logged as ``det`` for all three.

Loss (Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection", ICCV 2019, as torchvision's
``FCOS.compute_loss``): a location is positive for the smallest-area box that contains it, whose centre is within
``1.5`` strides of it (center sampling) and whose largest regression distance lies in the level's size range;
sigmoid focal loss (alpha 0.25, gamma 2) over every location and class, GIoU loss on the decoded boxes of the
positives and BCE of the centerness at the positives, each summed and divided by the number of positives. A
distribution box head (``box_bins > 0``) adds General Focal Loss's distribution focal loss (weight 0.25, Li et al.,
NeurIPS 2020).

On a class-incremental step 2 (``ImageData.old_classes`` set, ``class_incremental`` with ``step: 2``) the task also
reports ``map_old`` and ``map_new``: the mean of COCO's per-class AP (torchmetrics' ``class_metrics``) over the old
classes and over the classes added by the step, each over the classes with a test box (as ``map`` averages).

Augmentation: the boxes follow each training image's random crop and flip (``data.augment``,
:func:`kdkit.data.augment.follow_boxes`): translated by the crop, clipped to the image, dropped when less than
:data:`~kdkit.data.augment.MIN_BOX_VISIBLE` of their area (or none) is left, ``x0, x1`` mirrored by the flip; the
dropped rows become padding (boxes 0, label -1) after the kept ones, as the datasets pad.

Decoding (torchvision's ``FCOS.postprocess_detections``): score ``sqrt(sigmoid(class) * sigmoid(centerness))``
above 0.05, the best 1000 per level, boxes clipped to the image, per-class NMS at IoU 0.6, at most 100 per image.
A report draws the decoded detections scoring at least :data:`DRAWN_SCORE` (0.3, MMDetection's display default: the
0.05 of the mAP, which scores a ranked list, would bury each image in low-confidence boxes), at most the
:data:`DRAWN_PER_IMAGE` highest-scoring ones (a barely trained detector has dozens near 0.3, which no one can read).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.data.augment import follow_boxes
from kdkit.distributed import DistContext, all_reduce_sum
from kdkit.errors import KdkitError
from kdkit.models.detector import DenseSpec
from kdkit.models.faster_rcnn import TwoStageSpec
from kdkit.models.retinanet import AnchorSpec
from kdkit.task import Drawing, Task, register_task
from kdkit.tasks import anchors, two_stage

CENTER_SAMPLING_RADIUS = 1.5
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
DFL_WEIGHT = 0.25
SCORE_THRESH, NMS_THRESH, TOPK_PER_LEVEL, DETECTIONS_PER_IMAGE = 0.05, 0.6, 1000, 100
#: The lowest score of a detection a report draws, and how many it draws per image at most (the highest-scoring).
DRAWN_SCORE, DRAWN_PER_IMAGE = 0.3, 10
#: The COCO area ranges (pixels², as pycocotools): a size metric is reported only when the test split has a box
#: in its range (mAP over no boxes is undefined; torchmetrics gives -1).
OLD, NEW = "map_old", "map_new"  # class-incremental step 2 only
#: A detector's output layout: anchor-free (FCOS), anchor-based (RetinaNet) or two-stage (Faster R-CNN).
Layout = DenseSpec | AnchorSpec | TwoStageSpec
AREA_RANGES = {"map_small": (0.0, 32.0**2), "map_medium": (32.0**2, 96.0**2), "map_large": (96.0**2, math.inf)}


def pack_targets(boxes: Tensor, labels: Tensor, image_size: int) -> Tensor:
    """``(N, M, 5)`` float32 targets: pixel boxes ``(N, M, 4)`` over ``image_size``, then the labels ``(N, M)``."""
    return torch.cat([boxes.float() / image_size, labels.float().unsqueeze(-1)], dim=-1)


def unpack_targets(targets: Tensor, image_size: int) -> tuple[Tensor, Tensor]:
    """Pixel boxes ``(B, M, 4)`` and int64 labels ``(B, M)`` (-1 padding) of packed targets."""
    return targets[..., :4] * image_size, targets[..., 4].round().long()


def assign(locations: Tensor, boxes: Tensor, labels: Tensor) -> Tensor:
    """Index of the box each location regresses, ``(B, L)`` int64, -1 for background (FCOS with center sampling).

    Args:
        locations: ``(L, 5)`` from :meth:`DenseSpec.locations` (x, y, stride, size-range low, high).
        boxes: ``(B, M, 4)`` pixel boxes.
        labels: ``(B, M)`` labels, -1 for padding (never assigned).
    """
    x, y, stride, low, high = (locations[:, i].view(1, -1, 1) for i in range(5))
    x0, y0, x1, y1 = (boxes[..., i].unsqueeze(1) for i in range(4))  # (B, 1, M)
    dist = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=-1)  # (B, L, M, 4)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    match = torch.maximum((x - cx).abs(), (y - cy).abs()) < CENTER_SAMPLING_RADIUS * stride
    match &= dist.min(-1).values > 0
    reach = dist.max(-1).values
    match &= (reach > low) & (reach <= high) & (labels.unsqueeze(1) >= 0)
    # several matches: the smallest box (torchvision's 1e8 - area trick, written as a masked argmin)
    area = ((x1 - x0) * (y1 - y0)).expand_as(match)
    area = torch.where(match, area, torch.full_like(area, math.inf))
    best = area.argmin(-1)
    return torch.where(match.any(-1), best, torch.full_like(best, -1))


def decode_boxes(spec: DenseSpec, locations: Tensor, box: Tensor) -> Tensor:
    """Pixel boxes ``(B, L, 4)`` from the box regression ``(B, L, box_channels)`` at ``locations`` ``(L, 5)``."""
    d = spec.distances(box, locations[:, 2])
    x, y = locations[:, 0], locations[:, 1]
    return torch.stack([x - d[..., 0], y - d[..., 1], x + d[..., 2], y + d[..., 3]], dim=-1)


def _distribution_focal_loss(box: Tensor, target: Tensor, bins: int) -> Tensor:
    """GFL's DFL summed over edges: ``-((r - t) log p_l + (t - l) log p_r)`` with ``l = floor(t), r = l + 1``."""
    t = target.clamp(0, bins - 1e-3)
    left = t.floor()
    logp = box.unflatten(-1, (4, bins + 1)).log_softmax(-1)
    lp = logp.gather(-1, left.long().unsqueeze(-1)).squeeze(-1)
    rp = logp.gather(-1, left.long().add(1).unsqueeze(-1)).squeeze(-1)
    return -((left + 1 - t) * lp + (t - left) * rp).sum()


def fcos_loss(spec: DenseSpec, locations: Tensor, dense: Tensor, boxes: Tensor, labels: Tensor) -> Tensor:
    """FCOS's loss (see the module docstring), a scalar in the dense output's precision (at least float32).

    Args:
        spec: The output's layout.
        locations: ``(L, 5)`` from :meth:`DenseSpec.locations`.
        dense: ``(B, L, C)`` predictions.
        boxes: ``(B, M, 4)`` pixel boxes.
        labels: ``(B, M)`` int64 labels, -1 for padding.
    """
    from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

    dtype = torch.promote_types(dense.dtype, torch.float32)
    dense, locations, boxes = dense.to(dtype), locations.to(dtype), boxes.to(dtype)
    cls, box, ctr = spec.split(dense)
    matched = assign(locations, boxes, labels)
    fg = matched >= 0
    num_fg = fg.sum().clamp(min=1).to(dtype)
    gt_cls = torch.zeros_like(cls)
    safe = matched.clamp(min=0)
    gt_label = labels.gather(1, safe)
    gt_cls[fg] = F.one_hot(gt_label[fg], spec.num_classes).to(dtype)
    loss = sigmoid_focal_loss(cls, gt_cls, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA, reduction="sum")
    if bool(fg.any()):
        gt_box = boxes.gather(1, safe.unsqueeze(-1).expand(-1, -1, 4))[fg]  # (P, 4)
        loc = locations.unsqueeze(0).expand(fg.shape[0], -1, -1)[fg]  # (P, 5)
        pred = decode_boxes(spec, loc, box[fg])
        loss = loss + generalized_box_iou_loss(pred, gt_box, reduction="sum")
        ltrb = torch.stack([loc[:, 0] - gt_box[:, 0], loc[:, 1] - gt_box[:, 1], gt_box[:, 2] - loc[:, 0],
                            gt_box[:, 3] - loc[:, 1]], dim=-1)
        lr, tb = ltrb[:, 0::2], ltrb[:, 1::2]
        gt_ctr = torch.sqrt((lr.min(-1).values / lr.max(-1).values) * (tb.min(-1).values / tb.max(-1).values))
        loss = loss + F.binary_cross_entropy_with_logits(ctr[fg], gt_ctr, reduction="sum")
        if spec.box_bins:
            dfl = _distribution_focal_loss(box[fg], ltrb / loc[:, 2:3], spec.box_bins)
            loss = loss + DFL_WEIGHT * dfl / 4  # GFL averages DFL over the four edges
    return loss / num_fg


def decode(spec: DenseSpec, locations: Tensor, dense: Tensor, image_size: int) -> list[dict[str, Tensor]]:
    """Detections per image, ``{"boxes": (D, 4) pixels, "scores": (D,), "labels": (D,)}`` (see module docstring)."""
    from torchvision.ops import batched_nms

    dense = dense.float()
    cls, box, ctr = spec.split(dense)
    boxes_all = decode_boxes(spec, locations.float(), box).clamp(0, image_size)
    scores_all = torch.sqrt(torch.sigmoid(cls) * torch.sigmoid(ctr).unsqueeze(-1))  # (B, L, K)
    sizes = [s * s for s in spec.grid_sizes(image_size)]
    out = []
    for b in range(dense.shape[0]):
        keep_boxes, keep_scores, keep_labels = [], [], []
        for scores, boxes in zip(scores_all[b].split(sizes), boxes_all[b].split(sizes), strict=True):
            flat = scores.flatten()
            idx = torch.nonzero(flat > SCORE_THRESH).squeeze(1)
            top = flat[idx].topk(min(TOPK_PER_LEVEL, idx.numel())).indices
            idx = idx[top]
            keep_scores.append(flat[idx])
            keep_boxes.append(boxes[idx // spec.num_classes])
            keep_labels.append(idx % spec.num_classes)
        boxes, scores, labels = torch.cat(keep_boxes), torch.cat(keep_scores), torch.cat(keep_labels)
        keep = batched_nms(boxes, scores, labels, NMS_THRESH)[:DETECTIONS_PER_IMAGE]
        out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return out


def ground_truth(boxes: Tensor, labels: Tensor) -> list[dict[str, Tensor]]:
    """Per image ``{"boxes": (G, 4), "labels": (G,)}`` of the padded ``(B, M, 4)`` / ``(B, M)`` (padding dropped)."""
    return [{"boxes": box[lab >= 0].float(), "labels": lab[lab >= 0]} for box, lab in zip(boxes, labels, strict=True)]


class DetectionEvaluator:
    """COCO box mAP (%) by torchmetrics' ``MeanAveragePrecision`` (pycocotools backend) and the mean FCOS loss.

    Under DDP torchmetrics gathers the detections of every process when it computes.
    """

    def __init__(self, bound: BoundDetection, ctx: DistContext) -> None:
        from torchmetrics.detection import MeanAveragePrecision

        self.bound, self.ctx, self.old = bound, ctx, bound.old
        self.map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools",
                                        class_metrics=bool(self.old)).to(bound.device)
        self.totals = torch.zeros(2, dtype=torch.float64, device=bound.device)  # loss x batch size, images

    def update(self, logits: Tensor, targets: Tensor) -> None:
        boxes, labels = unpack_targets(targets, self.bound.image_size)
        self.add(self.bound.rules.decode(self.bound.spec, self.bound.locations, logits, self.bound.image_size),
                 ground_truth(boxes, labels))
        loss = self.bound.loss(logits, targets).double() * len(targets)
        self.totals += torch.stack([loss, loss.new_tensor(float(len(targets)))])

    def add(self, detections: list[dict[str, Tensor]], truths: list[dict[str, Tensor]]) -> None:
        """Add decoded detections and the ground truth of the same images (the mAP's inputs, one dict per image)."""
        self.map.update(detections, truths)

    def compute(self) -> dict[str, float]:
        result = self.map.compute()
        loss, n = all_reduce_sum(self.totals, self.ctx).tolist()
        names = {"map": "map", "map50": "map_50", "map75": "map_75", "map_small": "map_small",
                 "map_medium": "map_medium", "map_large": "map_large"}
        out = {ours: 100.0 * float(result[theirs]) for ours, theirs in names.items() if ours in self.bound.metrics}
        out["loss"] = loss / max(n, 1.0)
        if self.old:
            out.update(old_new_map(result["classes"], result["map_per_class"], self.old))
        return out


def old_new_map(classes: Tensor, per_class: Tensor, old: tuple[int, ...]) -> dict[str, float]:
    """``map_old`` / ``map_new`` (%): the mean per-class AP over the old classes and over the others, each over the
    classes with a test box (torchmetrics gives -1 to a class without one); NaN for a group without such a class."""
    values = {int(c): float(v) for c, v in zip(classes.flatten().tolist(), per_class.flatten().tolist(), strict=True)
              if float(v) >= 0}
    groups = {OLD: [v for c, v in values.items() if c in old], NEW: [v for c, v in values.items() if c not in old]}
    return {name: 100.0 * sum(vs) / len(vs) if vs else math.nan for name, vs in groups.items()}


class BoundDetection:
    """Detection on one run's data with one model's dense layout."""

    def __init__(self, task: Task, data: Any, device: torch.device, spec: Layout) -> None:
        self.task, self.device, self.spec, self.metrics = task, device, spec, task.metrics_for(data)
        self.old = tuple(getattr(data, "old_classes", ()) or ())
        self.image_size = int(data.train_images.shape[-1])
        self.split_targets = {split: pack_targets(getattr(data, f"{split}_targets")["boxes"],
                                                  getattr(data, f"{split}_targets")["box_labels"],
                                                  self.image_size).to(device) for split in ("train", "test")}
        self.rules = rules_of(spec)
        self.locations = self.rules.points(spec, self.image_size, device)

    def targets(self, labels: Tensor, index: Tensor, split: str) -> Tensor:
        return self.split_targets[split].index_select(0, index)

    def follow(self, targets: Tensor, view: Tensor) -> Tensor:
        boxes, labels = unpack_targets(targets, self.image_size)
        boxes, labels = follow_boxes(boxes, labels, view, (self.image_size, self.image_size))
        return pack_targets(boxes, labels, self.image_size)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        boxes, labels = unpack_targets(targets, self.image_size)
        return self.rules.loss(self.spec, self.locations, logits, boxes, labels)

    def train_score(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        # per image, the share of its positive locations (anchors) whose top class is the assigned box's class
        boxes, labels = unpack_targets(targets, self.image_size)
        fg, right = self.rules.foreground(self.spec, self.locations, logits, boxes, labels)
        has = fg.any(1)
        share = right.sum(1).float() / fg.sum(1).clamp(min=1).float()
        return share[has].sum(), has.sum().float()

    def evaluator(self, ctx: DistContext) -> DetectionEvaluator:
        return DetectionEvaluator(self, ctx)

    def chance(self) -> dict[str, float]:
        return {}  # a detector that learned nothing finds nothing: 0 mAP, which needs no warning level


def foreground(spec: DenseSpec, locations: Tensor, dense: Tensor, boxes: Tensor,
               labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per location whether it is positive ``(B, L)`` and whether its top class is its box's ``(B, L)``."""
    return anchors.matched_and_right(spec.split(dense)[0], assign(locations, boxes.float(), labels), labels)


@dataclass(frozen=True)
class LayoutRules:
    """How the task places, trains, scores and decodes one output layout (the only place that tells them apart).

    Attributes:
        points: ``(spec, image_size, device) ->`` what the outputs sit on: FCOS locations ``(L, 5)`` or anchors
            ``(L * A, 4)``.
        loss: ``(spec, points, dense, boxes, labels) ->`` the supervised loss.
        foreground: ``(spec, points, dense, boxes, labels) ->`` positives and whether their top class is right.
        decode: ``(spec, points, dense, image_size) ->`` detections per image.
    """

    points: Callable[[Any, int, torch.device | str], Tensor]
    loss: Callable[[Any, Tensor, Tensor, Tensor, Tensor], Tensor]
    foreground: Callable[[Any, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
    decode: Callable[[Any, Tensor, Tensor, int], list[dict[str, Tensor]]]


FCOS_RULES = LayoutRules(lambda spec, size, device: spec.locations(size, device), fcos_loss, foreground, decode)
ANCHOR_RULES = LayoutRules(lambda spec, size, device: spec.anchors(size, device), anchors.retinanet_loss,
                           anchors.foreground, anchors.decode)
TWO_STAGE_RULES = LayoutRules(lambda spec, size, device: spec.rpn.anchors(size, device), two_stage.faster_rcnn_loss,
                              two_stage.foreground, two_stage.decode)


def rules_of(spec: Layout) -> LayoutRules:
    """The rules of a layout: RetinaNet's for an :class:`AnchorSpec`, Faster R-CNN's for a :class:`TwoStageSpec`,
    FCOS's for a :class:`DenseSpec`."""
    if isinstance(spec, TwoStageSpec):
        return TWO_STAGE_RULES
    return ANCHOR_RULES if isinstance(spec, AnchorSpec) else FCOS_RULES


def dense_spec_of(model: nn.Module | None) -> Layout:
    """The layout a detector declares (:data:`Layout`), or a :class:`KdkitError` naming the detectors."""
    spec = getattr(model, "dense_spec", None)
    if not isinstance(spec, Layout):
        from kdkit.models import MODELS

        detectors = [name for name in MODELS.names() if name.startswith(("det_", "tv_"))]
        raise KdkitError(f"task detection needs a dense detector (a model with a `dense_spec`), got "
                         f"{type(model).__name__}", choices=detectors,
                         fix="set model.arch to a detector, e.g. det_student", where="model.arch")
    return spec


@register_task
class Detection(Task):
    """Object detection: FCOS (RetinaNet, Faster R-CNN) loss on dense predictions, COCO box mAP (%, torchmetrics)."""

    name = "detection"
    target = "boxes"
    metrics = ("map", "map50", "map75", "map_small", "map_medium", "map_large", "loss", OLD, NEW)
    best = "map"
    loss_name = "det"  # FCOS's loss, RetinaNet's or Faster R-CNN's (the model's layout decides)
    train_metric = "fg_acc"
    deployed_output = ("dense per-location predictions (B, L, K + box + 1) over the FPN levels (the model's "
                       "dense_spec); decoding with NMS gives boxes, scores and labels")
    probabilities = ""
    pixel_targets = True
    logits_layout = "detections"
    drawn = (f"boxes decoded as the mAP decodes them (per-class NMS at IoU {NMS_THRESH}) scoring at least "
             f"{DRAWN_SCORE}, at most the {DRAWN_PER_IMAGE} highest-scoring per image, with their class and score")

    def metrics_for(self, data: Any) -> tuple[str, ...]:
        if data is None:
            return self.metrics
        boxes, labels = data.test_targets["boxes"], data.test_targets["box_labels"]
        areas = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]))[labels >= 0]
        empty = {name for name, (low, high) in AREA_RANGES.items() if not bool(((areas >= low) & (areas < high)).any())}
        if not getattr(data, "old_classes", ()):  # old / new are defined on an incremental step 2 only
            empty |= {OLD, NEW}
        return tuple(m for m in self.metrics if m not in empty)

    def check_data(self, data: Any) -> str | None:
        problem = super().check_data(data)
        if problem is None and "box_labels" not in data.train_targets:
            return f"needs per-sample 'box_labels' targets beside 'boxes', which dataset {data.name!r} does not provide"
        return problem

    def bind(self, data: Any, device: torch.device, *, label_smoothing: float = 0.0,
             model: nn.Module | None = None) -> BoundDetection:
        if label_smoothing:
            raise KdkitError(f"label smoothing ({label_smoothing}) is defined for single-label targets; the "
                             "detection task trains FCOS's focal loss", fix="remove train.label_smoothing",
                             where="train.label_smoothing")
        _require_coco_backend()
        return BoundDetection(self, data, device, dense_spec_of(model))


    def drawn_targets(self, targets: dict[str, Tensor]) -> list[Drawing]:
        """Each image's boxes and their classes (padding dropped)."""
        return [Drawing(t["boxes"], t["labels"]) for t in ground_truth(targets["boxes"], targets["box_labels"])]

    def drawn_outputs(self, outputs: Tensor, model: nn.Module, image_size: int) -> list[Drawing]:
        """The decoded detections (:func:`decode`) scoring at least :data:`DRAWN_SCORE`, the
        :data:`DRAWN_PER_IMAGE` highest-scoring at most, by decreasing score."""
        spec = dense_spec_of(model)
        rules = rules_of(spec)
        detections = rules.decode(spec, rules.points(spec, image_size, outputs.device), outputs, image_size)
        drawings = []
        for found in detections:
            scores = found["scores"]
            keep = torch.nonzero(scores >= DRAWN_SCORE).squeeze(1)
            keep = keep[scores[keep].argsort(descending=True)[:DRAWN_PER_IMAGE]]
            drawings.append(Drawing(found["boxes"][keep], found["labels"][keep], scores[keep]))
        return drawings


def _require_coco_backend() -> None:
    """Fail before training when the mAP's COCO backend is missing (torchmetrics would fail at the first test)."""
    import importlib.util

    if importlib.util.find_spec("pycocotools") is None:
        raise KdkitError("task detection computes COCO mAP with torchmetrics, whose backend pycocotools is not "
                         "installed", fix="pip install 'kdkit[dense]'", where="task")
