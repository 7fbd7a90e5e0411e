"""Batched augmentation equals per-sample references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdkit.data import AugmentConfig, normalize, random_crop, random_hflip
from kdkit.errors import KdkitError


def batch(dtype: torch.dtype = torch.uint8, shape: tuple[int, ...] = (16, 3, 6, 6)) -> torch.Tensor:
    x = torch.randint(1, 256, shape, generator=torch.Generator().manual_seed(0))
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("padding", [1, 2, 4])
def test_random_crop_matches_reference(dtype: torch.dtype, padding: int) -> None:
    x = batch(dtype)
    out = random_crop(x, padding, torch.Generator().manual_seed(7))
    # Reference: offsets drawn as documented, then pad + slice sample by sample.
    off = torch.randint(0, 2 * padding + 1, (2, x.shape[0]), generator=torch.Generator().manual_seed(7))
    h, w = x.shape[-2:]
    ref = torch.stack([F.pad(img, [padding] * 4)[:, oy:oy + h, ox:ox + w]
                       for img, oy, ox in zip(x, off[0].tolist(), off[1].tolist(), strict=True)])
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, ref)
    assert len(set(zip(off[0].tolist(), off[1].tolist(), strict=True))) > 1  # offsets vary per sample


def test_random_crop_identity_and_errors() -> None:
    x = batch()
    assert random_crop(x, 0) is x
    with pytest.raises(KdkitError, match="padding"):
        random_crop(x, -1)
    with pytest.raises(KdkitError, match="B, C, H, W"):
        random_crop(x[0], 2)


def test_random_crop_nonsquare_and_default_generator() -> None:
    x = batch(shape=(5, 1, 4, 7))
    out = random_crop(x, 3)
    assert out.shape == x.shape


def test_random_hflip() -> None:
    x = batch()
    assert torch.equal(random_hflip(x, 1.0), x.flip(-1))
    assert random_hflip(x, 0.0) is x
    out = random_hflip(x, 0.5, torch.Generator().manual_seed(1))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert torch.all(flipped | kept) and flipped.any() and kept.any()
    with pytest.raises(KdkitError):
        random_hflip(x, 1.5)


def test_normalize_matches_manual() -> None:
    x = batch()
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    out = normalize(x, mean, std)
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    ref = (x.double() / 255 - m) / s
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert normalize(x[:, :1], (0.5,), (0.25,), dtype=torch.float64).dtype == torch.float64
    with pytest.raises(KdkitError, match="channels"):
        normalize(x, (0.1, 0.2), (0.1, 0.2))
    with pytest.raises(KdkitError, match="uint8"):
        normalize(x.float(), mean, std)


def test_augment_config() -> None:
    x = batch()
    assert AugmentConfig().apply(x, torch.Generator()) is x and AugmentConfig().is_identity
    cfg = AugmentConfig(crop_padding=2, hflip=True)
    a = cfg.apply(x, torch.Generator().manual_seed(3))
    b = cfg.apply(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == x.dtype and not torch.equal(a, x)
    with pytest.raises(KdkitError):
        AugmentConfig(crop_padding=-2)


def test_map_images_is_the_batched_normalised_pass_over_every_image() -> None:
    from kdkit.data import map_images

    images = torch.randint(0, 256, (7, 2, 3, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    weight = torch.randn(18, 4, dtype=torch.float64, requires_grad=True)
    calls = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return x.flatten(1).double() @ weight

    out = map_images(fn, images, (0.2, 0.4), (0.5, 0.25), "cpu", batch_size=3)
    reference = torch.stack([normalize(img[None], (0.2, 0.4), (0.5, 0.25)).flatten().double() @ weight
                             for img in images])
    assert calls == [3, 3, 1] and out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out, reference.float())
    with pytest.raises(ValueError, match="at least one image"):
        map_images(fn, images[:0], (0.2, 0.4), (0.5, 0.25), "cpu")
