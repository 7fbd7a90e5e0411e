r"""FM-KT, feature variant: per-step PKD between each velocity of a ``flow_feature`` chain and ``f_s - T(f_t)``.

Shao et al., "Precise Knowledge Transfer via Flow Matching" (arXiv 2402.02012). The ``flow_feature``
bridge (:mod:`kdkit.methods.fmkt.feature`) unrolls N Euler steps on a student map :math:`f_s` and replaces the
map by the chain's end; this loss trains the velocities towards the rectified-flow velocity
:math:`Z_1 - Z_0` with :math:`Z_1 = f_s` and :math:`Z_0 = T(f_t)`, the teacher map brought to the
student's shape by a trainable BN + 1x1 convolution owned here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from annotated_types import Interval
from torch import Tensor, nn

from kdkit.bridges import BRIDGES
from kdkit.errors import KdkitError
from kdkit.losses.base import DistillLoss, compute_dtype, register_loss, run_widened
from kdkit.losses.pkd import pkd_loss
from kdkit.methods.fmkt.feature import FeatureFlow
from kdkit.methods.fmkt.losses import dirac_shuffle


def teacher_transform(teacher_channels: int, student_channels: int, stride: int) -> nn.Sequential:
    """:math:`T`: ``BatchNorm2d(C_t)`` then a bias-free 1x1 conv ``C_t -> C_s`` with ``stride`` (the released code)."""
    return nn.Sequential(nn.BatchNorm2d(teacher_channels),
                         nn.Conv2d(teacher_channels, student_channels, 1, stride=stride, bias=False))


def fmkt_feature_loss(velocities: Tensor, start: Tensor, target: Tensor, metric: Literal["pkd", "mse"] = "pkd",
                      detach_start: bool = False) -> Tensor:
    r"""The per-step velocity loss, averaged over the N steps.

    .. math::
        L = \frac{1}{N}\sum_{i=1}^{N} \mathcal{M}\big(v_i,\; f_s - T(f_t)\big)

    with :math:`\mathcal{M}` PKD (:func:`kdkit.losses.pkd.pkd_loss`: MSE/2 of per-channel standardised maps)
    or plain MSE.

    Args:
        velocities: ``(N, B, C, H, W)`` per-step velocities :math:`v_i`.
        start: ``(B, C, H, W)`` the student map :math:`f_s`.
        target: ``(B, C, H, W)`` the transformed teacher map :math:`T(f_t)`.
        metric: ``pkd`` (paper) or ``mse``.
        detach_start: Stop the gradient through :math:`f_s` in the target (the released code does not).
    """
    goal = (start.detach() if detach_start else start) - target
    dtype = compute_dtype(velocities, goal)
    total = velocities.new_zeros((), dtype=dtype)
    for velocity in velocities.unbind(0):
        value = pkd_loss(velocity, goal) if metric == "pkd" else F.mse_loss(velocity.to(dtype), goal.to(dtype))
        total = total + value.to(dtype)
    return total / velocities.shape[0]


@register_loss("fmkt_feature", help="FM-KT feature variant: PKD between each flow step's velocity and "
                                    "f_s - T(f_t), T = BN + 1x1 conv (2024)")
class FMKTFeatureLoss(DistillLoss):
    r"""FM-KT on a ``flow_feature`` bridge's velocities; see :func:`fmkt_feature_loss`.

    The teacher map :math:`f_t` ``(C_t, H_t, W_t)`` is brought to the student's ``(C, H, W)`` by
    :math:`T` = BN + 1x1 conv (trainable, created in :meth:`setup`). Spatial sizes: when :math:`H_t = dH`
    and :math:`W_t = dW` for an integer ``d`` the convolution has stride ``d``, as in the released code;
    any other pair of sizes is refused (tap other layers).

    Recipe (the flowed stage-1 map continues through the student's stage 2; CE stays on the logits)::

        distill:
          - {loss: fmkt_feature, student: stage1, teacher: stage1, bridge: flow_feature,
             bridge_params: {steps: 8, eval_steps: 4}}

    Args:
        metric: ``pkd`` (paper, default) or ``mse``.
        detach_student: Detach :math:`f_s` in the target :math:`f_s - T(f_t)` (released code: no).
        dirac_ratio: :math:`\beta_d \in [0, 1]`: fraction of the batch keeping its own teacher map; the
            rest is shuffled within the batch on a copy (1 = no shuffle).

    Shapes: student = :class:`~kdkit.methods.fmkt.feature.FeatureFlow` (velocities ``(N, B, C, H, W)``, start
    ``(B, C, H, W)``); teacher ``(B, C_t, H_t, W_t)``.
    """

    default_student_tap = "stage1"
    default_teacher_tap = "stage1"
    #: build.plan checks that the term uses this bridge.
    requires_bridge = "flow_feature"

    def __init__(self, *, metric: Literal["pkd", "mse"] = "pkd", detach_student: bool = False,
                 dirac_ratio: Annotated[float, Interval(ge=0, le=1)] = 1.0) -> None:
        super().__init__()
        self.metric, self.detach_student, self.dirac_ratio = metric, detach_student, dirac_ratio
        self.transform: nn.Module | None = None

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """A student map and a teacher map twice its size (the transform's 1x1 conv then has stride 2)."""
        return (4, 3, 3), (8, 6, 6)

    @classmethod
    def example_inputs(cls, batch: int, generator: torch.Generator | None = None) -> tuple[Any, Any, Tensor, Tensor]:
        """The registered ``flow_feature`` bridge's :class:`FeatureFlow` on a random student map, and a teacher map."""
        student_shape, teacher_shape = cls.example_shapes()
        _, teacher, labels, index = super().example_inputs(batch, generator)
        bridge = BRIDGES.get(cls.requires_bridge)(student_shape, teacher_shape)
        with torch.no_grad():
            flow = bridge(torch.randn(batch, *student_shape, generator=generator))
        return flow, teacher, labels, index

    @staticmethod
    def stride_for(student: tuple[int, ...], teacher: tuple[int, ...]) -> int | str:
        """The 1x1 conv's stride mapping the teacher's ``(H_t, W_t)`` onto the student's, or why there is none."""
        if len(student) != 3 or len(teacher) != 3:
            return f"needs (C, H, W) maps on both sides, got student {tuple(student)} and teacher {tuple(teacher)}"
        (_, h, w), (_, ht, wt) = student, teacher
        if ht % h or wt % w or ht // h != wt // w:
            return (f"the teacher map's size {(ht, wt)} is not an integer multiple d*{(h, w)} of the student's "
                    "(the transform is a 1x1 conv of stride d)")
        return ht // h

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
        """The student velocity ``(C, H, W)`` and the teacher map ``(C_t, dH, dW)`` must fit :math:`T`."""
        stride = self.stride_for(tuple(student), tuple(teacher))
        return stride if isinstance(stride, str) else None

    def setup(self, student_shape: Any, teacher_shape: Any, num_samples: int) -> None:
        """Create :math:`T` = BN(C_t) + 1x1 conv C_t -> C of stride ``H_t / H``.

        Raises:
            KdkitError: Shapes :math:`T` cannot map (not maps, or sizes that are not integer multiples).
        """
        stride = self.stride_for(tuple(student_shape), tuple(teacher_shape))
        if isinstance(stride, str):
            raise KdkitError(f"loss 'fmkt_feature': {stride}",
                             fix="tap a teacher layer whose map is as large as the student's, or an integer "
                                 "multiple of it", where="teacher")
        self.transform = teacher_transform(int(teacher_shape[0]), int(student_shape[0]), stride)

    def forward(self, student: Any, teacher: Tensor, labels: Tensor) -> Tensor:
        """The loss of the chain's velocities against :math:`f_s - T(f_t)`; labels are unused."""
        if not isinstance(student, FeatureFlow):
            raise TypeError("fmkt_feature reads the output of the 'flow_feature' bridge; add `bridge: flow_feature`")
        if self.transform is None:
            raise RuntimeError("fmkt_feature: setup() was not called (build.plan calls it with the probed shapes)")
        # T computes in the wider of the map's and its weights' precision (a bfloat16 map is upcast, float64 kept)
        target = run_widened(self.transform, dirac_shuffle(teacher, self.dirac_ratio))
        return fmkt_feature_loss(student.velocities, student.start, target, self.metric, self.detach_student)

    def extra_repr(self) -> str:
        return f"metric={self.metric}, detach_student={self.detach_student}, dirac_ratio={self.dirac_ratio}"


__all__ = ["FMKTFeatureLoss", "fmkt_feature_loss", "teacher_transform"]
