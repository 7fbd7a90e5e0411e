"""Per-task KL distillation of a segmentation + boundary output (the baseline of the CS-divergence multi-task loss).

Also the channel split both multi-task losses share: a ``(N, K + 2, H, W)`` output of the ``pixels_boundary`` layout
(:data:`kdkit.task.LOGITS_LAYOUTS`), channels ``0..K`` the segmentation logits, the last one the boundary logit.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor

from kdkit.errors import KdkitError
from kdkit.losses.base import DistillLoss, compute_dtype, register_loss


def check_split(name: str, student: tuple[int, ...], teacher: tuple[int, ...],
                seg_channels: int | None) -> str | KdkitError | None:
    """Why per-sample shapes cannot be a ``(K + 2, H, W)`` segmentation + boundary output split as asked, or ``None``.

    Args:
        name: The loss's registry name (for the message).
        student: Per-sample student shape.
        teacher: Per-sample teacher shape.
        seg_channels: The segmentation channels the recipe declares (``None``: all but the last).
    """
    if len(student) != 3:
        return f"{name} needs per-sample (K + 2, H, W) segmentation + boundary maps, got {tuple(student)}"
    if tuple(student) != tuple(teacher):
        return f"student shape {tuple(student)} differs from teacher shape {tuple(teacher)}"
    channels = student[0]
    if channels < 3:
        return (f"{name} needs at least 3 channels (background, one class, the boundary), got {channels}: "
                "is the task seg_boundary?")
    if seg_channels is not None and seg_channels != channels - 1:
        return KdkitError(f"{name} splits {channels} channels into seg_channels {seg_channels} + 1 boundary channel, "
                          f"which leaves {channels - seg_channels} channel(s) for the boundary",
                          bad=str(seg_channels), choices=[str(channels - 1)],
                          fix=f"set seg_channels: {channels - 1} (background + classes) or leave it out")
    return None


def split_logits(logits: Tensor, seg_channels: int | None) -> tuple[Tensor, Tensor]:
    """``(segmentation logits (N, K + 1, H, W), boundary logit (N, H, W))`` of a ``(N, K + 2, H, W)`` output."""
    if logits.dim() != 4 or logits.shape[1] < 3 or (seg_channels is not None and seg_channels != logits.shape[1] - 1):
        raise ValueError(f"need (N, K + 2, H, W) segmentation + boundary logits (seg_channels {seg_channels}), "
                         f"got {tuple(logits.shape)}")
    return logits[:, :-1], logits[:, -1]


def multitask_kd_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0, seg_weight: float = 1.0,
                      boundary_weight: float = 1.0, seg_channels: int | None = None) -> Tensor:
    r"""Per-task KL distillation of segmentation + boundary outputs: pixel-wise KD on the segmentation channels
    (Liu et al., CVPR 2019, as ``pixel_kd``) plus the per-pixel Bernoulli KL on the boundary channel.

    .. math::
        \ell = \frac{T^2}{N H W}\sum_{n,i}\Big(w_s\,\mathrm{KL}(q^t_{n,i}\|q^s_{n,i})
               + w_b\,\mathrm{KL}(\mathrm{Ber}(b^t_{n,i})\|\mathrm{Ber}(b^s_{n,i}))\Big)

    with :math:`q = \mathrm{softmax}(z_{0..K}/T)` over the segmentation channels and
    :math:`b = \sigma(z_{K+1}/T)` the boundary probability. The Bernoulli KL equals the teacher-soft-target BCE
    minus the teacher's entropy: the same gradient for the student, and 0 when the outputs agree.

    Args:
        student: ``(N, K + 2, H, W)`` student logits.
        teacher: ``(N, K + 2, H, W)`` teacher logits.
        temperature: :math:`T` (default 1; the loss is scaled by :math:`T^2`).
        seg_weight: :math:`w_s`.
        boundary_weight: :math:`w_b`.
        seg_channels: ``K + 1`` (checked); ``None``: all channels but the last.

    Returns:
        Scalar, float32 (float64 for float64 inputs; half precisions upcast).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
    dtype = compute_dtype(student, teacher)
    s_seg, s_bnd = split_logits(student.to(dtype) / temperature, seg_channels)
    t_seg, t_bnd = split_logits(teacher.to(dtype) / temperature, seg_channels)
    seg = F.kl_div(F.log_softmax(s_seg, 1), F.log_softmax(t_seg, 1), reduction="none", log_target=True).sum(1)
    # Bernoulli KL(t || s) from log-sigmoids: log(1 - sigmoid(z)) = logsigmoid(-z)
    t_on = t_bnd.sigmoid()
    bnd = (t_on * (F.logsigmoid(t_bnd) - F.logsigmoid(s_bnd))
           + (1 - t_on) * (F.logsigmoid(-t_bnd) - F.logsigmoid(-s_bnd)))
    return (seg_weight * seg + boundary_weight * bnd).mean() * temperature**2


class SegBoundaryLoss(DistillLoss):
    """Base of the losses that read ``seg_boundary`` outputs ``(N, K + 2, H, W)``: the layout they read, example
    shapes and the channel-split check; subclasses name themselves in :attr:`loss_name` and keep ``seg_channels``."""

    reads_logits = frozenset({"pixels_boundary"})
    loss_name: ClassVar[str] = ""
    seg_channels: int | None

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """Two equal ``(K + 2, H, W)`` maps (K = 3)."""
        return (5, 4, 4), (5, 4, 4)

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...]) -> str | KdkitError | None:
        """Per-sample ``(K + 2, H, W)`` maps of one shape, split as ``seg_channels`` says."""
        return check_split(self.loss_name, student, teacher, self.seg_channels)


@register_loss("multitask_kd", help="per-task KL of segmentation + boundary outputs (pixel KD + Bernoulli KL)")
class MultitaskKDLoss(SegBoundaryLoss):
    """Per-task KL distillation of ``seg_boundary`` outputs; see :func:`multitask_kd_loss`.

    Args:
        temperature: Softening temperature (default 1, as pixel-wise KD).
        seg_weight: Weight of the segmentation KL.
        boundary_weight: Weight of the boundary KL.
        seg_channels: Segmentation channels (background + classes); checked against the output, default all but the
            last.
    """

    loss_name = "multitask_kd"

    def __init__(self, *, temperature: Annotated[float, Gt(0)] = 1.0, seg_weight: Annotated[float, Ge(0)] = 1.0,
                 boundary_weight: Annotated[float, Ge(0)] = 1.0,
                 seg_channels: Annotated[int, Ge(2)] | None = None) -> None:
        super().__init__()
        self.temperature, self.seg_weight, self.boundary_weight = temperature, seg_weight, boundary_weight
        self.seg_channels = seg_channels

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """Per-task KL of two ``(N, K + 2, H, W)`` outputs; labels are unused."""
        return multitask_kd_loss(student, teacher, self.temperature, self.seg_weight, self.boundary_weight,
                                 self.seg_channels)
