"""Dense (FCOS-style) detectors whose output is one tensor: per-location predictions over every FPN level.

A detector returns ``(B, L, C)`` where ``L`` sums the ``H_l x W_l`` locations of each FPN level (level by
level, row-major) and each location's ``C`` channels are, in order (see :class:`DenseSpec`):

* ``K`` class logits (sigmoid, one per class);
* box regression: 4 distances (left, top, right, bottom; ``exp(raw) * stride`` pixels), or, with
  ``box_bins = n > 0``, 4 distributions of ``n + 1`` logits over the distances ``0, 1, .., n`` strides
  (General Focal Loss's discretised regression: the distance is the distribution's expectation);
* 1 centerness logit.

``tv_fcos`` builds the same output from torchvision's own FCOS head and feature pyramid classes.

The model declares this layout as ``model.dense_spec`` (a :class:`DenseSpec`); the detection task reads it to
place the locations, assign targets and decode boxes. The engine, taps and teacher cache see one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.models.registry import register_model


def grid_sides(strides: tuple[int, ...], image_size: int) -> list[int]:
    """Side of each level's square grid for ``image_size x image_size`` inputs: ceil division by the level's stride,
    as convs with padding and ceil-mode pooling give."""
    return [-(-image_size // s) for s in strides]


@dataclass(frozen=True)
class DenseSpec:
    """The geometry and channel layout of a dense detector's output.

    Attributes:
        num_classes: Class logits ``K`` per location.
        strides: Stride in pixels of each FPN level, finest first.
        size_ranges: Per level, the ``(low, high]`` range of a location's largest regression distance
            (pixels) that the level is responsible for (FCOS's scale assignment).
        box_bins: 0 for 4 direct distances; ``n > 0`` for 4 distributions over ``0..n`` strides (GFL).
        box_coding: How 4 direct distances are coded: ``exp`` (``exp(raw) * stride``, FCOS's paper) or ``linear``
            (``raw * stride``, torchvision's FCOS, whose head already applies a ReLU).
    """

    num_classes: int
    strides: tuple[int, ...]
    size_ranges: tuple[tuple[float, float], ...]
    box_bins: int = 0
    box_coding: str = "exp"

    @property
    def box_channels(self) -> int:
        """Channels of the box regression per location: 4, or ``4 * (box_bins + 1)``."""
        return 4 * (self.box_bins + 1) if self.box_bins else 4

    @property
    def channels(self) -> int:
        """Channels ``C`` per location: classes, box regression, centerness."""
        return self.num_classes + self.box_channels + 1

    def grid_sizes(self, image_size: int) -> list[int]:
        """Side of each level's square grid for ``image_size x image_size`` inputs (:func:`grid_sides`)."""
        return grid_sides(self.strides, image_size)

    def locations(self, image_size: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Tensor:
        """``(L, 5)`` per location: centre ``x, y`` (pixels, ``(j + 0.5) * stride``), stride, size-range low, high."""
        rows = []
        for stride, side, (low, high) in zip(self.strides, self.grid_sizes(image_size), self.size_ranges, strict=True):
            centre = (torch.arange(side, device=device, dtype=dtype) + 0.5) * stride
            y, x = torch.meshgrid(centre, centre, indexing="ij")
            consts = torch.tensor([stride, low, high], device=device, dtype=dtype).expand(side * side, 3)
            rows.append(torch.cat([x.reshape(-1, 1), y.reshape(-1, 1), consts], dim=1))
        return torch.cat(rows)

    def split(self, dense: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(class logits (..., K), box regression (..., box_channels), centerness logit (...))`` of ``dense``."""
        k, b = self.num_classes, self.box_channels
        return dense[..., :k], dense[..., k:k + b], dense[..., k + b]

    def distances(self, box: Tensor, stride: Tensor) -> Tensor:
        """Left/top/right/bottom distances in pixels ``(..., 4)`` from the box regression ``(..., box_channels)``
        and each location's stride (broadcast against ``(...)``)."""
        if self.box_bins:
            probs = box.unflatten(-1, (4, self.box_bins + 1)).softmax(-1)
            bins = torch.arange(self.box_bins + 1, device=box.device, dtype=probs.dtype)
            return (probs * bins).sum(-1) * stride.unsqueeze(-1)
        if self.box_coding == "linear":
            return box * stride.unsqueeze(-1)
        # exp as FCOS, clamped so a wild early step cannot overflow (e^8 strides is far past any canvas)
        return torch.exp(box.clamp(max=8.0)) * stride.unsqueeze(-1)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(_conv_bn_relu(cin, cout), _conv_bn_relu(cout, cout), nn.MaxPool2d(2, ceil_mode=True))


class TinyFPN(nn.Module):
    """A feature pyramid (Lin et al., CVPR 2017): 1x1 laterals, nearest top-down upsampling, 3x3 outputs.

    The outputs are the modules ``out.0``, ``out.1``, .. (finest first), so each level is a tap.
    """

    def __init__(self, in_channels: list[int], width: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.out = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in in_channels)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """Pyramid maps, finest first, each ``width`` channels at its input's resolution."""
        merged = [self.lateral[-1](features[-1])]
        for lateral, feature in zip(reversed(self.lateral[:-1]), reversed(features[:-1]), strict=True):
            top = F.interpolate(merged[0], size=feature.shape[-2:], mode="nearest")
            merged.insert(0, lateral(feature) + top)
        return [conv(m) for conv, m in zip(self.out, merged, strict=True)]


class FCOSHead(nn.Module):
    """FCOS's shared head (Tian et al., ICCV 2019): a class tower and a box tower (conv-GroupNorm-ReLU), class
    logits from the first, box regression and centerness from the second (as torchvision's FCOS)."""

    def __init__(self, width: int, spec: DenseSpec, depth: int = 2) -> None:
        super().__init__()

        def tower() -> nn.Sequential:
            layers: list[nn.Module] = []
            for _ in range(depth):
                layers += [nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(min(8, width), width), nn.ReLU()]
            return nn.Sequential(*layers)

        self.cls_tower, self.box_tower = tower(), tower()
        self.cls_logits = nn.Conv2d(width, spec.num_classes, 3, padding=1)
        self.box_pred = nn.Conv2d(width, spec.box_channels, 3, padding=1)
        self.centerness = nn.Conv2d(width, 1, 3, padding=1)
        # focal-loss prior (RetinaNet): every class starts at probability 0.01, so the many background
        # locations do not swamp the first steps
        nn.init.constant_(self.cls_logits.bias, -4.59511985)

    def forward(self, level: Tensor) -> Tensor:
        """``(B, H*W, C)`` predictions of one level ``(B, width, H, W)``."""
        box_features = self.box_tower(level)
        maps = torch.cat([self.cls_logits(self.cls_tower(level)), self.box_pred(box_features),
                          self.centerness(box_features)], dim=1)
        return maps.flatten(2).transpose(1, 2)


class TinyFCOS(nn.Module):
    """A small FCOS-style detector: a CNN backbone of conv stages, a :class:`TinyFPN` on the last three, and
    one :class:`FCOSHead` shared by the levels; output ``(B, L, C)`` as the module docstring says.

    Taps: ``stage1``.. (backbone stages) and ``p2``, ``p3``, .. (FPN levels, ``p<l>`` at stride ``2**l``).

    Args:
        num_classes: Object classes ``K``.
        in_channels: Image channels.
        widths: Channels of the backbone stages (each halves the resolution); the FPN reads the last three.
        fpn_width: Channels of the FPN levels and the head.
        box_bins: 0 for direct distances, ``n > 0`` for GFL distributions (see :class:`DenseSpec`).
        size_ranges: The FCOS scale range of each level (pixels).
    """

    def __init__(self, *, num_classes: int, in_channels: int, widths: tuple[int, ...], fpn_width: int,
                 box_bins: int = 0, size_ranges: tuple[tuple[float, float], ...]) -> None:
        super().__init__()
        chans = [in_channels, *widths]
        self.stages = nn.ModuleList(_stage(a, b) for a, b in pairwise(chans))
        levels = len(size_ranges)
        strides = tuple(2 ** (i + 1) for i in range(len(widths)))[-levels:]
        self.dense_spec = DenseSpec(num_classes, strides, tuple(size_ranges), box_bins)
        self.fpn = TinyFPN(list(widths[-levels:]), fpn_width)
        self.head = FCOSHead(fpn_width, self.dense_spec)
        self.feature_taps = {f"stage{i + 1}": f"stages.{i}" for i in range(len(widths))}
        self.feature_taps.update({f"p{s.bit_length() - 1}": f"fpn.out.{i}" for i, s in enumerate(strides)})

    def forward(self, x: Tensor) -> Tensor:
        """Dense predictions ``(B, L, C)`` for images ``(B, in_channels, H, W)``."""
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        levels = self.fpn(features[-len(self.dense_spec.strides):])
        return torch.cat([self.head(level) for level in levels], dim=1)


#: Scale ranges for 48x48 scenes (objects of ~10-42 pixels) at strides 4, 8, 16: FCOS's rule (a level takes
#: the locations whose largest distance lies in ``(4 s, 8 s]``) halved, so the three levels share the objects.
SCENE_RANGES = ((0.0, 16.0), (16.0, 32.0), (32.0, float("inf")))


@register_model("det_teacher", help="small FCOS-style detector teacher (4 stages 16-64 ch, FPN 32 ch, strides 4-16)")
def det_teacher(*, num_classes: int, in_channels: int = 1, width: int = 16, fpn_width: int = 32,
                box_bins: int = 0) -> TinyFCOS:
    """FCOS-style teacher: stages of ``width, 2w, 4w, 4w`` channels, FPN levels p2-p4 of ``fpn_width``."""
    return TinyFCOS(num_classes=num_classes, in_channels=in_channels, widths=(width, 2 * width, 4 * width, 4 * width),
                    fpn_width=fpn_width, box_bins=box_bins, size_ranges=SCENE_RANGES)


@register_model("det_student", help="small FCOS-style detector student (4 stages 8-32 ch, FPN 16 ch, strides 4-16)")
def det_student(*, num_classes: int, in_channels: int = 1, width: int = 8, fpn_width: int = 16,
                box_bins: int = 0) -> TinyFCOS:
    """FCOS-style student: the teacher's layout at half the widths (same strides, so the dense outputs align)."""
    return TinyFCOS(num_classes=num_classes, in_channels=in_channels, widths=(width, 2 * width, 4 * width, 4 * width),
                    fpn_width=fpn_width, box_bins=box_bins, size_ranges=SCENE_RANGES)


class TorchvisionPyramid(nn.Module):
    """A small conv backbone and torchvision's ``FeaturePyramidNetwork`` on its last ``levels`` stages: the body that
    the detectors built from torchvision's heads (``tv_fcos``, ``tv_retinanet``, ``tv_faster_rcnn``) share.

    Taps: ``stage1``.. (backbone) and ``p2``, ``p3``, .. (the FPN's output convs ``fpn.layer_blocks.<i>``).
    """

    def __init__(self, *, in_channels: int, widths: tuple[int, ...], fpn_width: int, levels: int) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        chans = [in_channels, *widths]
        self.stages = nn.ModuleList(_stage(a, b) for a, b in pairwise(chans))
        self.strides = tuple(2 ** (i + 1) for i in range(len(widths)))[-levels:]
        self.fpn = FeaturePyramidNetwork(list(widths[-levels:]), fpn_width)
        self.feature_taps = {f"stage{i + 1}": f"stages.{i}" for i in range(len(widths))}
        self.feature_taps.update({f"p{s.bit_length() - 1}": f"fpn.layer_blocks.{i}"
                                  for i, s in enumerate(self.strides)})

    def levels(self, x: Tensor) -> list[Tensor]:
        """The FPN's maps, finest first, for images ``(B, in_channels, H, W)``."""
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        picked = features[-len(self.strides):]
        return list(self.fpn({str(i): f for i, f in enumerate(picked)}).values())


class TorchvisionFCOS(TorchvisionPyramid):
    """torchvision's FCOS head (``torchvision.models.detection.fcos.FCOSHead``) and feature pyramid
    (``torchvision.ops.FeaturePyramidNetwork``) on a small conv backbone, returning kdkit's one dense tensor.

    torchvision's ``FCOS`` model takes lists of images and returns losses or detections, which the engine, taps and
    teacher cache cannot carry; its parts are plain modules. The output concatenates the head's ``cls_logits``,
    ``bbox_regression`` (ReLU'd, ``linear`` coding: distances in strides, torchvision's box coder with anchors of
    one stride) and ``bbox_ctrness``. No pretrained weights are loaded. Taps: :class:`TorchvisionPyramid`'s.
    """

    def __init__(self, *, num_classes: int, in_channels: int, widths: tuple[int, ...], fpn_width: int,
                 size_ranges: tuple[tuple[float, float], ...], head_convs: int = 2) -> None:
        super().__init__(in_channels=in_channels, widths=widths, fpn_width=fpn_width, levels=len(size_ranges))
        from torchvision.models.detection.fcos import FCOSHead as TVFCOSHead

        self.dense_spec = DenseSpec(num_classes, self.strides, tuple(size_ranges), 0, "linear")
        self.head = TVFCOSHead(fpn_width, num_anchors=1, num_classes=num_classes, num_convs=head_convs)

    def forward(self, x: Tensor) -> Tensor:
        """Dense predictions ``(B, L, K + 4 + 1)`` for images ``(B, in_channels, H, W)``."""
        out = self.head(self.levels(x))
        return torch.cat([out["cls_logits"], out["bbox_regression"], out["bbox_ctrness"]], dim=-1)


@register_model("tv_fcos", help="torchvision's FCOS head and FPN on a small conv backbone (strides 4-16), one "
                                "dense output; no pretrained weights")
def tv_fcos(*, num_classes: int, in_channels: int = 1, width: int = 16, fpn_width: int = 32,
            head_convs: int = 2) -> TorchvisionFCOS:
    """torchvision FCOS parts: backbone stages of ``width, 2w, 4w, 4w``; ``fpn_width`` a multiple of 32 (the head's
    GroupNorm has 32 groups)."""
    return TorchvisionFCOS(num_classes=num_classes, in_channels=in_channels,
                           widths=(width, 2 * width, 4 * width, 4 * width), fpn_width=fpn_width,
                           size_ranges=SCENE_RANGES, head_convs=head_convs)
