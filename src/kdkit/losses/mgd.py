"""MGD: the teacher feature regenerated from the randomly masked student feature (masked generative distillation)."""

from __future__ import annotations

from typing import Annotated, Any

from annotated_types import Gt
from torch import Tensor

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss


def mgd_loss(generated: Tensor, teacher: Tensor, alpha: float = 2e-5) -> Tensor:
    r"""Yang, Li, Shu, Li, Yuan and Li, "Masked Generative Distillation" (ECCV 2022).

    The squared error between the teacher feature :math:`T` and the map :math:`\hat T = \mathcal G(M \odot
    f_{align}(S))` that the ``mgd`` bridge (:class:`kdkit.bridges.mgd.MGDGenerator`) generates from the randomly
    masked student feature, summed over channels and pixels and averaged over the images:

    .. math:: L_{MGD} = \frac{\alpha}{B} \sum_{b=1}^{B}\sum_{k=1}^{C}\sum_{i=1}^{H}\sum_{j=1}^{W}
              \big(T_{bkij} - \hat T_{bkij}\big)^2

    This is the official ``FeatureLoss.get_dis_loss`` (``MSELoss(reduction="sum") / N``, times ``alpha_mgd``);
    the paper writes the same sum without the :math:`1/B` (one image).

    Args:
        generated: ``(B, C, H, W)`` the bridge's output :math:`\hat T`.
        teacher: ``(B, C, H, W)`` teacher feature :math:`T`.
        alpha: :math:`\alpha`.

    Returns:
        Scalar, in the inputs' precision (at least float32).
    """
    dtype = compute_dtype(generated, teacher)
    return alpha * (teacher.to(dtype) - generated.to(dtype)).pow(2).sum() / generated.shape[0]


@register_loss("mgd", help="MGD: teacher map regenerated from the randomly masked student map (mgd bridge), "
                           "summed squared error (ECCV 2022)")
class MGDLoss(DistillLoss):
    r"""Masked generative distillation on one feature tap or several (one generator per tap); see :func:`mgd_loss`.

    The mask and the generation block live in the ``mgd`` bridge (its ``mask_ratio`` is :math:`\lambda`); the
    loss reads the bridge's output. Recipe (detection: the FPN levels, as the official RetinaNet configs)::

        distill:
          - {loss: mgd, student: [p2, p3, p4], teacher: [p2, p3, p4], bridge: mgd,
             bridge_params: {mask_ratio: 0.65}}

    Defaults: :math:`\alpha = 2\cdot10^{-5}` and :math:`\lambda = 0.65` are the official detection configs
    (``alpha_mgd=0.00002, lambda_mgd=0.65``); the official segmentation configs keep :math:`\alpha` and set
    :math:`\lambda = 0.75`. :math:`\alpha` multiplies a *sum* over the map, so it is tied to the map's size (256
    channels of COCO FPN levels); the recipe ``weight`` rescales it for other maps.

    Shapes: student (bridged) and teacher ``(B, C, H, W)``, or lists of them (one bridge per level, summed).

    Args:
        alpha: :math:`\alpha`, the factor of the summed squared error.
    """

    requires_bridge = "mgd"
    default_student_tap = "p2"
    default_teacher_tap = "p2"

    def __init__(self, *, alpha: Annotated[float, Gt(0)] = 2e-5) -> None:
        super().__init__()
        self.alpha = alpha

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """A generated map with the teacher's shape."""
        return (8, 6, 6), (8, 6, 6)

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
        """The generated map must have the teacher's ``(C, H, W)`` shape (the ``mgd`` bridge makes it so)."""
        if len(teacher) != 3 or tuple(student) != tuple(teacher):
            return (f"MGD compares a generated (C, H, W) map with the teacher's; got student {tuple(student)} and "
                    f"teacher {tuple(teacher)}: tap feature maps of one spatial size through `bridge: mgd`")
        return None

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """MGD of the generated map and the teacher's; the targets are unused."""
        return mgd_loss(student, teacher, self.alpha)
