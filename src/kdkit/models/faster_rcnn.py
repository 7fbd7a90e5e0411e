"""Faster R-CNN (Ren et al., "Faster R-CNN: Towards Real-Time Object Detection with Region Proposal Networks",
NeurIPS 2015; with a feature pyramid as Lin et al., CVPR 2017) from torchvision's own parts, returning kdkit's one
dense tensor.

A two-stage detector's second stage runs on proposals, whose number varies per image. To keep one fixed-shape
output (what taps, the teacher cache and the engine carry), every image keeps exactly ``P`` proposal rows
(``TwoStageSpec.proposals``): the region proposal network's best ``P`` after its non-maximum suppression, padded
with rows flagged invalid when fewer survive. The output is ``(B, N + P, C)``:

* rows ``0 .. N - 1``, one per RPN anchor (levels finest first, locations row-major, anchors per location last, as
  torchvision's ``concat_box_prediction_layers``): the objectness logit, 4 box deltas (``BoxCoder`` weights
  ``(1, 1, 1, 1)``), then zeros up to ``C``;
* rows ``N .. N + P - 1``, one per proposal: a validity flag (1 or 0), the proposal box ``x0, y0, x1, y1`` (pixels,
  detached, as torchvision detaches them), ``K + 1`` class logits (index 0 background, softmax) and ``4 (K + 1)``
  class-specific box deltas (``BoxCoder`` weights ``(10, 10, 5, 5)``) relative to the proposal.

The rows are at least float32, under half-precision autocast too (a proposal's pixel coordinates must not round).
The proposals are torchvision's ``RegionProposalNetwork.filter_proposals``: per level the ``pre_nms_top_n`` anchors
of highest objectness, decoded, clipped to the image, boxes under ``1e-3`` pixels dropped, non-maximum suppression at
IoU 0.7 per level, the best ``P`` kept. The second stage is torchvision's ``MultiScaleRoIAlign`` (7x7, sampling ratio
2), ``TwoMLPHead`` and ``FastRCNNPredictor`` on the same FPN levels.

Differences from torchvision's ``FasterRCNN`` (all forced by the one-tensor output, which must not depend on the
targets): the same ``P`` proposals in training and inference (torchvision keeps 2,000 when training and 1,000 when
testing), and the ground-truth boxes are not appended to the training proposals (``add_gt_proposals``), since the
forward pass does not see them; the task's loss samples among the ``P`` proposals as torchvision samples among its
own (:mod:`kdkit.tasks.two_stage`). No pretrained weights are loaded.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.models.detector import TorchvisionPyramid
from kdkit.models.registry import register_model
from kdkit.models.retinanet import AnchorSpec

#: torchvision's RPN: decode and NMS settings (``RegionProposalNetwork`` defaults in ``FasterRCNN``).
RPN_NMS, RPN_MIN_SIZE = 0.7, 1e-3


@dataclass(frozen=True)
class TwoStageSpec:
    """The layout of a two-stage detector's output (see the module docstring).

    Attributes:
        num_classes: Object classes ``K`` (the box head scores ``K + 1``: 0 is background).
        rpn: The region proposal network's anchors (its ``num_classes`` is 1: one objectness logit per anchor).
        proposals: Proposal rows ``P`` per image.
    """

    num_classes: int
    rpn: AnchorSpec
    proposals: int

    @property
    def channels(self) -> int:
        """Channels per row ``C``: a proposal row's ``1 + 4 + (K + 1) + 4 (K + 1)`` (an anchor row uses 5)."""
        return 5 + 5 * (self.num_classes + 1)

    def split(self, dense: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The parts of ``dense`` ``(B, N + P, C)``: RPN rows ``(B, N, 5)`` (objectness, deltas), validity
        ``(B, P)`` (bool), proposal boxes ``(B, P, 4)``, class logits ``(B, P, K + 1)``, box deltas
        ``(B, P, 4 (K + 1))``."""
        k1 = self.num_classes + 1
        rpn, roi = dense[:, :-self.proposals, :5], dense[:, -self.proposals:]
        return rpn, roi[..., 0] > 0.5, roi[..., 1:5], roi[..., 5:5 + k1], roi[..., 5 + k1:5 + 5 * k1]


def rpn_coder():
    """torchvision's RPN ``BoxCoder`` (weights ``(1, 1, 1, 1)``)."""
    from torchvision.models.detection._utils import BoxCoder

    return BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))


