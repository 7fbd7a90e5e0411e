"""Differentiable image operations with AutoAugment's semantics, for TST's learned augmentation.

Every operation maps a float batch ``x`` of shape ``(B, C, H, W)`` with values in ``[0, 1]`` (C = 1 or 3)
and a per-sample magnitude ``m`` of shape ``(B,)`` to an augmented batch of the same shape. ``m`` is a
fraction of AutoAugment's largest magnitude (torchvision's ``_augmentation_space``), signed for the
operations AutoAugment applies in both directions:

==============  ============================================  ==============================================
operation       ``m = 1`` means (AutoAugment's top bin)        gradient w.r.t. ``m``
==============  ============================================  ==============================================
brightness      factor 1.9 (multiply; ``m = -1``: 0.1)        exact (kornia)
contrast        factor 1.9, blend with the grey mean           exact (kornia)
color           saturation factor 1.9 (identity on grey)       exact (kornia)
sharpness       factor 1.9, blend with the 3x3 smoothed image  exact (kornia)
posterize       4 bits (``m = 0``: 8 bits); ``8 - round(4m)``  straight-through (mean quantisation loss)
solarize        threshold ``1 - m`` (``m = 1``: invert all)    straight-through (sigmoid step, width 1/50)
shear_x/_y      shear 0.3, about the top-left corner           exact (bilinear sampling)
translate_x/_y  ``150/331`` of the width / height, in pixels   exact (bilinear sampling)
rotate          30 degrees counter-clockwise, about the centre exact (bilinear sampling)
equalize        (no magnitude)                                 --
invert          (no magnitude)                                 --
cutout          (no magnitude) square of ``size`` x image side --
==============  ============================================  ==============================================

Geometric operations sample bilinearly (AutoAugment uses nearest, whose output has no gradient w.r.t.
the magnitude) and fill with black, as torchvision's default does. ``translate`` moves by a continuous
number of pixels (torchvision rounds to an integer). Otherwise the outputs equal torchvision's
``functional`` operations at the same magnitudes (tested). Each operation also receives ``noise``, a
``(B, 2)`` tensor of uniform draws; only cutout uses it (the square's centre), so every random choice
comes from the caller's generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import kornia.enhance as KE
import torch
import torch.nn.functional as F
from torch import Tensor

Op = Callable[[Tensor, Tensor, Tensor], Tensor]

ENHANCE_MAX = 0.9  # brightness/contrast/colour/sharpness: factor 1 +- 0.9
SHEAR_MAX = 0.3
TRANSLATE_MAX = 150.0 / 331.0  # of the image side
ROTATE_MAX = 30.0  # degrees
POSTERIZE_MAX = 4.0  # bits removed
SOLARIZE_WIDTH = 0.02  # width of the sigmoid step whose gradient stands in for solarize's


def _per_sample(m: Tensor) -> Tensor:
    return m.reshape(-1, 1, 1, 1)


# -- colour ----------------------------------------------------------------------------------------

def brightness(x: Tensor, m: Tensor, noise: Tensor | None = None) -> Tensor:
    """PIL ``ImageEnhance.Brightness``: ``clamp(x * (1 + 0.9 m))``."""
    return KE.adjust_brightness_accumulative(x, 1.0 + ENHANCE_MAX * m)


def contrast(x: Tensor, m: Tensor, noise: Tensor | None = None) -> Tensor:
    """PIL ``ImageEnhance.Contrast``: blend with the image's mean grey level, factor ``1 + 0.9 m``."""
    return KE.adjust_contrast_with_mean_subtraction(x, 1.0 + ENHANCE_MAX * m)


def color(x: Tensor, m: Tensor, noise: Tensor | None = None) -> Tensor:
    """PIL ``ImageEnhance.Color``: blend with the greyscale image, factor ``1 + 0.9 m`` (grey: identity)."""
    return KE.adjust_saturation_with_gray_subtraction(x, 1.0 + ENHANCE_MAX * m)


