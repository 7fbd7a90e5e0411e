"""``shifted``: the original training images withheld; a pool of shifted, unlabelled images offered instead.

The setting of distillation from web data without the original training set (e.g. KD³, Tang et al., 2023). The
training split is divided once, by ``seed``, into two disjoint parts: the *originals* (``part: original`` returns
them, labelled: what the teacher may be trained on) and the *pool* (``part: pool``, the default): those images,
each under one fixed corruption, all unlabelled. A student trained on the pool never sees an original image.

Why this is a fair proxy for webly collected data: images crawled for the same label set are (1) other instances
than the curated training set's -- here, images disjoint from the originals; (2) unlabelled, or labelled too
noisily to use -- here, no labels; (3) of the same classes but differently distributed in their low-level
statistics -- other cameras, compression, resolution, lighting and poses -- here, fixed corruptions that stand for
those causes: Gaussian noise (sensor noise, compression), Gaussian blur (resolution, focus), reduced contrast
(exposure, lighting) and an elastic warp (pose and shape variation). The semantics stay those of the classes, as
KD³ assumes of web data. What it does not model: web images of other classes (use ``class_mismatch`` for that),
a shifted class balance, and shifts beyond these four corruptions.

Each pool image gets one corruption, the kinds in equal shares (random assignment), at ``severity`` 1-5; every
draw comes from generators seeded by ``seed``, so the pool is a pure function of the dataset and the parameters.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Le, Lt, MinLen
from torch import Tensor

from kdkit.data.base import UNLABELLED, ImageData
from kdkit.data.settings.common import labelled_only, with_train
from kdkit.data.settings.registry import register_setting

Corruption = Literal["noise", "blur", "contrast", "elastic"]
CORRUPTIONS: tuple[Corruption, ...] = ("noise", "blur", "contrast", "elastic")
#: Per-severity strength (1..5): noise std and contrast factor as ImageNet-C's; blur sigma and elastic displacement
#: in pixels of a 28x28 image (ImageNet-C's 224-pixel values would erase a 28-pixel object).
STRENGTH: dict[str, tuple[float, ...]] = {
    "noise": (0.08, 0.12, 0.18, 0.26, 0.38),  # std in [0, 1] units
    "blur": (0.5, 0.75, 1.0, 1.25, 1.5),  # Gaussian sigma, pixels
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),  # (x - mean) * c + mean
    "elastic": (1.0, 1.5, 2.0, 2.5, 3.0),  # largest displacement, pixels (field smoothed with sigma 3 px)
}
ELASTIC_SMOOTHING = 3.0


def split_original_pool(total: int, pool: float, seed: int) -> tuple[Tensor, Tensor]:
    """Disjoint ascending indices ``(originals, pool)`` covering ``range(total)``; ``round(pool * total)`` pooled."""
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    n_pool = min(max(1, round(pool * total)), total - 1)
    return perm[n_pool:].sort().values, perm[:n_pool].sort().values


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of float ``(B, C, H, W)``, reflect padding, radius ``ceil(3 sigma)`` (at most the
    image's side minus one, which reflect padding allows: a truncated kernel on tiny images)."""
    radius = max(1, min(math.ceil(3 * sigma), x.shape[2] - 1, x.shape[3] - 1))
    grid = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (grid / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1),
                 groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1),
                    groups=c)


def elastic(x: Tensor, displacement: float, generator: torch.Generator) -> Tensor:
    """Warp float ``(B, C, H, W)`` by a smooth random field whose largest displacement is ``displacement`` pixels."""
    b, _, h, w = x.shape
    field = gaussian_blur(torch.rand(b, 2, h, w, generator=generator, dtype=x.dtype) * 2 - 1, ELASTIC_SMOOTHING)
    field = field / field.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12) * displacement
    ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
    # pixel coordinates -> grid_sample's [-1, 1] (align_corners=False: pixel centres at (2i + 1) / n - 1)
    gx = (2 * (xs + field[:, 0]) + 1) / w - 1
    gy = (2 * (ys + field[:, 1]) + 1) / h - 1
    return F.grid_sample(x, torch.stack([gx, gy], dim=-1), mode="bilinear", padding_mode="border",
                         align_corners=False)


def corrupt(images: Tensor, kind: str, severity: int, generator: torch.Generator) -> Tensor:
    """``images`` (uint8 ``(B, C, H, W)``) under corruption ``kind`` at ``severity`` 1-5, as uint8."""
    x = images.to(torch.float32) / 255
    strength = STRENGTH[kind][severity - 1]
    if kind == "noise":
        x = x + strength * torch.randn(x.shape, generator=generator)
    elif kind == "blur":
        x = gaussian_blur(x, strength)
    elif kind == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * strength + mean
    else:
        x = elastic(x, strength, generator)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def shifted_pool(images: Tensor, corruptions: tuple[str, ...], severity: int, seed: int,
                 chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Each image under one corruption (equal shares, random assignment): ``(shifted images, kind index)``."""
    gen = torch.Generator().manual_seed(seed)
    kinds = torch.randperm(len(images), generator=gen) % len(corruptions)
    out = torch.empty_like(images)
    for k, kind in enumerate(corruptions):
        where = (kinds == k).nonzero().flatten()
        for start in range(0, len(where), chunk):
            part = where[start:start + chunk]
            out[part] = corrupt(images[part], kind, severity, gen)
    return out, kinds


@register_setting("shifted", help="originals withheld; an unlabelled pool of other training images under fixed "
                                  "corruptions (noise, blur, contrast, elastic)")
def shifted(data: ImageData, *, seed: int, pool: Annotated[float, Gt(0), Lt(1)] = 0.5,
            part: Literal["pool", "original"] = "pool",
            corruptions: Annotated[tuple[Corruption, ...], MinLen(1)] = CORRUPTIONS,
            severity: Annotated[int, Ge(1), Le(5)] = 3) -> ImageData:
    """The shifted unlabelled pool (default), or the withheld originals (``part: original``), of one split.

    Args:
        data: The dataset.
        seed: Seed of the split, the corruption assignment and the corruptions' noise.
        pool: Fraction of the training images that make the pool; the rest are the originals.
        part: ``pool``: the shifted, unlabelled pool (the student's data); ``original``: the labelled originals
            (the teacher's), disjoint from the pool.
        corruptions: The corruption kinds, in equal shares.
        severity: Strength of every corruption, 1 (mild) to 5.

    Returns:
        The part's images (pool: shifted and unlabelled) in their original order; test split unchanged.
    """
    labelled_only(data, "shifted")
    originals, pooled = split_original_pool(len(data.train_labels), pool, seed)
    if part == "original":
        return with_train(data, originals, data.train_labels[originals],
                          name=f"{data.name}-originals{pool:g}-seed{seed}",
                          source=f"the {len(originals)} original training images of the shifted setting (the pool of "
                                 f"{len(pooled)} withheld; setting seed {seed})")
    images, _ = shifted_pool(data.train_images[pooled], tuple(corruptions), severity, seed + 1)
    labels = torch.full((len(pooled),), UNLABELLED, dtype=torch.int64)
    return with_train(data, pooled, labels, images=images, name=f"{data.name}-shifted{pool:g}-s{severity}-seed{seed}",
                      source=f"shifted pool: {len(pooled)} unlabelled training images under {', '.join(corruptions)} "
                             f"(severity {severity}); the {len(originals)} originals withheld (setting seed {seed})")