def roi_coder():
    """torchvision's box head ``BoxCoder`` (weights ``(10, 10, 5, 5)``)."""
    from torchvision.models.detection._utils import BoxCoder

    return BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))


def propose(spec: TwoStageSpec, rpn: Tensor, anchors: Tensor, image_size: tuple[int, int],
            pre_nms_top_n: int) -> tuple[Tensor, Tensor]:
    """The proposals of each image, ``(B, P, 4)`` boxes and ``(B, P)`` validity (torchvision's ``filter_proposals``
    keeping ``P``, then padded with zero boxes flagged invalid).

    Args:
        spec: The output layout.
        rpn: ``(B, N, 5)`` objectness logits and deltas (detached by this function).
        anchors: ``(N, 4)`` from :meth:`AnchorSpec.anchors`.
        image_size: ``(height, width)`` the boxes are clipped to.
        pre_nms_top_n: Anchors kept per level (highest objectness) before the NMS.
    """
    from torchvision.ops import boxes as box_ops

    rpn = rpn.detach()
    batch = rpn.shape[0]
    boxes_out = rpn.new_zeros(batch, spec.proposals, 4)
    valid = torch.zeros(batch, spec.proposals, dtype=torch.bool, device=rpn.device)
    if rpn.is_meta:  # shapes only (validation probes the taps on the meta device): the selection needs values
        return boxes_out, valid
    objectness = rpn[..., 0]
    decoded = rpn_coder().decode_single(rpn[..., 1:].reshape(-1, 4), anchors.repeat(batch, 1)).view(batch, -1, 4)
    picks, levels, start = [], [], 0
    for level, count in enumerate(spec.rpn.level_sizes(image_size[0])):
        top = objectness[:, start:start + count].topk(min(pre_nms_top_n, count), dim=1).indices + start
        picks.append(top)
        levels.append(torch.full_like(top, level))
        start += count
    picks_all, levels_all = torch.cat(picks, 1), torch.cat(levels, 1)
    for b in range(batch):
        boxes = box_ops.clip_boxes_to_image(decoded[b, picks_all[b]], image_size)
        scores, lvl = torch.sigmoid(objectness[b, picks_all[b]]), levels_all[b]
        keep = box_ops.remove_small_boxes(boxes, RPN_MIN_SIZE)
        boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
        keep = box_ops.batched_nms(boxes, scores, lvl, RPN_NMS)[:spec.proposals]
        boxes_out[b, :keep.numel()] = boxes[keep]
        valid[b, :keep.numel()] = True
    return boxes_out, valid


