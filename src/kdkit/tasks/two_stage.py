"""Faster R-CNN's losses and decoding on a two-stage detector's one dense tensor
(:class:`kdkit.models.faster_rcnn.TwoStageSpec`): torchvision's rules, on the fixed ``P`` proposals of each image.

Region proposal network (``RegionProposalNetwork.assign_targets_to_anchors`` and ``compute_loss``): anchors match
boxes by ``Matcher(0.7, 0.3, allow_low_quality_matches=True)``; per image 256 anchors are sampled, at most half
positive (``BalancedPositiveNegativeSampler``, a random permutation of the positives then of the negatives, image by
image); the loss is the binary cross-entropy of the sampled anchors' objectness (mean) plus the smooth-L1 loss
(beta 1/9) of the positives' deltas against their boxes' (``BoxCoder`` weights ``(1, 1, 1, 1)``), summed and divided
by the number of sampled anchors.

Box head (``RoIHeads.assign_targets_to_proposals``, ``subsample``, ``fastrcnn_loss``): valid proposals match boxes by
``Matcher(0.5, 0.5)`` (label ``k + 1`` for a box of class ``k``, 0 below 0.5); per image 512 are sampled, at most a
quarter positive; the loss is the cross-entropy of the sampled proposals' ``K + 1`` logits (mean) plus the smooth-L1
loss (beta 1/9) of the positives' deltas for their class against their boxes' (weights ``(10, 10, 5, 5)``), summed
and divided by the number of sampled proposals. The four terms are added, as torchvision's loss dict is summed.

Unlike torchvision, the ground-truth boxes are not among the proposals (the forward pass does not see them; see
:mod:`kdkit.models.faster_rcnn`), and padding rows (invalid proposals) are never sampled. The sampling draws from
torch's global generator, which the engine checkpoints, so a resumed run samples as the uninterrupted one.

Decoding (``RoIHeads.postprocess_detections``): softmax scores, class-specific boxes decoded on the valid proposals
and clipped, background dropped, scores above 0.05, boxes of side under 0.01 dropped, per-class NMS at IoU 0.5, at
most 100 per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.models.faster_rcnn import TwoStageSpec, roi_coder, rpn_coder
from kdkit.tasks.anchors import BELOW, BETWEEN, match

RPN_FG_IOU, RPN_BG_IOU, RPN_SAMPLES, RPN_POSITIVE = 0.7, 0.3, 256, 0.5
ROI_IOU, ROI_SAMPLES, ROI_POSITIVE = 0.5, 512, 0.25
SMOOTH_L1_BETA = 1 / 9
SCORE_THRESH, MIN_SIZE, NMS_THRESH, DETECTIONS_PER_IMAGE = 0.05, 1e-2, 0.5, 100


def sample(labels: Tensor, per_image: int, positive_fraction: float) -> tuple[Tensor, Tensor]:
    """Sampled positives and negatives ``(B, N)`` bool of ``labels`` ``(B, N)`` (``>= 1`` positive, 0 negative,
    -1 ignored): torchvision's ``BalancedPositiveNegativeSampler``, image by image, with the same random draws."""
    positives = torch.zeros_like(labels, dtype=torch.bool)
    negatives = torch.zeros_like(labels, dtype=torch.bool)
    for b in range(labels.shape[0]):
        positive = torch.where(labels[b] >= 1)[0]
        negative = torch.where(labels[b] == 0)[0]
        num_pos = min(positive.numel(), int(per_image * positive_fraction))
        num_neg = min(negative.numel(), per_image - num_pos)
        positives[b, positive[torch.randperm(positive.numel(), device=positive.device)[:num_pos]]] = True
        negatives[b, negative[torch.randperm(negative.numel(), device=negative.device)[:num_neg]]] = True
    return positives, negatives


def rpn_loss(spec: TwoStageSpec, anchors: Tensor, rpn: Tensor, boxes: Tensor, labels: Tensor) -> Tensor:
    """The region proposal network's objectness and box loss (module docstring), a scalar.

    Args:
        spec: The output's layout.
        anchors: ``(N, 4)`` RPN anchors.
        rpn: ``(B, N, 5)`` objectness logits and deltas.
        boxes: ``(B, M, 4)`` pixel boxes.
        labels: ``(B, M)`` int64 labels, -1 for padding.
    """
    matched = match(anchors, boxes, labels, RPN_FG_IOU, RPN_BG_IOU, low_quality=True)
    target = torch.where(matched >= 0, 1.0, 0.0).to(rpn.dtype)
    target = torch.where(matched == BETWEEN, torch.full_like(target, -1.0), target)
    positives, negatives = sample(target, RPN_SAMPLES, RPN_POSITIVE)
    sampled = positives | negatives
    rows = positives.nonzero(as_tuple=True)
    gt = boxes.gather(1, matched.clamp(min=0).unsqueeze(-1).expand(-1, -1, 4))
    wanted = rpn_coder().encode_single(gt[rows], anchors[rows[1]])
    count = sampled.sum().clamp(min=1)
    box = F.smooth_l1_loss(rpn[..., 1:][rows], wanted, beta=SMOOTH_L1_BETA, reduction="sum") / count
    objectness = F.binary_cross_entropy_with_logits(rpn[..., 0][sampled], target[sampled])
    return objectness + box


