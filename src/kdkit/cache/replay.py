"""Training from a cache: the loader replays the stored views, the teacher reads the stored outputs.

Both sides compute the view of sample ``i`` in epoch ``e`` with the same pure function
(:func:`~kdkit.cache.views.view_schedule`), so they agree without sharing state, and an interrupted
run resumes with the same views.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdkit.cache.store import TeacherCache
from kdkit.cache.views import apply_views, view_phase, view_schedule
from kdkit.data.augment import AugmentConfig
from kdkit.errors import KdkitError


class ViewReplay:
    """The loader's augmentation when training from a cache: view ``(epoch + r_i) mod K`` of image ``i``.

    Args:
        cache: The opened cache (its view table).
        augment: The augmentation the views were drawn for.
        seed: The cache's view seed (sets the phases ``r_i``).
    """

    def __init__(self, cache: TeacherCache, augment: AugmentConfig, seed: int) -> None:
        self.cache = cache
        self.augment = augment
        self.phase = view_phase(cache.num_samples, cache.num_views, seed)

    def views(self, index: Tensor, epoch: int) -> Tensor:
        """The view each sample of ``index`` reads in ``epoch``."""
        return view_schedule(self.phase, index, epoch, self.cache.num_views)

    def __call__(self, images: Tensor, index: Tensor, epoch: int) -> Tensor:
        """Replay the stored views of ``images`` (the raw images of samples ``index``)."""
        table = self.cache.views
        rows = table[index.to(table.device), self.views(index, epoch).to(table.device)]
        return apply_views(images, rows, self.augment)


class CachedTeacher(nn.Module):
    """Stands in for :class:`~kdkit.distill.FrozenTeacher`: returns stored outputs, runs no network.

    Args:
        replay: The loader's replay (the same view schedule).
    """

    def __init__(self, replay: ViewReplay) -> None:
        super().__init__()
        self.replay = replay

    @torch.no_grad()
    def forward(self, x: Tensor, index: Tensor | None = None, epoch: int = 0) -> dict[str, Tensor]:
        """Stored outputs for the batch of samples ``index`` in ``epoch`` (``x`` is not read)."""
        if index is None or len(index) != len(x):
            raise KdkitError("a cached teacher needs the dataset index of every sample of the batch",
                             fix="train from a BatchLoader built with the cache's replay (runner does this)")
        return self.replay.cache.lookup(index, self.replay.views(index, epoch))
