"""CWD: channel-wise distillation of dense maps (Shu et al., ICCV 2021)."""

from __future__ import annotations

from typing import Annotated, Any

import torch.nn.functional as F
from annotated_types import Gt
from torch import Tensor

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss


def cwd_loss(student: Tensor, teacher: Tensor, tau: float = 1.0) -> Tensor:
    r"""Shu, Liu, Gao, Yan and Shen, "Channel-wise Knowledge Distillation for Dense Prediction" (ICCV 2021).

    Each channel ``c`` of each map becomes a distribution over its ``H W`` positions,
    :math:`\phi(y_c)_i = \exp(y_{c,i}/\tau) / \sum_j \exp(y_{c,j}/\tau)`, and the student's channel is pulled
    towards the teacher's with the KL divergence:

    .. math::
        L = \frac{\tau^2}{N C}\sum_{n=1}^{N}\sum_{c=1}^{C}\sum_{i=1}^{HW}
            \phi(y^T_{n,c})_i \,\log\frac{\phi(y^T_{n,c})_i}{\phi(y^S_{n,c})_i}

    i.e. :math:`\tau^2` times the KL(teacher || student) summed over the positions and averaged over channels and
    images. The paper writes it per image with :math:`\tau^2 / C`; the official implementation (mmrazor
    ``ChannelWiseDivergence``, also the authors' own) sums over the ``N x C`` rows and divides by ``N C``: the same
    value, averaged over the batch. mmrazor's later ``use_norm`` option (BatchNorm before the softmax) is not
    included. mmrazor's segmentation config distils the logit maps with ``tau=1``, ``loss_weight=5``, the default here.

    Args:
        student: ``(N, C, H, W)`` student map (logits, or a bridged feature map).
        teacher: ``(N, C, H, W)`` teacher map, same shape.
        tau: Temperature :math:`\tau`.

    Returns:
        Scalar loss, float32 (float64 for float64 inputs; half precisions upcast).
    """
    if student.shape != teacher.shape or student.dim() != 4:
        raise ValueError(f"cwd_loss needs two (N, C, H, W) maps of one shape, got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}; map the student with a bridge")
    dtype = compute_dtype(student, teacher)
    n, c = student.shape[:2]
    log_s = F.log_softmax(student.to(dtype).flatten(2) / tau, dim=2)
    log_t = F.log_softmax(teacher.to(dtype).flatten(2) / tau, dim=2)
    kl = F.kl_div(log_s, log_t, reduction="sum", log_target=True)  # log_target: no 0 * log 0 from a sharp teacher
    return kl * tau**2 / (n * c)


@register_loss("cwd", help="CWD: tau^2 KL of per-channel spatial softmaxes, mean over channels (ICCV 2021)")
class CWDLoss(DistillLoss):
    """Channel-wise distillation of dense maps; see :func:`cwd_loss`.

    Recipe (segmentation logit maps, the mmrazor setting)::

        distill:
          - {loss: cwd, tau: 1, weight: 5}          # reads the logits by default

    Args:
        tau: Temperature of the per-channel spatial softmax (mmrazor's segmentation setting: 1).
    """

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """Two equal dense maps ``(C, H, W)``."""
        return (4, 5, 5), (4, 5, 5)

    def __init__(self, *, tau: Annotated[float, Gt(0)] = 1.0) -> None:
        super().__init__()
        self.tau = tau

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
        """Per-sample ``(C, H, W)`` maps of one shape."""
        if len(student) != 3:
            return f"CWD needs per-sample (C, H, W) maps, got {tuple(student)}"
        return super().check_shapes(student, teacher)

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """CWD of two ``(N, C, H, W)`` maps; labels are unused."""
        return cwd_loss(student, teacher, self.tau)
