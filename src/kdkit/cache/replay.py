"""Training from a cache: the loader replays the stored views, the teacher reads the stored outputs.

Both sides compute the view of sample ``i`` in epoch ``e`` with the same pure function
(:func:`~kdkit.cache.views.view_schedule`), so they agree without sharing state, and an interrupted
run resumes with the same views.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdkit.cache.store import TeacherCache
from kdkit.cache.views import apply_views, as_loader_views, view_phase, view_schedule
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
        self.kept: Tensor | None = None

    def keep(self, kept: Tensor) -> None:
        """Replay only some stored views of each image: image ``i`` reads ``kept[i, (epoch + r_i) mod K']``.

        For methods that select views by their stored teacher outputs (the loader and the cached teacher share
        this replay, so both switch together). ``kept`` must be a pure function of the cache, so a resumed run
        selects the same views.

        Args:
            kept: ``(N, K')`` int64 view indices, ``1 <= K' <= K``.
        """
        n, k = self.cache.num_samples, self.cache.num_views
        if kept.ndim != 2 or kept.shape[0] != n or not 1 <= kept.shape[1] <= k:
            raise ValueError(f"kept views must be (N={n}, K') with 1 <= K' <= {k}, got {tuple(kept.shape)}")
        if int(kept.min()) < 0 or int(kept.max()) >= k:
            raise ValueError(f"kept views must index the {k} stored views, got values in "
                             f"[{int(kept.min())}, {int(kept.max())}]")
        self.kept = kept.to(torch.int64)

    def slots(self, index: Tensor, epoch: int) -> Tensor:
        """Which of its replayed views (a column of the kept table, or a stored view) each sample reads."""
        width = self.cache.num_views if self.kept is None else self.kept.shape[1]
        return view_schedule(self.phase, index, epoch, width)

    def views(self, index: Tensor, epoch: int) -> Tensor:
        """The stored view each sample of ``index`` reads in ``epoch``."""
        slots = self.slots(index, epoch)
        if self.kept is None:
            return slots
        return self.kept.to(index.device)[index, slots]

    def __call__(self, images: Tensor, index: Tensor, epoch: int) -> tuple[Tensor, Tensor | None]:
        """Replay the stored views of ``images`` (the raw images of samples ``index``).

        Returns:
            The views' images and their ``(B, 3)`` ``(dy, dx, flip)`` in the loader's convention (``None`` without
            augmentation), for targets tied to pixels to follow them.
        """
        table = self.cache.views
        rows = table[index.to(table.device), self.views(index, epoch).to(table.device)]
        view = as_loader_views(rows, self.augment)
        return apply_views(images, rows, self.augment), None if view is None else view.to(images.device)


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