def sharpness(x: Tensor, m: Tensor, noise: Tensor | None = None) -> Tensor:
    """PIL ``ImageEnhance.Sharpness``: blend with the 3x3-smoothed image (borders kept), factor ``1 + 0.9 m``."""
    return KE.sharpness(x, 1.0 + ENHANCE_MAX * m)


def posterize(x: Tensor, m: Tensor, noise: Tensor | None = None) -> Tensor:
    """Keep ``8 - round(4 m)`` bits of each 8-bit value.

    The bit count is discrete, so the forward pass is exact and the backward pass uses a surrogate:
    dropping ``s`` low bits lowers a value by ``(2^s - 1) / 2`` levels on average, so the gradient is
    that of ``x - (2^{4m} - 1) / 510`` (straight-through estimator).
    """
    shift = (POSTERIZE_MAX * m.detach().abs()).round()
    step = _per_sample(torch.pow(2.0, shift))
    levels = torch.round(x.detach() * 255.0)
    hard = torch.floor(levels / step) * step / 255.0
    soft = x - _per_sample(torch.pow(2.0, POSTERIZE_MAX * m.abs()) - 1.0) / 510.0
    return hard + (soft - soft.detach())


def solarize(x: Tensor, m: Tensor, noise: Tensor | None = None) -> Tensor:
    """Invert the values at or above the threshold ``1 - m``.

    Forward: exactly ``where(x >= 1 - m, 1 - x, x)``. Backward: the gradient of the same blend with
    a sigmoid step of width 0.02 in place of the hard one (straight-through estimator).
    """
    threshold = _per_sample(1.0 - m.abs())
    hard = torch.where(x >= threshold.detach(), 1.0 - x, x)
    weight = torch.sigmoid((x - threshold) / SOLARIZE_WIDTH)
    soft = x + weight * (1.0 - 2.0 * x)
    return hard + (soft - soft.detach())


