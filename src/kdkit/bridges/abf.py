"""ReviewKD's attention-based fusion (ABF): fuses the student's stages top-down into the teacher's space.

Chen, Liu, Zhao and Jia, "Distilling Knowledge via Knowledge Review" (CVPR 2021). The student's stage
features are "reviewed": the deepest one is projected first, and each shallower stage is fused with the
(upsampled) fused result of the stage below it, so the output compared with teacher stage ``i`` carries
information from student stages ``i, i+1, ..., n``. Pair this bridge with the ``reviewkd`` loss
(:mod:`kdkit.losses.reviewkd`).

Written after the official code (``dvlab-research/ReviewKD``, ``CIFAR-100/model/reviewkd.py``), with these
choices:

* **mid_channels** -- the official code uses ``min(512, C_deepest)`` where ``C_deepest`` is the channel
  count of the student's deepest level (its pooled feature, i.e. the last stage's channels): 256 for
  resnet8x4, 64 for resnet20/32 (and any 16/32/64 CIFAR ResNet), 128 for wrn_16_2 / wrn_40_2 students,
  64 for wrn_40_1 / wrn_16_1, 512 for vgg8, ShuffleNetV1 (960), ShuffleNetV2 (1024) and MobileNetV2
  (1280). ``mid_channels=None`` (the default) applies that rule to the probed shapes; an integer
  overrides it.
* **The pooled level** -- the official CIFAR code also fuses the pooled penultimate feature as an extra,
  deepest 1x1 level (matched with the teacher's pooled feature). Supported here: add ``penultimate`` as
  the last tap on both sides; a flat ``(C,)`` tap is treated as a ``(C, 1, 1)`` map and the output is
  flattened back to the teacher's ``(C_t,)``.
* **Spatial sizes** -- each student stage must have its teacher stage's ``H x W`` (true of the
  ResNet/WRN/VGG pairs). The official code instead nearest-resizes a fused map to the teacher's size
  before the output conv (needed for ShuffleNet/MobileNet students, whose stages are half the size):
  ``resize=True`` does the same; the default raises a :class:`~kdkit.errors.KdkitError` naming it.
* The 1x1 and 3x3 convolutions use ``kaiming_uniform_(a=1)`` like the official code.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor, nn

from kdkit.bridges import register_bridge
from kdkit.errors import KdkitError


class ABF(nn.Module):
    """Attention-based fusion of one student level with the fused result of the deeper levels.

    ``x -> conv1x1 + BN (mid)``; when fusing, the deeper level's fused map is nearest-resized to this
    level's size, a 1x1 conv + sigmoid on ``[x, residual]`` gives two maps ``a0, a1`` and
    ``z = x * a0 + residual * a1``; the output is ``conv3x3 + BN (mid -> out)`` of ``z``.

    Args:
        in_channels: Student channels of this level.
        mid_channels: Channels of the fused maps (shared by all levels of a bridge).
        out_channels: Teacher channels of this level.
        fuse: Whether this level receives a residual from a deeper level (False for the deepest).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None = None,
                out_size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """Fuse and project one level.

        Args:
            x: ``(B, C_in, H, W)`` student feature of this level.
            residual: ``(B, C_mid, H', W')`` fused map ``z`` of the next deeper level (required when fusing).
            out_size: Resize ``z`` (nearest) to this ``(H_t, W_t)`` before the output conv (``resize=True``).

        Returns:
            ``(output, z)``: ``(B, C_out, H_o, W_o)`` and the fused ``(B, C_mid, H_o, W_o)`` map passed on to
            the next shallower level.
        """
        z = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("this ABF fuses a deeper level: pass its residual")
            if residual.shape[-2:] != z.shape[-2:]:
                residual = F.interpolate(residual, size=tuple(z.shape[-2:]), mode="nearest")
            att = self.att_conv(torch.cat([z, residual], dim=1))
            z = z * att[:, 0:1] + residual * att[:, 1:2]
        if out_size is not None and tuple(z.shape[-2:]) != tuple(out_size):
            z = F.interpolate(z, size=tuple(out_size), mode="nearest")
        return self.conv2(z), z


