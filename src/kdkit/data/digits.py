"""The ``digits`` dataset: scikit-learn's bundled 8x8 handwritten digits, for zero-setup runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdkit.data.base import ImageData, channel_stats
from kdkit.data.registry import register_dataset
from kdkit.errors import KdkitError


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``uint8`` images ``(N, C, H, W)`` to ``size`` x ``size`` with bilinear interpolation.

    Downscaling is antialiased; results are rounded and clamped back to ``uint8``.

    Args:
        images: ``uint8`` tensor ``(N, C, H, W)``.
        size: Output height and width.

    Returns:
        ``uint8`` tensor ``(N, C, size, size)``; the input itself if it already has that size.
    """
    if tuple(images.shape[-2:]) == (size, size):
        return images
    downscale = size < max(images.shape[-2:])
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=downscale)
    return out.round_().clamp_(0, 255).to(torch.uint8).contiguous()


@register_dataset("digits", help="scikit-learn's bundled 8x8 digits (1797 images, 10 classes; no download)")
def digits(root: str | Path | None = None, image_size: int = 8, test_fraction: float = 0.2,
           seed: int = 0) -> ImageData:
    """scikit-learn's 1797 bundled 8x8 handwritten digits, as 1-channel ``uint8`` images.

    Pixel values 0..16 are scaled to ``round(v * 255 / 16)``. The split is scikit-learn's stratified
    ``train_test_split(test_size=test_fraction, random_state=seed)``, so it is deterministic; both splits
    keep the original sample order. mean/std are computed from the train split after resizing.

    Args:
        root: Must be ``None``: the data ships with scikit-learn.
        image_size: Output height/width; 8 keeps the originals, e.g. 28 upsamples bilinearly so models
            built for 28x28 inputs run unchanged.
        test_fraction: Fraction of each class held out for the test split, in ``(0, 1)``.
        seed: Seed of the split.

    Returns:
        The dataset (1437 train / 360 test images with the defaults).

    Raises:
        KdkitError: If ``root`` is given or a parameter is out of range.
    """
    if root is not None:
        raise KdkitError(f"dataset 'digits' needs no root (it ships with scikit-learn), got {str(root)!r}",
                         fix="remove data.root", where="data.root")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise KdkitError(f"digits image_size must be a positive integer, got {image_size!r}",
                         fix="use e.g. image_size: 8 (native) or 28", where="data.image_size")
    if not 0 < test_fraction < 1:
        raise KdkitError(f"digits test_fraction must be between 0 and 1, got {test_fraction!r}",
                         fix="use e.g. test_fraction: 0.2", where="data.test_fraction")
    # Imported here: scikit-learn is slow to import and only this reader needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    values = np.asarray(bunch.images, dtype=np.float64)  # (1797, 8, 8), integers 0..16
    images = torch.from_numpy(np.rint(values * 255.0 / 16.0).clip(0, 255).astype(np.uint8)).unsqueeze(1)
    images = resize_uint8(images, image_size)
    labels = np.asarray(bunch.target, dtype=np.int64)
    try:
        train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_fraction, stratify=labels,
                                               random_state=seed, shuffle=True)
    except ValueError as e:  # too few samples per class for the fraction
        raise KdkitError(f"cannot split digits with test_fraction {test_fraction} ({e})",
                         fix="use e.g. test_fraction: 0.2", where="data.test_fraction") from None
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    train_images = images[torch.from_numpy(train_idx)].contiguous()
    mean, std = channel_stats(train_images)
    return ImageData(
        name="digits",
        train_images=train_images,
        train_labels=torch.from_numpy(labels[train_idx]),
        test_images=images[torch.from_numpy(test_idx)].contiguous(),
        test_labels=torch.from_numpy(labels[test_idx]),
        classes=tuple(str(int(c)) for c in bunch.target_names),
        mean=mean,
        std=std,
        source=f"sklearn.datasets.load_digits (8x8{f' resized to {image_size}x{image_size}' if image_size != 8 else ''}"
               f", test_fraction {test_fraction}, split seed {seed})",
    )
