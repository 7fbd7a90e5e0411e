"""Pair-wise distillation: the structured-KD paper's node-similarity matching (Liu et al., CVPR 2019)."""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Gt, Le
from torch import Tensor

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss

#: Added to each node's L2 norm before dividing, as the official ``L2`` helper.
EPS = 1e-8


def pool_nodes(feat: Tensor, scale: float) -> Tensor:
    """The feature map max-pooled into nodes: windows of ``max(1, int(H * scale)) x max(1, int(W * scale))`` with
    that stride and ``ceil_mode`` (the official ``MaxPool2d``), so ``scale=0.5`` gives a 2x2 grid of nodes on an
    even-sided map (3x3 on a 7x7 one: windows of 3, the last one partial) and
    ``scale=1/H`` keeps every pixel a node.

    Args:
        feat: ``(N, C, H, W)`` map.
        scale: Window side as a fraction of the map's side.

    Returns:
        ``(N, C, H', W')`` nodes.
    """
    kernel = (max(1, int(feat.shape[2] * scale)), max(1, int(feat.shape[3] * scale)))
    return F.max_pool2d(feat, kernel, kernel, ceil_mode=True)


def node_similarity(nodes: Tensor, detach_norm: bool = True) -> Tensor:
    r"""Cosine similarity of every pair of nodes, :math:`a_{ij} = f_i^\top f_j / (\|f_i\| \|f_j\|)`.

    Args:
        nodes: ``(N, C, H', W')``; each position is a node's ``C``-vector.
        detach_norm: Divide by the norms without differentiating them (the official code's ``L2(feat).detach()``);
            ``False`` differentiates the whole cosine (the paper's formula). The values are the same.

    Returns:
        ``(N, M, M)`` similarities, ``M = H' W'``.
    """
    norm = nodes.norm(dim=1, keepdim=True) + EPS
    unit = (nodes / (norm.detach() if detach_norm else norm)).flatten(2)
    return torch.einsum("ncm,nck->nmk", unit, unit)


def pairwise_kd_loss(student: Tensor, teacher: Tensor, scale: float = 0.5, detach_norm: bool = True) -> Tensor:
    r"""Liu, Chen, Liu, Qin, Luo and Wang, "Structured Knowledge Distillation for Semantic Segmentation"
    (CVPR 2019; TPAMI 2020 "... for Dense Prediction"), the pair-wise term.

    Both feature maps are max-pooled into the same grid of ``M`` nodes (:func:`pool_nodes`), and the cosine
    similarities of all node pairs (:func:`node_similarity`) are matched:

    .. math::
        \ell_{pa} = \frac{1}{N}\sum_{n}\frac{1}{M^2}\sum_{i=1}^{M}\sum_{j=1}^{M}\big(a^s_{n,ij} - a^t_{n,ij}\big)^2

    The channel counts may differ (only ``M x M`` matrices are compared); the spatial sizes must match. As the
    official ``CriterionPairWiseforWholeFeatAfterPool`` with ``sim_dis_compute``: node windows of half the map's
    side (``--pool-scale 0.5``, 2x2 nodes), norms detached (``detach_norm``), weight 0.5 (``lambda_pa``).

    Args:
        student: ``(N, C_s, H, W)`` student features.
        teacher: ``(N, C_t, H, W)`` teacher features.
        scale: Node window side as a fraction of the map's side, in ``(0, 1]``.
        detach_norm: See :func:`node_similarity`.

    Returns:
        Scalar loss, float32 (float64 for float64 inputs; half precisions upcast).
    """
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[0] != teacher.shape[0] \
            or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"pairwise_kd_loss needs (N, C, H, W) maps with one N, H and W, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    dtype = compute_dtype(student, teacher)
    sim_s = node_similarity(pool_nodes(student.to(dtype), scale), detach_norm)
    sim_t = node_similarity(pool_nodes(teacher.to(dtype), scale), detach_norm)
    return (sim_s - sim_t).pow(2).mean(dim=(1, 2)).mean()


@register_loss("pairwise_kd", help="structured KD's pair-wise term: squared gap of node cosine similarities "
                                   "(CVPR 2019)")
class PairwiseKDLoss(DistillLoss):
    """Pair-wise node-similarity distillation of feature maps; see :func:`pairwise_kd_loss`.

    Recipe (the official weight and nodes; channel counts may differ)::

        distill:
          - {loss: pairwise_kd, student: stage3, teacher: stage3, weight: 0.5}

    Args:
        scale: Node window side as a fraction of the map's side (official: 0.5, a 2x2 grid of nodes).
        detach_norm: Do not differentiate the node norms (the official code); false: the paper's cosine.
    """

    default_student_tap = "stage3"
    default_teacher_tap = "stage3"

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """Feature maps of one spatial size and different widths."""
        return (3, 6, 6), (5, 6, 6)

    def __init__(self, *, scale: Annotated[float, Gt(0), Le(1)] = 0.5, detach_norm: bool = True) -> None:
        super().__init__()
        self.scale = scale
        self.detach_norm = detach_norm

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
        """Per-sample ``(C, H, W)`` maps of one spatial size (any widths)."""
        if len(student) != 3 or len(teacher) != 3:
            return f"pairwise_kd needs per-sample (C, H, W) maps, got {tuple(student)} and {tuple(teacher)}"
        if tuple(student[1:]) != tuple(teacher[1:]):
            return f"student map size {tuple(student[1:])} differs from teacher map size {tuple(teacher[1:])}"
        return None

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """Pair-wise KD of two ``(N, C, H, W)`` maps; labels are unused."""
        return pairwise_kd_loss(student, teacher, self.scale, self.detach_norm)
