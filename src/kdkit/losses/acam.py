r"""ACAM-KD: masked feature distillation with masks generated from a student-teacher cross-attention fusion.

Lan and Tian, "ACAM-KD: Adaptive and Cooperative Attention Masking for Knowledge Distillation" (ICCV 2025,
arXiv 2503.06307). No official code is published; the masked loss and the Dice diversity term follow MasKD
(Huang et al., ICLR 2023, ``hunto/MasKD``), on which the paper builds its masks. The equations here were checked
against two transcriptions of the paper's method section and an excerpt of its loss equations (the mask-sum
normalisers), not against the full text, which could not be read when this was written.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.losses.base import DistillLoss, compute_dtype, register_loss, run_widened


def cross_attention_fusion(query_map: Tensor, key_map: Tensor, w_q: Tensor, w_k: Tensor, w_v: Tensor) -> Tensor:
    r"""STCA-FF: :math:`F_{fused} = A V`, :math:`A = \mathrm{softmax}(Q^\top K / \sqrt{C_q})` over the key positions.

    With :math:`Q = W_q F_q`, :math:`K = W_k F_{kv}`, :math:`V = W_v F_{kv}` (1x1 projections without bias, the
    paper's matrices), each output position :math:`p` is :math:`\sum_{p'} A_{pp'} V_{:, p'}`.

    Args:
        query_map: ``(B, C, H, W)`` the map the queries come from (the teacher's, in the paper).
        key_map: ``(B, C, H, W)`` the map the keys and values come from (the aligned student's).
        w_q: ``(C_q, C)`` :math:`W_q`.
        w_k: ``(C_q, C)`` :math:`W_k`.
        w_v: ``(C, C)`` :math:`W_v`.

    Returns:
        ``(B, C, H, W)`` the fused map.
    """
    b, _, h, w = query_map.shape
    q = torch.einsum("qc,bcn->bqn", w_q, query_map.flatten(2))
    k = torch.einsum("qc,bcn->bqn", w_k, key_map.flatten(2))
    v = torch.einsum("oc,bcn->bon", w_v, key_map.flatten(2))
    attention = F.softmax(torch.einsum("bqn,bqm->bnm", q, k) / math.sqrt(w_q.shape[0]), dim=-1)  # (B, HW, HW)
    return torch.einsum("bnm,bcm->bcn", attention, v).reshape(b, -1, h, w)


def selection_masks(fused: Tensor, channel_units: Tensor, spatial_units: Tensor) -> tuple[Tensor, Tensor]:
    r"""ASCM: :math:`M^c = \sigma(m^c\, v)` ``(B, M, C)`` and :math:`M^s = \sigma(m^s z)` ``(B, M, HW)``.

    :math:`v \in \mathbb R^{1\times C}` is the spatial mean of the fused map, :math:`z \in \mathbb R^{C\times HW}`
    the flattened map; :math:`m^c \in \mathbb R^{M\times 1}` (one scalar per channel mask, as the paper writes it)
    and :math:`m^s \in \mathbb R^{M\times C}` (one token per spatial mask, as MasKD's receptive tokens).

    Args:
        fused: ``(B, C, H, W)`` the fused map.
        channel_units: ``(M,)`` :math:`m^c`.
        spatial_units: ``(M, C)`` :math:`m^s`.
    """
    pooled = fused.mean((2, 3))  # (B, C)
    channel = torch.sigmoid(channel_units[None, :, None] * pooled[:, None, :])
    spatial = torch.sigmoid(torch.einsum("mc,bcn->bmn", spatial_units, fused.flatten(2)))
    return channel, spatial


def masked_distillation(student: Tensor, teacher: Tensor, channel: Tensor, spatial: Tensor) -> tuple[Tensor, Tensor]:
    r"""The channel and spatial masked losses, averaged over the masks and the images.

    .. math::
        L^c = \frac1M\sum_{m=1}^M \frac{\sum_{k,p} \big(M^c_{m,k}(F^T_{kp} - F^S_{kp})\big)^2}{HW\sum_k M^c_{m,k}},
        \qquad
        L^s = \frac1M\sum_{m=1}^M \frac{\sum_{k,p} \big(M^s_{m,p}(F^T_{kp} - F^S_{kp})\big)^2}{C\sum_p M^s_{m,p}}

    (the paper's equations; MasKD's code computes :math:`L^s` this way: the masked squared error summed over the
    pixels, over the mask's sum, averaged over the channels).

    Args:
        student: ``(B, C, H, W)`` aligned student map :math:`f_{align}(F^S)`.
        teacher: ``(B, C, H, W)`` teacher map :math:`F^T`.
        channel: ``(B, M, C)`` channel masks.
        spatial: ``(B, M, HW)`` spatial masks.

    Returns:
        ``(L^c, L^s)``, scalars.
    """
    _, c, h, w = teacher.shape
    error = (teacher - student).pow(2).flatten(2)  # (B, C, HW)
    tiny = torch.finfo(error.dtype).tiny  # a mask saturated to 0 everywhere selects nothing: 0 / tiny = 0, not NaN
    per_channel = torch.einsum("bmk,bk->bm", channel.pow(2), error.sum(2)) / (h * w * channel.sum(2)).clamp_min(tiny)
    per_pixel = torch.einsum("bmp,bp->bm", spatial.pow(2), error.sum(1)) / (c * spatial.sum(2)).clamp_min(tiny)
    return per_channel.mean(), per_pixel.mean()


def dice_diversity(masks: Tensor, form: Literal["pairwise", "pooled"] = "pairwise") -> Tensor:
    r"""The Dice similarity of the ``M`` masks of each image, averaged over the images (lower: more diverse).

    ``pairwise`` (MasKD's ``dice_coeff``): the mean over the ordered pairs :math:`i \ne j` of
    :math:`2\langle M_i, M_j\rangle / (\|M_i\|^2 + \|M_j\|^2)`, in :math:`[0, 1]`. ``pooled``: the paper's formula read
    literally, :math:`2\sum_i\sum_{j\ne i}\langle M_i, M_j\rangle / (\sum_i \|M_i\|^2 + \sum_j \|M_j\|^2)`, which
    ranges over :math:`[0, M - 1]`. Each squared norm gets MasKD's :math:`10^{-12}`, so masks saturated to 0 give 0.

    Args:
        masks: ``(B, M, N)`` masks over ``N`` channels or pixels, ``M >= 2``.
        form: ``pairwise`` or ``pooled``.
    """
    gram = torch.einsum("bin,bjn->bij", masks, masks)  # (B, M, M)
    norms = torch.diagonal(gram, dim1=1, dim2=2) + 1e-12  # (B, M), MasKD's eps
    off = 1.0 - torch.eye(masks.shape[1], dtype=masks.dtype, device=masks.device)
    if form == "pooled":
        return (2 * (gram * off).sum((1, 2)) / (2 * norms.sum(1))).mean()
    dice = 2 * gram / (norms[:, :, None] + norms[:, None, :])
    return (dice * off).sum((1, 2)).mean() / off.sum()


def upsample_nearest(x: Tensor, factor: int) -> Tensor:
    """``(B, C, h, w)`` to ``(B, C, h * factor, w * factor)``, each cell repeated over its block."""
    return x.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


class ACAMLevel(nn.Module):
    r"""The learnable parts for one feature level: ``align`` (1x1 conv, or none when the widths agree), STCA-FF's
    :math:`W_q, W_k` (``C -> C/2``) and :math:`W_v` (``C -> C``), and ASCM's selection units :math:`m^c, m^s`.

    The projections start as PyTorch's 1x1-conv default (Kaiming-uniform, fan-in ``C``); the selection units as
    MasKD's tokens, :math:`\mathcal N(0, 0.01^2)`.

    Args:
        student_channels: Student map width.
        channels: Teacher map width :math:`C`.
        num_masks: :math:`M`.
    """

    def __init__(self, student_channels: int, channels: int, num_masks: int) -> None:
        super().__init__()
        query = max(channels // 2, 1)
        self.align = nn.Conv2d(student_channels, channels, 1) if student_channels != channels else nn.Identity()
        self.w_q = nn.Parameter(torch.empty(query, channels))
        self.w_k = nn.Parameter(torch.empty(query, channels))
        self.w_v = nn.Parameter(torch.empty(channels, channels))
        for weight in (self.w_q, self.w_k, self.w_v):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Conv2d's default for a 1x1 kernel
        self.channel_units = nn.Parameter(torch.randn(num_masks) * 0.01)
        self.spatial_units = nn.Parameter(torch.randn(num_masks, channels) * 0.01)


@register_loss("acam", help="ACAM-KD: channel + spatial masked feature distillation, masks from a teacher-query / "
                            "student-key cross-attention fusion, Dice diversity (ICCV 2025)")
class ACAMLoss(DistillLoss):
    r"""Lan and Tian, "ACAM-KD: Adaptive and Cooperative Attention Masking for Knowledge Distillation" (ICCV 2025).

    On each feature level (a list of taps: one :class:`ACAMLevel` per level, the levels summed), with
    :math:`F^S` the student map through ``align`` when the widths differ:

    1. **STCA-FF** (:func:`cross_attention_fusion`): queries from the teacher map, keys and values from the
       student's, :math:`F_{fused} = \mathrm{softmax}(Q^\top K/\sqrt{C_q})\,V`, :math:`C_q = C/2`.
    2. **ASCM** (:func:`selection_masks`): :math:`M` channel masks :math:`\sigma(m^c v)` and :math:`M` spatial masks
       :math:`\sigma(m^s z)` from the fused map.
    3. The masked losses :math:`L^c, L^s` (:func:`masked_distillation`) and the Dice diversity of each mask set
       (:func:`dice_diversity`):

    .. math:: L = \alpha\,(L^c + L^s) + \lambda\,\big(D(M^c) + D(M^s)\big)

    The fusion and the selection units are trained by this loss with the student (the student's map also feeds
    the masks: the "cooperative" part) and dropped at deployment. Defaults: the paper's :math:`\alpha = \lambda =
    1` and :math:`M = 6` (detection; the paper's segmentation uses :math:`M` = the number of classes, on the
    logit maps).

    Paper vs MasKD's code (no ACAM-KD code is published):

    * **Diversity** (``diversity``): the paper writes one Dice ratio pooled over all pairs; MasKD's ``dice_coeff``
      averages the Dice of each pair. Default ``pairwise`` (bounded in [0, 1], so :math:`\lambda = 1` does not
      grow with :math:`M`); ``pooled`` is the paper's formula read literally. The paper does not say which mask
      sets it covers; here both (channel and spatial).
    * **Query side** (``query``): ``teacher`` (the paper's choice) or ``student`` (its Table 9 ablation).
    * **Gradient through the masks** (``mask_grad``): the paper trains everything jointly and says nothing of
      stopping gradients, so by default (``through``) the student also receives the gradient of the masked terms
      and of the diversity through the keys and values of STCA-FF; ``stop`` detaches the student map on its way
      into STCA-FF (as MasKD computes its student masks under ``no_grad``), so the student learns only from the
      masked error and the masks only move the fusion and the selection units.

    Not from the paper: ``attention_pool`` > 1 average-pools both maps by that factor for the cross-attention only
    (the fused map is repeated back to full size), for maps whose :math:`(HW)^2` attention would not fit.

    Recipes (detection: the FPN levels; segmentation: the logit maps, one mask per class)::

        distill:
          - {loss: acam, student: [p2, p3, p4], teacher: [p2, p3, p4], num_masks: 6}
          - {loss: acam, student: logits, teacher: logits, num_masks: 11, attention_pool: 4, mask_grad: stop}

    Shapes: student ``(B, C_s, H, W)`` and teacher ``(B, C, H, W)`` (or lists, one per level); targets unused.

    Args:
        num_masks: :math:`M`, the masks of each kind.
        alpha: :math:`\alpha`, the weight of :math:`L^c + L^s`.
        lambda_: :math:`\lambda`, the weight of the diversity term.
        diversity: ``pairwise`` (MasKD's Dice, the default) or ``pooled`` (the paper's formula).
        query: ``teacher`` (the paper) or ``student``: the map the queries come from.
        attention_pool: Pooling factor of the cross-attention's inputs (1: none, the paper).
        mask_grad: ``through`` (the default: the student map feeds the masks with its gradient) or ``stop``.
    """

    pairwise = False  # one set of modules per level
    default_student_tap = "p2"
    default_teacher_tap = "p2"

    def __init__(self, *, num_masks: Annotated[int, Ge(2)] = 6, alpha: Annotated[float, Ge(0)] = 1.0,
                 lambda_: Annotated[float, Ge(0)] = 1.0, diversity: Literal["pairwise", "pooled"] = "pairwise",
                 query: Literal["teacher", "student"] = "teacher", attention_pool: Annotated[int, Ge(1)] = 1,
                 mask_grad: Literal["through", "stop"] = "through") -> None:
        super().__init__()
        self.num_masks, self.alpha, self.lambda_ = num_masks, alpha, lambda_
        self.diversity, self.query, self.attention_pool, self.mask_grad = diversity, query, attention_pool, mask_grad
        self.levels = nn.ModuleList()

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """Two levels: a 4-channel student and an 8-channel teacher (so ``align`` is exercised)."""
        return [(4, 6, 6), (4, 3, 3)], [(8, 6, 6), (8, 3, 3)]

    def check_shapes(self, student: Any, teacher: Any) -> KdkitError | None:
        """Each level: ``(C, H, W)`` maps of one spatial size, divisible by ``attention_pool``.

        Refused with the fix (tap feature maps), not a bridge: a bridge cannot turn vectors into maps.
        """
        if isinstance(student, list) and len(student) != len(teacher):
            return KdkitError(f"acam pairs the levels, but got {len(student)} student and {len(teacher)} teacher "
                              f"levels", fix="list as many student taps as teacher taps")
        pairs = zip(student, teacher, strict=True) if isinstance(student, list) else [(student, teacher)]
        for s, t in pairs:
            if len(s) != 3 or len(t) != 3 or tuple(s[1:]) != tuple(t[1:]):
                return KdkitError(f"ACAM-KD compares (C, H, W) feature maps of one spatial size; got student "
                                  f"{tuple(s)} and teacher {tuple(t)}",
                                  fix="tap feature maps of the same resolution on both networks (detection: the "
                                      "FPN levels p2, p3, p4; segmentation: the logits)")
            if t[1] % self.attention_pool or t[2] % self.attention_pool:
                divisors = [d for d in range(1, min(t[1], t[2]) + 1) if t[1] % d == 0 and t[2] % d == 0]
                closest = sorted(divisors, key=lambda d: (abs(d - self.attention_pool), d))
                return KdkitError(f"attention_pool {self.attention_pool} does not divide the {t[1]}x{t[2]} map",
                                  fix=f"set attention_pool to a factor of both sides of every level, closest first: "
                                      f"{', '.join(map(str, closest))} (1: no pooling)")
        return None

    def setup(self, student_shape: Any, teacher_shape: Any, num_samples: int) -> None:
        """One :class:`ACAMLevel` per level, sized from the probed taps."""
        pairs = zip(student_shape, teacher_shape, strict=True) if isinstance(student_shape, list) \
            else [(student_shape, teacher_shape)]
        for s, t in pairs:
            self.levels.append(ACAMLevel(int(s[0]), int(t[0]), self.num_masks))

    def masks(self, i: int, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        """Level ``i``'s channel ``(B, M, C)`` and spatial ``(B, M, HW)`` masks from the aligned student map."""
        level = self.levels[i]
        dtype = student.dtype
        if self.mask_grad == "stop":
            student = student.detach()
        queries, keys = (teacher, student) if self.query == "teacher" else (student, teacher)
        if self.attention_pool > 1:
            queries, keys = (F.avg_pool2d(x, self.attention_pool) for x in (queries, keys))
        fused = cross_attention_fusion(queries, keys, level.w_q.to(dtype), level.w_k.to(dtype), level.w_v.to(dtype))
        if self.attention_pool > 1:
            fused = upsample_nearest(fused, self.attention_pool)
        return selection_masks(fused, level.channel_units.to(dtype), level.spatial_units.to(dtype))

    def level(self, i: int, student: Tensor, teacher: Tensor) -> Tensor:
        """ACAM-KD on level ``i``."""
        dtype = compute_dtype(student, teacher, *(p for p in self.levels[i].parameters()))
        align = self.levels[i].align
        student = student.to(dtype) if isinstance(align, nn.Identity) else run_widened(align, student.to(dtype))
        teacher = teacher.to(dtype)
        channel, spatial = self.masks(i, student, teacher)
        channel_loss, spatial_loss = masked_distillation(student, teacher, channel, spatial)
        diversity = dice_diversity(channel, self.diversity) + dice_diversity(spatial, self.diversity)
        return self.alpha * (channel_loss + spatial_loss) + self.lambda_ * diversity

    def forward(self, student: Tensor | list[Tensor], teacher: Tensor | list[Tensor], labels: Tensor) -> Tensor:
        """The sum over the levels; the targets are unused."""
        if not isinstance(student, list):
            student, teacher = [student], [teacher]
        return torch.stack([self.level(i, s, t) for i, (s, t) in enumerate(zip(student, teacher, strict=True))]).sum()


__all__ = ["ACAMLevel", "ACAMLoss", "cross_attention_fusion", "dice_diversity", "masked_distillation",
           "selection_masks"]
