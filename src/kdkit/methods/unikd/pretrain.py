"""UniKD's first phase: the AKE learns to predict the frozen teacher's detections from the teacher's FPN levels.

Targets (:func:`teacher_detections`): the teacher's dense outputs decoded as FCOS does (score
``sqrt(sigmoid(class) * sigmoid(centerness))``, per-class NMS at IoU 0.6), kept above ``score_threshold`` and at most
one per query -- the teacher's output, not the labels, so the AKE learns what this teacher knows (its mistakes too).

Loss (:func:`set_loss`, Deformable DETR's set prediction loss): each image's targets are matched one-to-one to the
queries by the Hungarian algorithm on the cost ``2 * focal + 5 * L1 + 2 * (-GIoU)``; then a sigmoid focal loss
(alpha 0.25, gamma 2) over every query and class (matched queries' targets one-hot), L1 and GIoU losses on the
matched boxes, each summed and divided by the number of targets (at least 1), weighted 2, 5 and 2 and summed over
the decoder layers (Deformable DETR's auxiliary losses).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from kdkit.models.detector import DenseSpec

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
CLASS_WEIGHT, L1_WEIGHT, GIOU_WEIGHT = 2.0, 5.0, 2.0
NMS_IOU = 0.6
#: Deformable DETR clips the gradient norm at 0.1.
CLIP_NORM = 0.1

Targets = list[tuple[Tensor, Tensor]]  # per image: labels (T,) int64, boxes (T, 4) cxcywh in [0, 1]


def xyxy(boxes: Tensor) -> Tensor:
    """``(cx, cy, w, h)`` boxes as ``(x0, y0, x1, y1)``."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def cxcywh(boxes: Tensor) -> Tensor:
    """``(x0, y0, x1, y1)`` boxes as ``(cx, cy, w, h)``."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


@torch.no_grad()
def teacher_detections(spec: DenseSpec, dense: Tensor, image_size: int, score_threshold: float,
                       limit: int) -> Targets:
    """The teacher's detections per image: labels and ``(cx, cy, w, h)`` boxes over ``image_size`` (see the module
    docstring), at most ``limit`` (the best scores)."""
    from torchvision.ops import batched_nms

    dense = dense.float()
    locations = spec.locations(image_size, dense.device)
    cls, box, ctr = spec.split(dense)
    d = spec.distances(box, locations[:, 2])
    x, y = locations[:, 0], locations[:, 1]
    boxes_all = torch.stack([x - d[..., 0], y - d[..., 1], x + d[..., 2], y + d[..., 3]], -1).clamp(0, image_size)
    scores_all = torch.sqrt(torch.sigmoid(cls) * torch.sigmoid(ctr).unsqueeze(-1))  # (B, L, K)
    out = []
    for scores, boxes in zip(scores_all, boxes_all, strict=True):
        idx = torch.nonzero(scores.flatten() > score_threshold).squeeze(1)
        labels, kept = idx % spec.num_classes, boxes[idx // spec.num_classes]
        keep = batched_nms(kept, scores.flatten()[idx], labels, NMS_IOU)[:limit]  # sorted by score
        out.append((labels[keep], cxcywh(kept[keep] / image_size)))
    return out


def focal_terms(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per query and class, the sigmoid focal loss of a positive and of a negative target."""
    p = logits.sigmoid()
    pos = FOCAL_ALPHA * (1 - p).pow(FOCAL_GAMMA) * torch.nn.functional.softplus(-logits)  # -log p
    neg = (1 - FOCAL_ALPHA) * p.pow(FOCAL_GAMMA) * torch.nn.functional.softplus(logits)  # -log(1 - p)
    return pos, neg


