"""TST's differentiable operations behave like torchvision's AutoAugment operations and pass gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from kdkit.methods.tst import ops


def smooth_image(channels: int = 3, size: int = 24) -> torch.Tensor:
    """A smooth (C, H, W) image in [0.25, 0.75]: bilinear resampling has no aliasing to hide errors."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    planes = [torch.sin(xx / 5) * torch.cos(yy / 7), torch.cos(xx / 4 + yy / 9), torch.sin((xx - yy) / 6)]
    return torch.stack(planes[:channels]) * 0.25 + 0.5


def uint8_batch(channels: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, channels, 12, 12), dtype=torch.uint8, generator=gen)


@pytest.mark.parametrize("m", [0.3, -0.7, 1.0])
def test_shear_and_rotate_match_torchvision_affine(m: float) -> None:
    img = smooth_image()
    x, mm = img[None].repeat(2, 1, 1, 1), torch.full((2,), m)
    level = ops.SHEAR_MAX * m
    # torchvision's AutoAugment: shear angle atan(level) degrees about the top-left corner (PIL's affine)
    for fn, shear in ((ops.shear_x, [math.degrees(math.atan(level)), 0.0]),
                      (ops.shear_y, [0.0, math.degrees(math.atan(level))])):
        ref = TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear,
                        interpolation=InterpolationMode.BILINEAR, center=[0, 0])
        torch.testing.assert_close(fn(x, mm)[1], ref, atol=1e-5, rtol=0)
    ref = TF.rotate(img, ops.ROTATE_MAX * m, interpolation=InterpolationMode.BILINEAR)
    torch.testing.assert_close(ops.rotate(x, mm)[0], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pixels", [3, -5, 8])
def test_translate_matches_torchvision_at_whole_pixels(pixels: int) -> None:
    img = smooth_image()
    x = img[None]
    m = torch.tensor([pixels / (ops.TRANSLATE_MAX * img.shape[-1])])
    for fn, shift in ((ops.translate_x, [pixels, 0]), (ops.translate_y, [0, pixels])):
        ref = TF.affine(img, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0],
                        interpolation=InterpolationMode.BILINEAR)
        torch.testing.assert_close(fn(x, m)[0], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("m", [0.4, -0.8, 1.0])
def test_enhance_ops_match_torchvision(channels: int, m: float) -> None:
    u8 = uint8_batch(channels)
    x, mm = u8.float() / 255, torch.full((3,), m)
    factor = 1.0 + ops.ENHANCE_MAX * m
    refs = {"brightness": TF.adjust_brightness(x, factor), "contrast": TF.adjust_contrast(x, factor),
            "sharpness": TF.adjust_sharpness(x, factor)}
    if channels == 3:
        refs["color"] = TF.adjust_saturation(x, factor)
    for name, ref in refs.items():
        # torchvision's grey weights are 0.2989/0.587/0.114, kornia's 0.299/0.587/0.114
        torch.testing.assert_close(getattr(ops, name)(x, mm), ref, atol=2e-4, rtol=0, msg=name)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("m", [0.0, 0.25, 0.5, 1.0])
def test_posterize_keeps_8_minus_4m_bits(channels: int, m: float) -> None:
    u8 = uint8_batch(channels, seed=1)
    out = ops.posterize(u8.float() / 255, torch.full((3,), m))
    ref = TF.posterize(u8, 8 - round(4 * m)).float() / 255
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("level", [0, 77, 128, 255])
def test_solarize_inverts_from_threshold(level: int) -> None:
    u8 = uint8_batch(3, seed=2)
    m = 1.0 - level / 255  # threshold 1 - m = level / 255 exactly
    out = ops.solarize(u8.float() / 255, torch.full((3,), m))
    ref = TF.solarize(u8, level).float() / 255
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels", [3, 1])
def test_equalize_and_invert_match_torchvision(channels: int) -> None:
    u8 = uint8_batch(channels, seed=3)
    x = u8.float() / 255
    torch.testing.assert_close(ops.equalize(x), TF.equalize(u8).float() / 255, atol=1e-6, rtol=0)
    torch.testing.assert_close(ops.invert(x), TF.invert(u8).float() / 255, atol=1e-6, rtol=0)


def test_cutout_greys_a_clipped_square() -> None:
    x = torch.zeros(2, 3, 10, 10)
    centres = torch.tensor([[0.5, 0.5], [0.0, 1.0]])  # the middle; the bottom-left corner
    out = ops.cutout(x, centres, size=0.4)
    grey = (out == 0.5).all(dim=1)
    assert grey[0].sum() == 16 and grey[0][3:7, 3:7].all()  # 4x4 square around the centre
    assert grey[1].sum() == 4 and grey[1][8:, :2].all()  # clipped to its 2x2 quarter inside the image


@pytest.mark.parametrize("name", [n for n, spec in ops.OPS.items() if spec.magnitude])
def test_magnitude_gradients_are_finite_and_nonzero(name: str) -> None:
    x = smooth_image(3, 16)[None].repeat(4, 1, 1, 1)
    m = torch.tensor([0.2, 0.5, -0.6, 0.9], requires_grad=True)
    if not ops.OPS[name].signed:
        m = m.detach().abs().requires_grad_()
    out = ops.OPS[name].fn(x, m, torch.rand(4, 2))
    (grad,) = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), m)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["brightness", "contrast", "color", "sharpness", "shear_x", "shear_y",
                                  "translate_x", "translate_y", "rotate", "posterize"])
def test_zero_magnitude_is_identity(name: str) -> None:
    # (not solarize: AutoAugment's weakest solarize, threshold 255, still inverts pure white)
    x = uint8_batch(3, seed=4).float() / 255
    torch.testing.assert_close(ops.OPS[name].fn(x, torch.zeros(3), torch.rand(3, 2)), x, atol=1e-5, rtol=0)
