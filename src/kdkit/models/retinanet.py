"""RetinaNet (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017) from torchvision's own head and feature
pyramid, returning kdkit's one dense tensor: anchor-based, where the FCOS-style detectors are anchor-free.

The output is ``(B, L * A, K + 4)``: for each FPN level (finest first), each location (row-major) and each of its
``A`` anchors, ``K`` class logits (sigmoid) then 4 box deltas (torchvision's ``BoxCoder`` with weights
``(1, 1, 1, 1)``) relative to the anchor. This is the order torchvision's ``RetinaNetHead`` produces, so the head's
``cls_logits`` and ``bbox_regression`` are concatenated as they come. The model declares the layout as
``model.dense_spec`` (an :class:`AnchorSpec`); the detection task reads it to match anchors, compute the loss and
decode (:mod:`kdkit.tasks.anchors`).

torchvision's ``RetinaNet`` model takes lists of images and returns losses or detections, which the engine, taps and
teacher cache cannot carry; its parts (``RetinaNetHead``, ``FeaturePyramidNetwork``) are plain modules. No pretrained
weights are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdkit.models.detector import TorchvisionPyramid, grid_sides
from kdkit.models.registry import register_model


@dataclass(frozen=True)
class AnchorSpec:
    """The anchors and channel layout of an anchor-based detector's output (RetinaNet's).

    Attributes:
        num_classes: Class logits ``K`` per anchor.
        strides: Stride in pixels of each FPN level, finest first.
        sizes: Per level, the anchor sizes (square-root of the area, pixels).
        aspect_ratios: Height / width ratios; every level has ``len(sizes[l]) * len(aspect_ratios)`` anchors per
            location.
    """

    num_classes: int
    strides: tuple[int, ...]
    sizes: tuple[tuple[float, ...], ...]
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.strides) or len({len(s) for s in self.sizes}) != 1:
            raise ValueError(f"one tuple of anchor sizes per level, all of one length; got {self.sizes} for "
                             f"strides {self.strides}")

    @property
    def anchors_per_location(self) -> int:
        """``A``: anchors at each location of every level."""
        return len(self.sizes[0]) * len(self.aspect_ratios)

    @property
    def channels(self) -> int:
        """Channels per anchor: ``K`` class logits then 4 box deltas."""
        return self.num_classes + 4

    def grid_sizes(self, image_size: int) -> list[int]:
        """Side of each level's square grid (:func:`~kdkit.models.detector.grid_sides`)."""
        return grid_sides(self.strides, image_size)

    def level_sizes(self, image_size: int) -> list[int]:
        """Rows of the output each level holds: ``H_l * W_l * A``."""
        return [side * side * self.anchors_per_location for side in self.grid_sizes(image_size)]

    def anchors(self, image_size: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> Tensor:
        """``(L * A, 4)`` anchors ``x0, y0, x1, y1`` in output order, as torchvision's ``AnchorGenerator``.

        Per level, the cell anchors are ``round([-w, -h, w, h] / 2)`` with ``h = size * sqrt(ratio)``,
        ``w = size / sqrt(ratio)`` (ratio-major, size-minor), shifted to each location's top-left corner
        ``(j * stride, i * stride)``.
        """
        rows = []
        h_ratios = torch.sqrt(torch.as_tensor(self.aspect_ratios, dtype=dtype, device=device))
        for stride, side, sizes in zip(self.strides, self.grid_sizes(image_size), self.sizes, strict=True):
            scales = torch.as_tensor(sizes, dtype=dtype, device=device)
            ws = ((1 / h_ratios)[:, None] * scales[None, :]).reshape(-1)
            hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
            cell = (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()
            shift = torch.arange(side, device=device, dtype=torch.int32).to(dtype) * stride
            y, x = torch.meshgrid(shift, shift, indexing="ij")
            shifts = torch.stack([x.reshape(-1), y.reshape(-1), x.reshape(-1), y.reshape(-1)], dim=1)
            rows.append((shifts.view(-1, 1, 4) + cell.view(1, -1, 4)).reshape(-1, 4))
        return torch.cat(rows)

    def split(self, dense: Tensor) -> tuple[Tensor, Tensor]:
        """``(class logits (..., K), box deltas (..., 4))`` of ``dense``."""
        return dense[..., :self.num_classes], dense[..., self.num_classes:]


class TorchvisionRetinaNet(TorchvisionPyramid):
    """torchvision's ``RetinaNetHead`` on :class:`~kdkit.models.detector.TorchvisionPyramid` (as ``tv_fcos``).

    Its taps (``stage1``.., ``p2``, ``p3``, ..) have the names the FCOS-style detectors use, so feature terms between
    the two families need no renaming. ``logits_layout`` tells the planner its outputs are per anchor: the
    FCOS-layout logit losses (LD, BCKD, ..) refuse them before training.
    """

    logits_layout = "anchor_detections"

    def __init__(self, *, num_classes: int, in_channels: int, widths: tuple[int, ...], fpn_width: int,
                 levels: int = 3, anchor_scale: float = 3.0) -> None:
        super().__init__(in_channels=in_channels, widths=widths, fpn_width=fpn_width, levels=levels)
        from torchvision.models.detection.retinanet import RetinaNetHead

        # torchvision's sizes are 4 strides x 2^(0, 1/3, 2/3) at strides 8-128; ``anchor_scale`` strides (3 by
        # default) fit the 10-42 pixel objects of 48x48 scenes at strides 4-16
        sizes = tuple(tuple(anchor_scale * s * 2 ** (k / 3) for k in range(3)) for s in self.strides)
        self.dense_spec = AnchorSpec(num_classes, self.strides, sizes)
        self.head = RetinaNetHead(fpn_width, self.dense_spec.anchors_per_location, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Dense predictions ``(B, L * A, K + 4)`` for images ``(B, in_channels, H, W)``."""
        out = self.head(self.levels(x))
        return torch.cat([out["cls_logits"], out["bbox_regression"]], dim=-1)


@register_model("tv_retinanet", help="torchvision's RetinaNet head and FPN on a small conv backbone (strides 4-16, "
                                     "9 anchors a location), one dense output; no pretrained weights")
def tv_retinanet(*, num_classes: int, in_channels: int = 1, width: int = 16, fpn_width: int = 32,
                 anchor_scale: float = 3.0) -> TorchvisionRetinaNet:
    """torchvision RetinaNet parts: backbone stages of ``width, 2w, 4w, 4w``, FPN levels p2-p4 of ``fpn_width``,
    anchors of ``anchor_scale`` strides times ``2^(0, 1/3, 2/3)``, aspect ratios 0.5, 1, 2."""
    return TorchvisionRetinaNet(num_classes=num_classes, in_channels=in_channels,
                                widths=(width, 2 * width, 4 * width, 4 * width), fpn_width=fpn_width,
                                anchor_scale=anchor_scale)