def match(logits: Tensor, boxes: Tensor, labels: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Hungarian matching of one image's queries (``logits (N, K)``, ``boxes (N, 4)`` cxcywh) to its targets
    (``labels (T,)``, ``targets (T, 4)``): query and target indices, ``T`` pairs when ``T <= N``."""
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import generalized_box_iou

    with torch.no_grad():
        pos, neg = focal_terms(logits)
        cost = (CLASS_WEIGHT * (pos - neg)[:, labels] + L1_WEIGHT * torch.cdist(boxes, targets, p=1)
                - GIOU_WEIGHT * generalized_box_iou(xyxy(boxes), xyxy(targets)))
        rows, cols = linear_sum_assignment(cost.double().cpu().numpy())
    device = logits.device
    return torch.as_tensor(rows, dtype=torch.long, device=device), torch.as_tensor(cols, dtype=torch.long,
                                                                                    device=device)


def set_loss(logits: Tensor, boxes: Tensor, targets: Targets) -> Tensor:
    """Deformable DETR's set prediction loss of one decoder layer (see the module docstring).

    Args:
        logits: ``(B, N, K)`` class logits of the queries.
        boxes: ``(B, N, 4)`` their ``(cx, cy, w, h)`` boxes.
        targets: Per image, labels and boxes (:func:`teacher_detections`).
    """
    from torchvision.ops import generalized_box_iou

    pos, neg = focal_terms(logits)
    onehot = torch.zeros_like(logits)
    matched_pred, matched_target = [], []
    for b, (labels, target) in enumerate(targets):
        if len(labels) == 0:
            continue
        q, t = match(logits[b], boxes[b], labels, target)
        onehot[b, q, labels[t]] = 1.0
        matched_pred.append(boxes[b, q])
        matched_target.append(target[t].to(boxes.dtype))
    count = max(sum(len(labels) for labels, _ in targets), 1)
    loss = CLASS_WEIGHT * (onehot * pos + (1 - onehot) * neg).sum() / count
    if matched_pred:
        pred, target = torch.cat(matched_pred), torch.cat(matched_target)
        loss = loss + L1_WEIGHT * (pred - target).abs().sum() / count
        giou = torch.diagonal(generalized_box_iou(xyxy(pred), xyxy(target)))
        loss = loss + GIOU_WEIGHT * (1 - giou).sum() / count
    return loss


def cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine decay from ``base`` to 0 over ``total`` steps."""
    return base * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def pretrain(ake: nn.Module, head: nn.Module, batches: Callable[[], Iterator[tuple[list[Tensor], Targets]]],
             steps: int, lr: float, reduce_grads: Callable[[list[Tensor]], None]) -> dict[str, Any]:
    """Train ``ake`` and the class ``head`` on the teacher's features and detections; freeze the AKE after.

    Args:
        ake: The AKE (its parameters are trained here and frozen again at the end).
        head: ``(..., dim) -> (..., K)`` class logits of the content embeddings (used only here).
        batches: Yields the teacher's feature maps and detections of each training batch, ``steps`` of them.
        steps: Optimisation steps (for the learning-rate schedule).
        lr: Peak learning rate of AdamW (weight decay 1e-4, Deformable DETR's), cosine-decayed to 0.
        reduce_grads: Averages the gradients over the processes of a distributed run (identity alone).

    Returns:
        Statistics: steps, mean loss of the first and of the last tenth of the steps, targets per image.
    """
    ake.requires_grad_(True)
    params = [*ake.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    losses: list[float] = []
    targets_seen = images = 0
    try:
        for step, (features, targets) in enumerate(batches()):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(lr, step, steps)
            knowledge = ake(features)
            logits = head(knowledge.content)
            loss = sum((set_loss(logits[j], knowledge.boxes[j], targets) for j in range(len(logits))),
                       start=logits.new_zeros(()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            reduce_grads([p.grad for p in params if p.grad is not None])
            torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
            optimizer.step()
            losses.append(float(loss.detach()))
            targets_seen += sum(len(labels) for labels, _ in targets)
            images += len(targets)
    finally:
        ake.requires_grad_(False)
        for p in params:
            p.grad = None
    tenth = max(len(losses) // 10, 1)
    return {"steps": len(losses), "loss_first": sum(losses[:tenth]) / tenth if losses else math.nan,
            "loss_last": sum(losses[-tenth:]) / tenth if losses else math.nan,
            "targets_per_image": targets_seen / max(images, 1)}