class ReviewFusion(nn.Module):
    """The ReviewKD student-side module: one :class:`ABF` per level, run deep -> shallow.

    Args:
        student_shapes: Per-sample student shapes, shallow -> deep, each ``(C, H, W)`` or ``(C,)``.
        teacher_shapes: Per-sample teacher shapes in the same order.
        mid_channels: Channels of the fused maps.
        resize: Nearest-resize each fused map to its teacher level's size before the output conv.
    """

    def __init__(self, student_shapes: list[tuple[int, ...]], teacher_shapes: list[tuple[int, ...]],
                 mid_channels: int, resize: bool = False) -> None:
        super().__init__()
        self.student_shapes = [tuple(s) for s in student_shapes]
        self.teacher_shapes = [tuple(t) for t in teacher_shapes]
        self.mid_channels = mid_channels
        self.resize = resize
        last = len(student_shapes) - 1
        # abfs[i] handles level i (shallow -> deep); every level but the deepest fuses a residual.
        pairs = zip(self.student_shapes, self.teacher_shapes, strict=True)
        self.abfs = nn.ModuleList(ABF(s[0], mid_channels, t[0], fuse=i < last) for i, (s, t) in enumerate(pairs))

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """Student stage tensors (shallow -> deep) -> fused tensors with the teacher's shapes (same order)."""
        if len(features) != len(self.abfs):
            raise ValueError(f"expected {len(self.abfs)} student tensors, got {len(features)}")
        outputs: list[Tensor] = []
        residual: Tensor | None = None
        for i in reversed(range(len(features))):
            x = features[i]
            if x.dim() == 2:  # a pooled (B, C) level is a 1x1 map
                x = x[:, :, None, None]
            teacher = self.teacher_shapes[i]
            out_size = _spatial(teacher) if self.resize else None
            out, residual = self.abfs[i](x, residual, out_size)
            outputs.append(out.flatten(1) if len(teacher) == 1 else out)
        return outputs[::-1]

    def extra_repr(self) -> str:
        return f"levels={len(self.abfs)}, mid_channels={self.mid_channels}, resize={self.resize}"


def _spatial(shape: tuple[int, ...]) -> tuple[int, int]:
    return (1, 1) if len(shape) == 1 else (shape[1], shape[2])


def _as_shapes(value: Any, side: str) -> list[tuple[int, ...]]:
    if not isinstance(value, list):
        raise KdkitError(f"bridge 'review' fuses several stages, but the {side} side is one tap of shape "
                         f"{tuple(value)}",
                         fix="give lists of taps, shallow -> deep, e.g. student: [stage1, stage2, stage3], "
                             "teacher: [stage1_preact, stage2_preact, stage3_preact]")
    shapes = [tuple(int(d) for d in s) for s in value]
    for shape in shapes:
        if len(shape) not in (1, 3):
            raise KdkitError(f"bridge 'review' needs (C, H, W) feature maps or pooled (C,) features, got a {side} "
                             f"tap of shape {shape}",
                             fix="tap stage outputs (stageN / stageN_preact) or the pooled 'penultimate'")
    return shapes


@register_bridge("review", help="ReviewKD attention-based fusion (ABF) of all student stages, top-down, "
                                "to the teacher stages' shapes (multi-tap)", fuses_taps=True,
                 example_shapes=([(4, 4, 4), (8, 2, 2), (8,)], [(6, 4, 4), (10, 2, 2), (10,)]))
def review_bridge(student_shapes: list[tuple[int, ...]], teacher_shapes: list[tuple[int, ...]],
                  mid_channels: Annotated[int, Ge(1)] | None = None, resize: bool = False) -> nn.Module:
    """ReviewKD's ABF fusion module, sized from the probed per-sample shapes of all the term's taps.

    Called once per term with the lists of shapes (``fuses_taps=True``); the module maps the list of student
    stage tensors (shallow -> deep, as listed in the recipe) to a list of tensors with the teacher taps'
    shapes, processing deep -> shallow like the official ``ReviewKD.forward``.

    Args:
        student_shapes: Student per-sample shapes, shallow -> deep: ``(C, H, W)`` maps, optionally ending
            with the pooled ``(C,)`` penultimate feature (the official CIFAR code's extra 1x1 level).
        teacher_shapes: Teacher per-sample shapes, paired in order.
        mid_channels: Channels of the fused maps; ``None`` = the official ``min(512, C)`` of the student's
            deepest level (resnet8x4: 256, resnet20: 64, wrn_16_2: 128, ShuffleNet/MobileNet: 512).
        resize: Nearest-resize fused maps to the teacher's ``H x W`` (official behaviour for ShuffleNet /
            MobileNet students); by default the sizes must already match.

    Raises:
        KdkitError: Not lists, unequal lengths, unsupported ranks, mismatched sizes, or ``mid_channels < 1``
            (the declared bound, checked by registration).
    """
    students = _as_shapes(student_shapes, "student")
    teachers = _as_shapes(teacher_shapes, "teacher")
    if not students or len(students) != len(teachers):
        raise KdkitError(f"bridge 'review' got {len(students)} student and {len(teachers)} teacher taps",
                         fix="list the same number (>= 1) of student and teacher taps; they are paired in order")
    if mid_channels is None:
        mid_channels = min(512, students[-1][0])
    if not resize:
        for i, (s, t) in enumerate(zip(students, teachers, strict=True)):
            if _spatial(s) != _spatial(t):
                raise KdkitError(f"bridge 'review': student tap #{i} has spatial size {_spatial(s)} but teacher "
                                 f"tap #{i} has {_spatial(t)}",
                                 fix="pair stages with the same H x W, or set bridge_params: {resize: true} to "
                                     "nearest-resize the fused maps to the teacher's size (the official code's "
                                     "choice for ShuffleNet/MobileNet students)")
    return ReviewFusion(students, teachers, mid_channels, resize)



__all__ = ["ABF", "ReviewFusion", "review_bridge"]