class TorchvisionFasterRCNN(TorchvisionPyramid):
    """torchvision's ``RPNHead``, ``MultiScaleRoIAlign``, ``TwoMLPHead`` and ``FastRCNNPredictor`` on
    :class:`~kdkit.models.detector.TorchvisionPyramid` (as ``tv_fcos`` and ``tv_retinanet``), one dense output.

    Taps: the FCOS detectors' names (``stage1``.., ``p2``, ..), so feature terms work across the families; the
    ``logits_layout`` tells the planner its outputs are anchor and proposal rows, which the one-stage logit losses
    refuse.
    """

    logits_layout = "two_stage_detections"

    def __init__(self, *, num_classes: int, in_channels: int, widths: tuple[int, ...], fpn_width: int,
                 levels: int = 3, anchor_scale: float = 3.0, proposals: int = 64, pre_nms_top_n: int = 1000,
                 representation: int = 128, canonical_scale: int = 32, canonical_level: int = 3) -> None:
        super().__init__(in_channels=in_channels, widths=widths, fpn_width=fpn_width, levels=levels)
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.models.detection.rpn import RPNHead
        from torchvision.ops import MultiScaleRoIAlign

        # one anchor size a level (torchvision's FPN Faster R-CNN: 8 strides at strides 4-64), ``anchor_scale``
        # strides here for the 10-42 pixel objects of 48x48 scenes; ratios 0.5, 1, 2
        sizes = tuple((anchor_scale * s,) for s in self.strides)
        self.dense_spec = TwoStageSpec(num_classes, AnchorSpec(1, self.strides, sizes), proposals)
        self.pre_nms_top_n = pre_nms_top_n
        self.rpn_head = RPNHead(fpn_width, self.dense_spec.rpn.anchors_per_location)
        # torchvision maps a RoI of side 224 to level 4 (stride 16); on 48x48 scenes a side of 32 goes to p3
        self.roi_align = MultiScaleRoIAlign([str(i) for i in range(levels)], 7, 2, canonical_scale=canonical_scale,
                                            canonical_level=canonical_level)
        self.box_head = TwoMLPHead(fpn_width * 7 * 7, representation)
        self.box_predictor = FastRCNNPredictor(representation, num_classes + 1)
        self._anchors: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}

    def anchors(self, image_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The RPN's ``(N, 4)`` anchors, computed once per size, device and precision."""
        key = (image_size, device, dtype)
        if key not in self._anchors:
            self._anchors[key] = self.dense_spec.rpn.anchors(image_size, device, dtype)
        return self._anchors[key]

    def forward(self, x: Tensor) -> Tensor:
        """Anchor and proposal rows ``(B, N + P, C)`` for images ``(B, in_channels, H, W)`` (module docstring)."""
        levels = self.levels(x)
        objectness, deltas = self.rpn_head(levels)
        batch = x.shape[0]
        rows = []
        for obj, box in zip(objectness, deltas, strict=True):
            h, w = obj.shape[-2:]
            rows.append(torch.cat([obj.view(batch, -1, 1, h, w), box.view(batch, -1, 4, h, w)], dim=2)
                        .permute(0, 3, 4, 1, 2).reshape(batch, -1, 5))
        # at least float32: under bf16 autocast the proposal boxes would round to 1/4 pixel on a 48-pixel image
        rpn = torch.cat(rows, dim=1)
        dtype = torch.promote_types(rpn.dtype, torch.float32)
        rpn = rpn.to(dtype)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        proposals, valid = propose(self.dense_spec, rpn, self.anchors(size[0], x.device, rpn.dtype), size,
                                   self.pre_nms_top_n)
        features = OrderedDict((str(i), level) for i, level in enumerate(levels))
        if x.is_meta:  # shapes only: the pooler picks each RoI's level from its values
            pooled = levels[0].new_zeros(batch * self.dense_spec.proposals, levels[0].shape[1], 7, 7)
        else:
            pooled = self.roi_align(features, list(proposals), [size] * batch)
        scores, box_deltas = self.box_predictor(self.box_head(pooled))
        roi = torch.cat([valid.to(dtype).unsqueeze(-1), proposals.to(dtype),
                         scores.to(dtype).view(batch, self.dense_spec.proposals, -1),
                         box_deltas.to(dtype).view(batch, self.dense_spec.proposals, -1)], dim=-1)
        return torch.cat([F.pad(rpn, (0, self.dense_spec.channels - 5)), roi], dim=1)


@register_model("tv_faster_rcnn", help="torchvision's Faster R-CNN parts (RPN, RoIAlign, two-MLP box head) on a small "
                                       "conv backbone and FPN (strides 4-16), one dense output of anchor and "
                                       "proposal rows; no pretrained weights")
def tv_faster_rcnn(*, num_classes: int, in_channels: int = 1, width: int = 16, fpn_width: int = 32,
                   anchor_scale: float = 3.0, proposals: int = 64, representation: int = 128) -> TorchvisionFasterRCNN:
    """torchvision Faster R-CNN parts: backbone stages of ``width, 2w, 4w, 4w``, FPN levels p2-p4 of ``fpn_width``,
    one anchor of ``anchor_scale`` strides a level at ratios 0.5, 1, 2, ``proposals`` RoIs an image, a box head of
    ``representation`` features."""
    return TorchvisionFasterRCNN(num_classes=num_classes, in_channels=in_channels,
                                 widths=(width, 2 * width, 4 * width, 4 * width), fpn_width=fpn_width,
                                 anchor_scale=anchor_scale, proposals=proposals, representation=representation)
