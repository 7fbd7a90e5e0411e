r"""MGD's generator: align the student map, mask random pixels, and generate the teacher's full map from the rest.

Yang, Li, Shu, Li, Yuan and Li, "Masked Generative Distillation" (ECCV 2022). The student feature
:math:`S` (through a 1x1 ``align`` conv when its width differs from the teacher's) is multiplied by a random
spatial mask :math:`M` (0 with probability :math:`\lambda`, shared by the channels), and a generation block
:math:`\mathcal G` (3x3 conv, ReLU, 3x3 conv at the teacher's width) reconstructs the teacher feature from it:

.. math:: \hat T = \mathcal G\big(M \odot f_{align}(S)\big),\qquad
          M_{ij} = \begin{cases}0 & u_{ij} > 1 - \lambda\\ 1 & \text{otherwise}\end{cases},\quad u_{ij}\sim U(0, 1)

The ``mgd`` loss compares :math:`\hat T` with the teacher feature. The generator is a bridge (as FitNets'
regressor): it is the student-side module that maps a student tap into the teacher's space, trained with the
student and dropped at deployment.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Le
from torch import Tensor, nn

from kdkit.bridges import maps_equal_spatial_size, register_bridge
from kdkit.errors import KdkitError


def random_mask(batch: int, height: int, width: int, ratio: float, *, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None) -> Tensor:
    """MGD's spatial mask ``(B, 1, H, W)``: 0 where a uniform draw exceeds ``1 - ratio`` (probability ``ratio``).

    The official code's rule (``torch.where(rand > 1 - lambda, 0, 1)``), one draw per pixel shared by the channels.
    """
    draw = torch.rand(batch, 1, height, width, device=device, dtype=dtype, generator=generator)
    return (draw <= 1.0 - ratio).to(dtype)


class MGDGenerator(nn.Module):
    r"""``align`` (1x1 conv, or none when the widths agree), the random mask, then ``generation``
    (conv3x3-ReLU-conv3x3, biases as the official code).

    In training mode each forward draws a new mask from the global generator (so a resumed run, which restores
    it, draws the same masks); in eval mode nothing is masked (the official code only runs the generator in
    training, where it always masks; kdkit's evaluation reads no bridge, and eval outputs must be deterministic).

    Args:
        student_channels: Student map width.
        teacher_channels: Teacher map width (the generated map's).
        mask_ratio: :math:`\lambda`, the share of masked pixels.
    """

    def __init__(self, student_channels: int, teacher_channels: int, mask_ratio: float) -> None:
        super().__init__()
        self.mask_ratio = mask_ratio
        self.align = nn.Conv2d(student_channels, teacher_channels, 1) if student_channels != teacher_channels \
            else nn.Identity()
        self.generation = nn.Sequential(nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1), nn.ReLU(),
                                        nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1))

    def generate(self, x: Tensor, mask: Tensor) -> Tensor:
        """``G(mask * align(x))`` for a given ``mask`` ``(B, 1, H, W)`` (1 keeps a pixel, 0 masks it)."""
        return self.generation(self.align(x) * mask)

    def forward(self, x: Tensor) -> Tensor:
        """The generated teacher map ``(B, C_t, H, W)`` from the student map ``(B, C_s, H, W)``."""
        b, _, h, w = x.shape
        if not self.training:
            return self.generation(self.align(x))
        return self.generate(x, random_mask(b, h, w, self.mask_ratio, device=x.device, dtype=x.dtype))

    def extra_repr(self) -> str:
        return f"mask_ratio={self.mask_ratio}"


@register_bridge("mgd", help="MGD generator: 1x1 align, random spatial mask (ratio lambda), conv3x3-ReLU-conv3x3 "
                             "to the teacher map (ECCV 2022)", example_shapes=((4, 6, 6), (8, 6, 6)))
def mgd_bridge(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], *,
               mask_ratio: Annotated[float, Ge(0), Le(1)] = 0.65) -> MGDGenerator:
    r"""MGD's generator, sized from the probed ``(C, H, W)`` shapes of the two taps (same ``H, W``).

    Not a general-purpose bridge (it masks its input in training), so it declares no shape rule for hints; it
    checks the shapes itself.

    Args:
        student_shape: Per-sample student tap shape ``(C_s, H, W)``.
        teacher_shape: Per-sample teacher tap shape ``(C_t, H, W)``.
        mask_ratio: :math:`\lambda`, the share of masked pixels: 0.65 (the default: the official detection
            configs), 0.75 for segmentation (the official segmentation configs).

    Raises:
        KdkitError: The taps are not ``(C, H, W)`` maps of one spatial size.
    """
    problem = maps_equal_spatial_size(tuple(student_shape), tuple(teacher_shape))
    if problem:
        raise KdkitError(f"bridge 'mgd' cannot map a student tap of shape {tuple(student_shape)} onto the teacher "
                         f"tap's {tuple(teacher_shape)}: {problem}",
                         fix="tap feature maps (C, H, W) of the same spatial size on both networks "
                             "(e.g. the FPN levels p2, p3, p4 of both detectors)")
    return MGDGenerator(int(student_shape[0]), int(teacher_shape[0]), mask_ratio)


__all__ = ["MGDGenerator", "mgd_bridge", "random_mask"]
