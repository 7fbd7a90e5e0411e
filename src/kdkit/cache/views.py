"""Stored augmented views: the crop offsets and flip flag of view ``k`` of every training image.

A cache is only exact if training replays precisely the images the teacher saw. So the views are
data, not a random process: :func:`draw_views` draws them once, they are stored with the cache, and
both the cache builder and the training loader turn them into pixels with the same function,
:func:`apply_views`. Which view a sample reads in an epoch is a pure function of (sample, epoch)
(:func:`view_schedule`), so an interrupted run resumes with the same views.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdkit.data.augment import AugmentConfig, crop

#: Columns of a view table: vertical crop offset, horizontal crop offset, flip flag.
OY, OX, FLIP = 0, 1, 2


def draw_views(num_samples: int, views: int, augment: AugmentConfig, seed: int) -> Tensor:
    """Draw ``views`` augmentation parameters for each of ``num_samples`` images.

    Offsets are uniform in ``[0, 2 * crop_padding]`` (the range :func:`kdkit.data.augment.random_crop`
    draws from; 0 when cropping is off) and flips are fair coins when ``augment.hflip`` is on (else 0).

    Args:
        num_samples: Training images ``N``.
        views: Views per image ``K``.
        augment: The recipe's augmentation.
        seed: Seed of the draw.

    Returns:
        int16 tensor ``(N, K, 3)`` with columns ``(oy, ox, flip)``.
    """
    gen = torch.Generator().manual_seed(seed)
    pad = augment.crop_padding
    table = torch.zeros(num_samples, views, 3, dtype=torch.int16)
    if pad:
        table[..., :2] = torch.randint(0, 2 * pad + 1, (num_samples, views, 2), generator=gen, dtype=torch.int16)
    if augment.hflip:
        table[..., FLIP] = (torch.rand(num_samples, views, generator=gen) < 0.5).to(torch.int16)
    return table


def apply_views(images: Tensor, params: Tensor, augment: AugmentConfig) -> Tensor:
    """Produce the stored views: crop image ``i`` at ``params[i, :2]``, then flip it if ``params[i, 2]``.

    Args:
        images: ``(B, C, H, W)`` images (uint8 straight from the dataset).
        params: ``(B, 3)`` rows of a view table (any integer dtype, any device).
        augment: The augmentation the table was drawn for (its ``crop_padding``).

    Returns:
        The augmented images, same shape, dtype and device.
    """
    params = params.to(images.device, torch.int64)
    if augment.crop_padding:
        images = crop(images, augment.crop_padding, params[:, OY], params[:, OX])
    if augment.hflip:
        images = torch.where(params[:, FLIP].bool().view(-1, 1, 1, 1), images.flip(-1), images)
    return images


def as_loader_views(params: Tensor, augment: AugmentConfig) -> Tensor | None:
    """Rows of a view table as the loader's views ``(dy, dx, flip)`` (:meth:`AugmentConfig.draw`'s convention:
    offsets from the centred crop), so targets tied to pixels follow a replayed view as they follow a drawn one.

    Args:
        params: ``(B, 3)`` rows of a view table.
        augment: The augmentation the table was drawn for.

    Returns:
        int64 ``(B, 3)``, or ``None`` when ``augment`` is off (the images keep their geometry).
    """
    if augment.is_identity:
        return None
    view = params.to(torch.int64).clone()
    view[:, :2] -= augment.crop_padding
    return view


def view_phase(num_samples: int, views: int, seed: int) -> Tensor:
    """Per-sample phase ``r_i`` of :func:`view_schedule`: uniform in ``[0, views)``, int64 ``(N,)``."""
    gen = torch.Generator().manual_seed(seed * 7919 + 1)
    return torch.randint(0, views, (num_samples,), generator=gen)


def view_schedule(phase: Tensor, index: Tensor, epoch: int, views: int) -> Tensor:
    """The view sample ``index`` reads in ``epoch``: ``(epoch + r_index) mod views``.

    Every view of an image is used once every ``views`` epochs (as FKD replays each stored crop), and
    the phases spread the views of one batch over all ``K``.
    """
    return (phase.to(index.device).index_select(0, index) + epoch) % views