def equalize(x: Tensor, m: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
    """PIL ``ImageOps.equalize`` of each channel (kornia)."""
    return KE.equalize(x.clamp(0.0, 1.0))


def invert(x: Tensor, m: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
    """``1 - x``."""
    return 1.0 - x


# -- geometry --------------------------------------------------------------------------------------

def warp(x: Tensor, inverse: Tensor, origin: tuple[float, float] | None = None) -> Tensor:
    """Resample ``x`` through a per-sample output-to-input map (bilinear, zero fill).

    Args:
        x: ``(B, C, H, W)`` images.
        inverse: ``(B, 2, 3)`` affine map from output to input pixel coordinates, where ``(0, 0)`` is
            ``origin`` in pixel units from the top-left corner (default: the image centre), x points
            right and y down, and pixel ``(i, j)`` has its centre at ``(j + 0.5, i + 0.5)``.
        origin: Where the map's origin lies.
    """
    h, w = x.shape[-2:]
    ox, oy = origin if origin is not None else (w / 2.0, h / 2.0)
    # Pixel coordinates about the centre are (u * w/2, v * h/2) for affine_grid's normalised (u, v)
    # (align_corners=False); conjugate the map by that scaling and the shift of the origin.
    scale = x.new_tensor([w / 2.0, h / 2.0])
    shift = x.new_tensor([w / 2.0 - ox, h / 2.0 - oy])  # centre minus origin, in pixels
    lin = inverse[:, :, :2]
    offset = inverse[:, :, 2] + lin @ shift - shift  # the same map, about the centre
    theta_lin = lin * scale[None, None, :] / scale[None, :, None]
    theta = torch.cat([theta_lin, (offset / scale)[:, :, None]], dim=2)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _affine(a: Tensor, b: Tensor, c: Tensor, d: Tensor, e: Tensor, f: Tensor) -> Tensor:
    return torch.stack([torch.stack([a, b, c], -1), torch.stack([d, e, f], -1)], -2)


def shear_x(x: Tensor, m: Tensor, noise: Tensor | None = None) -> Tensor:
    """Shear along x by ``0.3 m`` about the top-left corner: output ``(x, y)`` reads input ``(x + s y, y)``."""
    s = SHEAR_MAX * m
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    return warp(x, _affine(one, s, zero, zero, one, zero), origin=(0.0, 0.0))


def shear_y(x: Tensor, m: Tensor, noise: Tensor | None = None) -> Tensor:
    """Shear along y by ``0.3 m`` about the top-left corner: output ``(x, y)`` reads input ``(x, y + s x)``."""
    s = SHEAR_MAX * m
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    return warp(x, _affine(one, zero, zero, s, one, zero), origin=(0.0, 0.0))


def translate_x(x: Tensor, m: Tensor, noise: Tensor | None = None) -> Tensor:
    """Move the content right by ``150/331 * m * width`` pixels."""
    t = TRANSLATE_MAX * x.shape[-1] * m
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    return warp(x, _affine(one, zero, -t, zero, one, zero))


def translate_y(x: Tensor, m: Tensor, noise: Tensor | None = None) -> Tensor:
    """Move the content down by ``150/331 * m * height`` pixels."""
    t = TRANSLATE_MAX * x.shape[-2] * m
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    return warp(x, _affine(one, zero, zero, zero, one, -t))


def rotate(x: Tensor, m: Tensor, noise: Tensor | None = None) -> Tensor:
    """Rotate counter-clockwise (as displayed) by ``30 m`` degrees about the image centre."""
    angle = torch.deg2rad(ROTATE_MAX * m)
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    # y points down, so a counter-clockwise turn on screen maps output (x, y) to input R(angle) (x, y)
    # with R = [[cos, -sin], [sin, cos]] read in (x, -y) coordinates.
    return warp(x, _affine(cos, -sin, zero, sin, cos, zero))


# -- occlusion -------------------------------------------------------------------------------------

def cutout(x: Tensor, noise: Tensor, size: float = 0.5) -> Tensor:
    """Grey out a square of side ``size`` x the image side, centred at ``noise`` (fractions of W, H).

    As in AutoAugment's cutout the square is clipped at the borders and filled with mid-grey (0.5).
    """
    h, w = x.shape[-2:]
    half_w, half_h = size * w / 2.0, size * h / 2.0
    cx, cy = noise[:, 0] * w, noise[:, 1] * h
    cols = torch.arange(w, device=x.device, dtype=x.dtype) + 0.5
    rows = torch.arange(h, device=x.device, dtype=x.dtype) + 0.5
    inside_x = (cols[None, :] - cx[:, None]).abs() < half_w
    inside_y = (rows[None, :] - cy[:, None]).abs() < half_h
    mask = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]
    return torch.where(mask, torch.full_like(x, 0.5), x)


@dataclass(frozen=True)
class OpSpec:
    """An operation of the policy.

    Attributes:
        fn: ``fn(x, magnitude, noise) -> x'``.
        magnitude: The policy learns a magnitude for it (else only a probability).
        signed: AutoAugment applies it in both directions (the policy draws a random sign per sample).
        moves_pixels: It changes the image's geometry (a pixel's content moves), so per-pixel targets and boxes
            would no longer match the image.
    """

    fn: Op
    magnitude: bool = True
    signed: bool = True
    moves_pixels: bool = False


def _cutout_op(x: Tensor, m: Tensor, noise: Tensor, size: float = 0.5) -> Tensor:
    return cutout(x, noise, size)


OPS: dict[str, OpSpec] = {
    "brightness": OpSpec(brightness),
    "contrast": OpSpec(contrast),
    "color": OpSpec(color),
    "sharpness": OpSpec(sharpness),
    "posterize": OpSpec(posterize, signed=False),
    "solarize": OpSpec(solarize, signed=False),
    "shear_x": OpSpec(shear_x, moves_pixels=True),
    "shear_y": OpSpec(shear_y, moves_pixels=True),
    "translate_x": OpSpec(translate_x, moves_pixels=True),
    "translate_y": OpSpec(translate_y, moves_pixels=True),
    "rotate": OpSpec(rotate, moves_pixels=True),
    "equalize": OpSpec(equalize, magnitude=False, signed=False),
    "invert": OpSpec(invert, magnitude=False, signed=False),
    "cutout": OpSpec(_cutout_op, magnitude=False, signed=False),
}
#: Operations that change nothing on one-channel images.
COLOUR_ONLY = frozenset({"color"})
