"""FitNets hint loss: regress a (bridged) student feature map onto a teacher's hint layer."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kdkit.losses.base import DistillLoss, register_loss
from kdkit.losses.kd import mse_loss


def fitnets_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    r"""Romero, Ballas, Kahou, Chassang, Gatta and Bengio, "FitNets: Hints for Thin Deep Nets" (ICLR 2015).

    The hint loss between the regressed student guided layer :math:`r(f_s)` (the regressor is the term's
    bridge, normally ``convreg``) and the teacher hint layer :math:`f_t`, as a mean squared error:

    .. math:: L = \frac{1}{B\,C\,H\,W}\sum_{b,c,h,w} \big(r(f_s)_{bchw} - f_{t,bchw}\big)^2

    This is :func:`kdkit.losses.kd.mse_loss` (the ``mse`` loss); FitNets is the named method with its
    defaults (2nd-stage hint, ``convreg`` bridge, weight 100).

    Paper vs code: the paper writes :math:`\tfrac12\lVert u_h - r(v_g)\rVert^2` (a sum over elements) and
    trains in two stages (hint pre-training of the lower layers, then KD on the whole network).
    RepDistiller's ``HintLoss`` (``nn.MSELoss``, mean over elements) trains one stage jointly with CE at
    weight 100 — the CIFAR-100 protocol, and kdkit's default. There is no switch: the sum form is the mean
    times :math:`BCHW/2`, i.e. a different recipe ``weight``; two-stage training is a recipe matter.

    Args:
        student_feat: ``(B, C, H, W)`` student feature map after the bridge (any shape equal to the teacher's).
        teacher_feat: ``(B, C, H, W)`` teacher hint feature map.

    Returns:
        Scalar loss, in the student's dtype.
    """
    return mse_loss(student_feat, teacher_feat)


@register_loss("fitnets", help="FitNets hint loss: MSE(regressor(f_s), f_t) at one hint layer (ICLR 2015)")
class FitNetsLoss(DistillLoss):
    """FitNets hint regression; see :func:`fitnets_loss`.

    Recipe (CIFAR-100, RepDistiller protocol: hint = 2nd stage, weight 100)::

        distill:
          - {loss: fitnets, student: stage2, teacher: stage2, bridge: convreg, weight: 100}
    """

    default_student_tap = "stage2"
    default_teacher_tap = "stage2"

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """A bridged student map with the teacher's shape."""
        return (4, 4, 4), (4, 4, 4)

    def __init__(self) -> None:
        super().__init__()

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
        """The (bridged) student map must have the teacher's shape; the ``convreg`` bridge makes it so."""
        if tuple(student) != tuple(teacher):
            return (f"student shape {tuple(student)} differs from teacher shape {tuple(teacher)}; FitNets "
                    f"regresses through a bridge: add `bridge: convreg`")
        return None

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """Hint MSE of two same-shape tensors; labels are unused."""
        return fitnets_loss(student, teacher)