def roi_targets(spec: TwoStageSpec, valid: Tensor, proposals: Tensor, boxes: Tensor,
                labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per proposal its class target ``(B, P)`` (``k + 1``, 0 background, -1 ignored: invalid rows) and matched box
    index ``(B, P)`` (clamped to 0 where unmatched)."""
    matched = match(proposals, boxes, labels, ROI_IOU, ROI_IOU, low_quality=False)
    safe = matched.clamp(min=0)
    target = labels.gather(1, safe) + 1
    target = torch.where(matched == BELOW, torch.zeros_like(target), target)
    target = torch.where(matched == BETWEEN, torch.full_like(target, -1), target)
    return torch.where(valid, target, torch.full_like(target, -1)), safe


def roi_loss(spec: TwoStageSpec, valid: Tensor, proposals: Tensor, scores: Tensor, deltas: Tensor, boxes: Tensor,
             labels: Tensor) -> Tensor:
    """The box head's classification and box loss on the proposals (module docstring), a scalar.

    Args:
        spec: The output's layout.
        valid: ``(B, P)`` which proposal rows hold a proposal.
        proposals: ``(B, P, 4)`` pixel boxes.
        scores: ``(B, P, K + 1)`` class logits.
        deltas: ``(B, P, 4 (K + 1))`` class-specific box deltas.
        boxes: ``(B, M, 4)`` pixel boxes.
        labels: ``(B, M)`` int64 labels, -1 for padding.
    """
    target, safe = roi_targets(spec, valid, proposals, boxes, labels)
    positives, negatives = sample(target, ROI_SAMPLES, ROI_POSITIVE)
    sampled = positives | negatives
    count = sampled.sum().clamp(min=1)
    if not bool(sampled.any()):
        return scores.sum() * 0.0
    classification = F.cross_entropy(scores[sampled], target[sampled])
    rows = positives.nonzero(as_tuple=True)
    gt = boxes.gather(1, safe.unsqueeze(-1).expand(-1, -1, 4))
    wanted = roi_coder().encode_single(gt[rows], proposals[rows])
    picked = deltas.unflatten(-1, (spec.num_classes + 1, 4))[rows[0], rows[1], target[rows]]
    box = F.smooth_l1_loss(picked, wanted, beta=SMOOTH_L1_BETA, reduction="sum") / count
    return classification + box


def faster_rcnn_loss(spec: TwoStageSpec, anchors: Tensor, dense: Tensor, boxes: Tensor, labels: Tensor) -> Tensor:
    """Faster R-CNN's four terms added (module docstring), a scalar in the output's precision (at least float32).

    Args:
        spec: The output's layout.
        anchors: ``(N, 4)`` RPN anchors.
        dense: ``(B, N + P, C)`` predictions.
        boxes: ``(B, M, 4)`` pixel boxes.
        labels: ``(B, M)`` int64 labels, -1 for padding.
    """
    dtype = torch.promote_types(dense.dtype, torch.float32)
    dense, anchors, boxes = dense.to(dtype), anchors.to(dtype), boxes.to(dtype)
    rpn, valid, proposals, scores, deltas = spec.split(dense)
    # the RPN samples first, then the box head, as torchvision's forward draws them
    return rpn_loss(spec, anchors, rpn, boxes, labels) + roi_loss(spec, valid, proposals, scores, deltas, boxes,
                                                                  labels)


def foreground(spec: TwoStageSpec, anchors: Tensor, dense: Tensor, boxes: Tensor,
               labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per proposal whether it is foreground ``(B, P)`` and whether its top class (of ``K + 1``) is its box's."""
    _, valid, proposals, scores, _ = spec.split(dense.detach().float())
    target, _ = roi_targets(spec, valid, proposals, boxes.float(), labels)
    fg = target >= 1
    return fg, (scores.argmax(-1) == target) & fg


def decode(spec: TwoStageSpec, anchors: Tensor, dense: Tensor, image_size: int) -> list[dict[str, Tensor]]:
    """Detections per image, ``{"boxes": (D, 4) pixels, "scores": (D,), "labels": (D,)}`` (module docstring); labels
    are the dataset's ``0 .. K - 1``."""
    from torchvision.ops import boxes as box_ops

    _, valid, proposals, logits, deltas = spec.split(dense.float())
    coder = roi_coder()
    k1 = spec.num_classes + 1
    out = []
    for b in range(dense.shape[0]):
        props = proposals[b][valid[b]]
        boxes = coder.decode_single(deltas[b][valid[b]].reshape(-1, 4),
                                    props.repeat_interleave(k1, dim=0)).view(-1, k1, 4)
        boxes = box_ops.clip_boxes_to_image(boxes, (image_size, image_size))
        scores = F.softmax(logits[b][valid[b]], -1)
        classes = torch.arange(k1, device=dense.device).view(1, -1).expand_as(scores)
        boxes, scores, classes = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), classes[:, 1:].reshape(-1)
        keep = torch.where(scores > SCORE_THRESH)[0]
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        keep = box_ops.remove_small_boxes(boxes, MIN_SIZE)
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        keep = box_ops.batched_nms(boxes, scores, classes, NMS_THRESH)[:DETECTIONS_PER_IMAGE]
        out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": classes[keep] - 1})
    return out
