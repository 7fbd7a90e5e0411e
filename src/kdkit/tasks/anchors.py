"""RetinaNet's anchor matching, loss and decoding on an anchor-based detector's one dense tensor, batched.

The rules are torchvision's ``RetinaNet`` (``compute_loss``, ``RetinaNetHead.compute_loss``,
``postprocess_detections``), written over the whole batch at once instead of one image at a time; the tests check
them against torchvision's own functions on the same inputs.

Matching (``Matcher(0.5, 0.4, allow_low_quality_matches=True)``): each anchor takes the box of highest IoU; below
0.4 it is background (-1), in ``[0.4, 0.5)`` ignored (-2); then every box's best anchors (every anchor tying the
box's highest IoU) get back their highest-IoU box even when under 0.5. An image without boxes is all background.

Loss: per image, the sigmoid focal loss (alpha 0.25, gamma 2) over the non-ignored anchors and every class, plus
the L1 loss of the foreground anchors' 4 deltas against their boxes' (``BoxCoder`` weights ``(1, 1, 1, 1)``), each
summed and divided by the image's foreground anchors (at least 1); then averaged over the images.

Decoding: per level, ``sigmoid`` scores above 0.05, the best 1000, deltas decoded on their anchors (the log-size
deltas clamped at ``log(1000 / 16)``) and clipped to the image; per-class NMS at IoU 0.5; at most 300 per image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kdkit.models.retinanet import AnchorSpec

if TYPE_CHECKING:
    from torchvision.models.detection._utils import BoxCoder

FG_IOU, BG_IOU = 0.5, 0.4
BELOW, BETWEEN = -1, -2
SCORE_THRESH, NMS_THRESH, TOPK_PER_LEVEL, DETECTIONS_PER_IMAGE = 0.05, 0.5, 1000, 300


def _coder() -> BoxCoder:
    """torchvision's ``BoxCoder`` with RetinaNet's weights ``(1, 1, 1, 1)``."""
    from torchvision.models.detection._utils import BoxCoder

    return BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))


def pairwise_iou(boxes: Tensor, anchors: Tensor) -> Tensor:
    """IoU ``(B, M, N)`` of each image's boxes ``(B, M, 4)`` with its anchors: ``(N, 4)`` shared by the images (as
    torchvision's ``box_iou``) or ``(B, N, 4)`` per image (proposals): intersection over union of the areas."""
    from torchvision.ops import box_iou

    if anchors.dim() == 2:
        return box_iou(boxes.reshape(-1, 4), anchors).view(boxes.shape[0], boxes.shape[1], -1)
    area_b = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # (B, M)
    area_a = (anchors[..., 2] - anchors[..., 0]) * (anchors[..., 3] - anchors[..., 1])  # (B, N)
    top_left = torch.maximum(boxes[:, :, None, :2], anchors[:, None, :, :2])
    bottom_right = torch.minimum(boxes[:, :, None, 2:], anchors[:, None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_b[:, :, None] + area_a[:, None, :] - inter)


def match(anchors: Tensor, boxes: Tensor, labels: Tensor, fg_iou: float = FG_IOU, bg_iou: float = BG_IOU,
          low_quality: bool = True) -> Tensor:
    """Matched box per anchor ``(B, N)`` int64: its index, -1 background or -2 ignored (torchvision's ``Matcher``;
    RetinaNet's thresholds by default, see the module docstring).

    Args:
        anchors: ``(N, 4)`` pixel anchors, or ``(B, N, 4)`` per image (a two-stage detector's proposals).
        boxes: ``(B, M, 4)`` pixel boxes.
        labels: ``(B, M)`` labels, -1 for padding (never matched).
        fg_iou: IoU from which an anchor is matched.
        bg_iou: IoU under which it is background; between the two it is ignored.
        low_quality: Give every box its best anchors back even under ``fg_iou`` (``allow_low_quality_matches``).
    """
    batch, count = boxes.shape[0], boxes.shape[1]
    real = labels >= 0  # (B, M)
    if count == 0:
        return torch.full((batch, anchors.shape[-2]), BELOW, dtype=torch.long, device=anchors.device)
    iou = pairwise_iou(boxes, anchors)  # (B, M, N)
    # a padding row never wins (real IoUs are >= 0) and never claims its best anchors
    iou = torch.where(real.unsqueeze(-1), iou, torch.full_like(iou, -1.0))
    values, best = iou.max(dim=1)  # (B, N)
    matched = best.clone()
    matched[values < bg_iou] = BELOW
    matched[(values >= bg_iou) & (values < fg_iou)] = BETWEEN
    if low_quality:
        highest = iou.max(dim=2, keepdim=True).values  # (B, M, 1)
        tied = ((iou == highest) & real.unsqueeze(-1)).any(dim=1)  # (B, N): the best anchor of some real box
        matched = torch.where(tied, best, matched)
    return torch.where(real.any(dim=1, keepdim=True), matched, torch.full_like(matched, BELOW))


def retinanet_loss(spec: AnchorSpec, anchors: Tensor, dense: Tensor, boxes: Tensor, labels: Tensor) -> Tensor:
    """RetinaNet's loss (see the module docstring), a scalar in the output's precision (at least float32).

    Args:
        spec: The output's layout.
        anchors: ``(N, 4)`` from :meth:`AnchorSpec.anchors`.
        dense: ``(B, N, K + 4)`` predictions.
        boxes: ``(B, M, 4)`` pixel boxes.
        labels: ``(B, M)`` int64 labels, -1 for padding.
    """
    from torchvision.ops import sigmoid_focal_loss

    dtype = torch.promote_types(dense.dtype, torch.float32)
    dense, anchors, boxes = dense.to(dtype), anchors.to(dtype), boxes.to(dtype)
    cls, deltas = spec.split(dense)
    matched = match(anchors, boxes, labels)
    fg = matched >= 0
    safe = matched.clamp(min=0)
    num_fg = fg.sum(1).clamp(min=1).to(dtype)  # (B,)
    target = torch.zeros_like(cls)
    target[fg] = torch.nn.functional.one_hot(labels.gather(1, safe)[fg], spec.num_classes).to(dtype)
    focal = sigmoid_focal_loss(cls, target, reduction="none").sum(-1)  # (B, N)
    cls_loss = torch.where(matched != BETWEEN, focal, torch.zeros_like(focal)).sum(1) / num_fg
    gt = boxes.gather(1, safe.unsqueeze(-1).expand(-1, -1, 4))  # (B, N, 4)
    rows = fg.nonzero(as_tuple=True)
    wanted = _coder().encode_single(gt[rows], anchors[rows[1]])
    l1 = torch.zeros_like(num_fg).index_add(0, rows[0], (deltas[rows] - wanted).abs().sum(-1))
    return (cls_loss + l1 / num_fg).mean()


def matched_and_right(class_logits: Tensor, matched: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Which points are positive (``matched >= 0``) ``(B, N)`` and whether each one's top class among
    ``class_logits`` ``(B, N, K)`` is its matched box's label ``(B, N)``: the training score of any one-stage layout."""
    fg = matched >= 0
    right = (class_logits.detach().argmax(-1) == labels.gather(1, matched.clamp(min=0))) & fg
    return fg, right


def foreground(spec: AnchorSpec, anchors: Tensor, dense: Tensor, boxes: Tensor,
               labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per anchor whether it is foreground ``(B, N)`` and whether its top class is its box's ``(B, N)``."""
    return matched_and_right(spec.split(dense)[0], match(anchors, boxes.float(), labels), labels)


def decode(spec: AnchorSpec, anchors: Tensor, dense: Tensor, image_size: int) -> list[dict[str, Tensor]]:
    """Detections per image, ``{"boxes": (D, 4) pixels, "scores": (D,), "labels": (D,)}`` (module docstring)."""
    from torchvision.ops import batched_nms

    coder = _coder()
    dense, anchors = dense.float(), anchors.float()
    cls, deltas = spec.split(dense)
    sizes = spec.level_sizes(image_size)
    out = []
    for b in range(dense.shape[0]):
        kept_boxes, kept_scores, kept_labels = [], [], []
        for logits, level_deltas, level_anchors in zip(cls[b].split(sizes), deltas[b].split(sizes),
                                                       anchors.split(sizes), strict=True):
            scores = torch.sigmoid(logits).flatten()
            idx = torch.nonzero(scores > SCORE_THRESH).squeeze(1)
            top = scores[idx].topk(min(TOPK_PER_LEVEL, idx.numel()))
            idx = idx[top.indices]
            rows = idx // spec.num_classes
            kept_scores.append(top.values)
            kept_labels.append(idx % spec.num_classes)
            kept_boxes.append(coder.decode_single(level_deltas[rows], level_anchors[rows]).clamp(0, image_size))
        boxes, scores, labels = torch.cat(kept_boxes), torch.cat(kept_scores), torch.cat(kept_labels)
        keep = batched_nms(boxes, scores, labels, NMS_THRESH)[:DETECTIONS_PER_IMAGE]
        out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return out
