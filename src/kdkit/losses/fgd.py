"""FGD: focal and global knowledge distillation for detectors, on FPN feature maps, with the GT boxes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.losses.base import DistillLoss, compute_dtype, register_loss, run_widened


def box_masks(boxes: Tensor, height: int, width: int, layout: Literal["paper", "official"] = "paper") -> tuple[
        Tensor, Tensor]:
    r"""FGD's foreground scale mask and normalised background mask of each image, ``(B, H, W)`` each.

    A foreground cell of box :math:`r` (covering :math:`H_r \times W_r` cells) gets :math:`1 / (H_r W_r)`, the largest
    over the boxes that cover it; background cells get :math:`1 / N_{bg}` (0 when there are none).

    Args:
        boxes: ``(B, M, 5)`` detection targets: boxes ``x0, y0, x1, y1`` as fractions of the image, then the label
            (-1 marks padding).
        height: Feature map rows :math:`H`.
        width: Feature map columns :math:`W`.
        layout: ``"paper"``: the cells a box overlaps (rows ``floor(y0 H)`` to ``ceil(y1 H) - 1``, columns likewise).
            ``"official"``: as the official code does it: ``floor``/``ceil`` with the end cell included
            (one more row and column) and the x range indexing the rows, y the columns (transposed).
    """
    valid = boxes[..., 4] >= 0  # (B, M)
    x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
    if layout == "official":
        # rows from x, columns from y, ends inclusive (the official code slices Mask[wmin:wmax + 1, hmin:hmax + 1])
        r0, r1 = (x0 * width).floor(), (x1 * width).ceil() + 1
        c0, c1 = (y0 * height).floor(), (y1 * height).ceil() + 1
    else:
        r0, r1 = (y0 * height).floor(), (y1 * height).ceil()
        c0, c1 = (x0 * width).floor(), (x1 * width).ceil()
    area = 1.0 / ((r1 - r0) * (c1 - c0)).clamp(min=1)  # the official code's area: also from the unclipped ranges
    rows = torch.arange(height, device=boxes.device, dtype=boxes.dtype).view(1, 1, -1, 1)
    cols = torch.arange(width, device=boxes.device, dtype=boxes.dtype).view(1, 1, 1, -1)
    inside = ((rows >= r0[..., None, None]) & (rows < r1[..., None, None]) & (cols >= c0[..., None, None])
              & (cols < c1[..., None, None]) & valid[..., None, None])  # (B, M, H, W)
    fg = torch.where(inside, area[..., None, None], torch.zeros_like(area)[..., None, None]).amax(1)
    bg = (fg == 0).to(boxes.dtype)
    bg = bg / bg.sum((1, 2), keepdim=True).clamp(min=1)
    return fg, bg


def attention(feature: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    r"""FGD's spatial attention :math:`A^S = HW\,\mathrm{softmax}(\frac{1}{C}\sum_c |F_c| / T)` ``(B, H, W)`` and
    channel attention :math:`A^C = C\,\mathrm{softmax}(\frac{1}{HW}\sum_{ij} |F_{ij}| / T)` ``(B, C)``."""
    b, c, h, w = feature.shape
    value = feature.abs()
    spatial = h * w * F.softmax((value.mean(1) / temperature).view(b, -1), dim=1).view(b, h, w)
    channel = c * F.softmax(value.mean((2, 3)) / temperature, dim=1)
    return spatial, channel


class GlobalContext(nn.Module):
    r"""FGD's relation module, a GcBlock (Cao et al., 2019): :math:`R(F) = F + W_{v2}\,\mathrm{ReLU}(\mathrm{LN}(
    W_{v1} \sum_j \mathrm{softmax}_j(W_k F)\, F_j))` (1x1 convs; the last one starts at zero, as the official code)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(channels // 2, 1)
        self.key = nn.Conv2d(channels, 1, 1)
        nn.init.kaiming_normal_(self.key.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.key.bias)
        self.transform = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.LayerNorm([hidden, 1, 1]), nn.ReLU(),
                                       nn.Conv2d(hidden, channels, 1))
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        """``R(x)``, the same shape as ``x`` ``(B, C, H, W)``."""
        weights = F.softmax(self.key(x).flatten(2), dim=2)  # (B, 1, HW)
        context = torch.einsum("bcn,bkn->bc", x.flatten(2), weights)[..., None, None]
        return x + self.transform(context)


def fgd_focal_terms(student: Tensor, teacher: Tensor, fg: Tensor, bg: Tensor, temperature: float) -> tuple[
        Tensor, Tensor, Tensor]:
    r"""FGD's focal terms ``(L_fg, L_bg, L_at)`` per image (summed over cells and channels, divided by the batch).

    .. math::
        L_{fg} = \tfrac1B\sum M^{fg}_{ij} A^S_{t,ij} A^C_{t,k} (F^T_{kij} - F^S_{kij})^2,\quad
        L_{bg} = \text{the same with } M^{bg},\quad
        L_{at} = \tfrac1B\big(\textstyle\sum |A^S_t - A^S_s| + \sum |A^C_t - A^C_s|\big)
    """
    spatial_t, channel_t = attention(teacher, temperature)
    spatial_s, channel_s = attention(student, temperature)
    weight = spatial_t.unsqueeze(1) * channel_t[..., None, None] * (teacher - student).pow(2)  # (B, C, H, W)
    b = student.shape[0]
    fg_loss = (weight * fg.unsqueeze(1)).sum() / b
    bg_loss = (weight * bg.unsqueeze(1)).sum() / b
    at_loss = ((spatial_s - spatial_t).abs().sum() + (channel_s - channel_t).abs().sum()) / b
    return fg_loss, bg_loss, at_loss


@register_loss("fgd", help="FGD: focal (GT-box fg/bg masks, spatial + channel attention) and global (GcBlock) "
                           "feature distillation for detectors (CVPR 2022)")
class FGDLoss(DistillLoss):
    r"""Yang, Li, Jiang, Zhang, Ye, Yuan and Li, "Focal and Global Knowledge Distillation for Detectors" (CVPR 2022).

    On each FPN level (a list of taps: one set of modules per level, as the official code has one loss per level),
    with :math:`F^S` the student map through a 1x1 ``align`` conv when the widths differ:

    .. math:: L = \alpha L_{fg} + \beta L_{bg} + \gamma L_{at} + \lambda L_{global},\qquad
              L_{global} = \tfrac1B \sum \big(R_t(F^T) - R_s(F^S)\big)^2

    with the focal terms of :func:`fgd_focal_terms`, the masks of :func:`box_masks` from the GT boxes (the
    detection task's targets, which every loss receives as ``labels``) and :class:`GlobalContext` as :math:`R`.
    The defaults are the paper's RetinaNet settings (:math:`T = 0.5`, :math:`\alpha = 10^{-3}`,
    :math:`\beta = 5\cdot10^{-4}`, :math:`\gamma = 10^{-3}`, :math:`\lambda = 5\cdot10^{-6}`).

    Paper vs official code (``yzd-v/FGD``, ``mmdet/distillation/losses/fgd.py``):

    * **Mask layout** (``box_mask``): the paper marks the cells of each box; the code floors/ceils the scaled box,
      includes the end cell and indexes the mask rows with the x range (a transposition, harmless only for
      boxes symmetric about the diagonal). Default ``paper``; ``official`` reproduces the code.
    * **Relation module** (``relation``): the paper writes one :math:`R`; the code has separate GcBlocks for
      the student and the teacher (both trained by the loss). Default ``separate`` (the code); ``shared`` uses one.

    Shapes: student and teacher ``(B, C, H, W)`` (or lists, one per level), labels ``(B, M, 5)``.

    Args:
        temperature: :math:`T` of the spatial and channel attentions.
        alpha: Weight of the foreground term :math:`L_{fg}`.
        beta: Weight of the background term :math:`L_{bg}`.
        gamma: Weight of the attention term :math:`L_{at}`.
        lambda_: Weight of the global relation term :math:`L_{global}`.
        box_mask: ``paper`` (the cells of each box) or ``official`` (the code's transposed, widened mask).
        relation: ``separate`` GcBlocks for student and teacher (the code) or one ``shared`` (the paper's formula).
    """

    uses_labels = True  # it reads the GT boxes (the task's targets)
    pairwise = False  # one set of modules per level
    default_student_tap = "p2"
    default_teacher_tap = "p2"

    def __init__(self, *, temperature: Annotated[float, Gt(0)] = 0.5, alpha: Annotated[float, Ge(0)] = 1e-3,
                 beta: Annotated[float, Ge(0)] = 5e-4, gamma: Annotated[float, Ge(0)] = 1e-3,
                 lambda_: Annotated[float, Ge(0)] = 5e-6, box_mask: Literal["paper", "official"] = "paper",
                 relation: Literal["separate", "shared"] = "separate") -> None:
        super().__init__()
        self.temperature, self.alpha, self.beta, self.gamma, self.lambda_ = temperature, alpha, beta, gamma, lambda_
        self.box_mask, self.relation = box_mask, relation
        self.align = nn.ModuleList()
        self.global_s = nn.ModuleList()
        self.global_t = nn.ModuleList()

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """Two FPN levels: a 4-channel student and an 8-channel teacher (so the align conv is exercised)."""
        return [(4, 8, 8), (4, 4, 4)], [(8, 8, 8), (8, 4, 4)]

    @classmethod
    def example_inputs(cls, batch: int, generator: torch.Generator | None = None) -> tuple[Any, Any, Tensor, Tensor]:
        """Random maps and, per image, one box and one padding row (targets ``(B, 2, 5)``)."""
        student, teacher, _, index = super().example_inputs(batch, generator)
        corner = torch.rand(batch, 2, generator=generator) * 0.5
        size = 0.1 + torch.rand(batch, 2, generator=generator) * 0.4
        boxes = torch.zeros(batch, 2, 5)
        boxes[:, 0, :2], boxes[:, 0, 2:4], boxes[:, 0, 4] = corner, corner + size, 1.0
        boxes[:, 1, 4] = -1.0
        return student, teacher, boxes, index

    def check_shapes(self, student: Any, teacher: Any) -> str | None:
        """Each level's maps must have the same spatial size (the widths may differ: ``align`` maps them)."""
        pairs = zip(student, teacher, strict=False) if isinstance(student, list) else [(student, teacher)]
        if isinstance(student, list) and len(student) != len(teacher):
            return f"{len(student)} student levels but {len(teacher)} teacher levels"
        for s, t in pairs:
            if len(s) != 3 or tuple(s[1:]) != tuple(t[1:]):
                return f"FGD compares (C, H, W) maps of one size; got student {tuple(s)} and teacher {tuple(t)}"
        return None

    def setup(self, student_shape: Any, teacher_shape: Any, num_samples: int) -> None:
        """One align conv (identity when the widths agree) and the GcBlocks per level."""
        pairs = zip(student_shape, teacher_shape, strict=True) if isinstance(student_shape, list) \
            else [(student_shape, teacher_shape)]
        for s, t in pairs:
            self.align.append(nn.Conv2d(s[0], t[0], 1) if s[0] != t[0] else nn.Identity())
            self.global_s.append(GlobalContext(t[0]))
            self.global_t.append(GlobalContext(t[0]) if self.relation == "separate" else nn.Identity())

    def level(self, i: int, student: Tensor, teacher: Tensor, boxes: Tensor) -> Tensor:
        """FGD on level ``i``."""
        dtype = compute_dtype(student, teacher, *(p for p in self.parameters()))
        student = run_widened(self.align[i], student.to(dtype)) if not isinstance(self.align[i], nn.Identity) \
            else student.to(dtype)
        teacher = teacher.to(dtype)
        fg, bg = box_masks(boxes.to(dtype), teacher.shape[2], teacher.shape[3], self.box_mask)
        fg_loss, bg_loss, at_loss = fgd_focal_terms(student, teacher, fg, bg, self.temperature)
        relation_t = self.global_t[i] if self.relation == "separate" else self.global_s[i]
        rel = (run_widened(relation_t, teacher) - run_widened(self.global_s[i], student)).pow(2).sum() / len(student)
        return self.alpha * fg_loss + self.beta * bg_loss + self.gamma * at_loss + self.lambda_ * rel

    def forward(self, student: Tensor | list[Tensor], teacher: Tensor | list[Tensor], labels: Tensor) -> Tensor:
        """The sum over the levels of FGD; ``labels`` are the detection targets ``(B, M, 5)``."""
        if labels.ndim != 3 or labels.shape[-1] != 5:
            raise KdkitError(f"fgd reads the GT boxes of the detection task's targets (B, M, 5), got targets of "
                             f"shape {tuple(labels.shape)}", fix="use fgd with task: detection", where="distill")
        if not isinstance(student, list):
            student, teacher = [student], [teacher]
        return torch.stack([self.level(i, s, t, labels) for i, (s, t) in enumerate(zip(student, teacher,
                                                                                       strict=True))]).sum()
