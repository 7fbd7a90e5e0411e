"""FitNets' convolutional regressor: maps a student (C,H,W) tap onto the teacher's (C',H',W').

Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015) regress the student's guided layer onto
the teacher's hint layer with a convolution whose kernel makes the spatial sizes agree. This follows the
``ConvReg`` module of RepDistiller (Tian et al., ICLR 2020), which picks the convolution from the ratio
of the spatial sizes, then applies BatchNorm and (optionally) ReLU.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.bridges import register_bridge


class ConvReg(nn.Module):
    """``conv -> BatchNorm -> ReLU (optional)``; see :func:`convreg_bridge` for how ``conv`` is chosen.

    Args:
        conv: The convolution mapping the student map to the teacher's channels and spatial size.
        channels: Teacher channels (BatchNorm width).
        relu: Apply a ReLU after the BatchNorm.
    """

    def __init__(self, conv: nn.Module, channels: int, relu: bool = True) -> None:
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(channels)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_s, H_s, W_s) -> (B, C_t, H_t, W_t)``."""
        out = self.bn(self.conv(x))
        return F.relu(out) if self.relu else out

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


def maps_convreg(student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
    """(C, H, W) maps whose student H, W equal the teacher's, twice or half them, or are at least as large; any
    channels."""
    for side, shape in (("student", student), ("teacher", teacher)):
        if len(shape) != 3:
            return f"it needs a 3-d per-sample {side} tap (C, H, W), got shape {shape}"
    (_, h_s, w_s), (_, h_t, w_t) = student, teacher
    if (2 * h_s, 2 * w_s) == (h_t, w_t) or (h_s >= h_t and w_s >= w_t):
        return None
    return (f"the student map's spatial size {(h_s, w_s)} is smaller than the teacher's {(h_t, w_t)} and not "
            "half of it; it maps equal, 2x, half, or larger-or-equal sizes only")


@register_bridge("convreg", help="FitNets conv regressor (RepDistiller ConvReg): conv/deconv + BN (+ReLU), "
                                 "matches channels and spatial size", example_shapes=((4, 6, 6), (6, 3, 3)),
                 maps=maps_convreg)
def convreg_bridge(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], *, relu: bool = True,
                   same_size_kernel: Literal[1, 3] = 3) -> nn.Module:
    """The FitNets regressor, sized from the probed per-sample ``(C, H, W)`` shapes of the two taps.

    The convolution is chosen from the spatial sizes (student ``H_s x W_s``, teacher ``H_t x W_t``):

    * equal: ``same_size_kernel`` x ``same_size_kernel`` conv, stride 1, "same" padding (default 3x3);
    * student twice the teacher (``H_s = 2 H_t``, ``W_s = 2 W_t``): 3x3 conv, stride 2, padding 1;
    * student half the teacher (``2 H_s = H_t``, ``2 W_s = W_t``): 4x4 transposed conv, stride 2, padding 1;
    * otherwise, when ``H_s >= H_t`` and ``W_s >= W_t``: a "valid" conv with kernel
      ``(1 + H_s - H_t, 1 + W_s - W_t)`` (the FitNets paper's rule for its convolutional regressor).

    followed by ``BatchNorm2d(C_t)`` and, if ``relu``, a ReLU. The convolutions have no bias (the BatchNorm
    that follows cancels it; RepDistiller keeps one, which changes nothing but the parameter count).

    Paper vs code: for equal spatial sizes, both the FitNets rule and RepDistiller's ``ConvReg`` give a 1x1
    conv (kernel ``1 + 0``); kdkit defaults to a 3x3 conv (each output then sees a 3x3 neighbourhood, as
    with the ``conv3x3`` bridge); ``same_size_kernel: 1`` reproduces the paper's rule and RepDistiller. RepDistiller
    only compares heights (square maps); kdkit checks H and W separately.

    Args:
        student_shape: Per-sample student tap shape ``(C_s, H_s, W_s)``.
        teacher_shape: Per-sample teacher tap shape ``(C_t, H_t, W_t)``.
        relu: End with a ReLU (RepDistiller's ``use_relu``, True for FitNets; False for pre-activation targets).
        same_size_kernel: Kernel size of the conv when the spatial sizes are equal (3, or 1 as RepDistiller).

    Returns:
        A module mapping ``(B, C_s, H_s, W_s)`` to ``(B, C_t, H_t, W_t)``.

    Raises:
        KdkitError: The taps are not ``(C, H, W)`` maps, or the student map is smaller than the teacher's
            (other than exactly half of it) -- :func:`maps_convreg`, checked by registration, as are
            ``same_size_kernel``'s choices (1 or 3).
    """
    c_s, h_s, w_s = (int(v) for v in student_shape)
    c_t, h_t, w_t = (int(v) for v in teacher_shape)
    conv: nn.Module
    if (h_s, w_s) == (h_t, w_t):
        conv = nn.Conv2d(c_s, c_t, same_size_kernel, padding=same_size_kernel // 2, bias=False)
    elif (h_s, w_s) == (2 * h_t, 2 * w_t):
        conv = nn.Conv2d(c_s, c_t, 3, stride=2, padding=1, bias=False)
    elif (2 * h_s, 2 * w_s) == (h_t, w_t):
        conv = nn.ConvTranspose2d(c_s, c_t, 4, stride=2, padding=1, bias=False)
    else:  # at least as large in H and W: the declared rule refused every other pair
        conv = nn.Conv2d(c_s, c_t, (1 + h_s - h_t, 1 + w_s - w_t), bias=False)
    return ConvReg(conv, c_t, relu=relu)


__all__ = ["ConvReg", "convreg_bridge", "maps_convreg"]
