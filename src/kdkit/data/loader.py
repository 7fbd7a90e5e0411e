"""A batch loader over in-memory uint8 tensors: indexing, augmentation and normalisation on the device.

Replaces a DataLoader with per-sample transforms: one gather, one batched augmentation and one fused
normalisation per batch (see ``shared/perf-notes.md``: ~0.15 ms instead of ~10 ms per batch of 128).

Order and augmentation are a pure function of ``(seed, epoch, batch)``, so a run resumed in the
middle of an epoch sees exactly the batches an uninterrupted run would have seen. Under DDP each rank
reads a disjoint slice of the same permutation (global batch = ``batch_size * world_size``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from kdkit.data.augment import AugmentConfig, normalize
from kdkit.data.base import ImageData
from kdkit.data.strong import StrongView

#: A teacher cache's replay: ``(raw images, sample indices, epoch) -> (stored views, their (dy, dx, flip) or None)``.
Replay = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor | None]]


class BatchLoader:
    """Batches of ``(images, labels)`` from tensors held in memory.

    Args:
        images: uint8 ``(N, C, H, W)``.
        labels: int64 ``(N,)``.
        batch_size: Samples per batch on each rank.
        mean: Per-channel mean in [0, 1] units, for normalisation.
        std: Per-channel std.
        device: Where batches are produced (the data is copied there once).
        augment: Batched augmentation (``None``: none).
        shuffle: Shuffle each epoch (training) or keep order (evaluation).
        drop_last: Drop the last incomplete batch (training).
        seed: Base seed of the order and the augmentation.
        rank: This process's rank under DDP.
        world_size: Number of DDP processes.
        channels_last: Produce channels-last batches.
        strong: A second, strongly augmented view of the same images: batches become
            ``[weak; strong]`` with labels and indices repeated (two-view methods such as MLKD).
        replay: Replaces ``augment``: ``replay(images, index, epoch)`` returns stored views of the
            images and their ``(B, 3)`` ``(dy, dx, flip)`` views (``None`` when they keep their geometry), so
            dense targets follow them too (training from a teacher cache, :class:`kdkit.cache.ViewReplay`).
    """

    def __init__(self, images: Tensor, labels: Tensor, *, batch_size: int, mean: Sequence[float],
                 std: Sequence[float], device: torch.device | str = "cpu", augment: AugmentConfig | None = None,
                 shuffle: bool = True, drop_last: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False, strong: StrongView | None = None,
                 replay: Replay | None = None) -> None:
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment = augment
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.channels_last = channels_last
        self.strong = strong
        self.replay = replay
        n, step = len(self.labels), batch_size * world_size
        self._batches = n // step if drop_last else -(-n // step)

    def __len__(self) -> int:
        return self._batches

    @property
    def num_samples(self) -> int:
        """Samples in the dataset."""
        return len(self.labels)

    def _order(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(len(self.labels), device=self.device)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.labels), generator=gen).to(self.device)

    def batch_indices(self, epoch: int) -> Iterator[Tensor]:
        """The sample indices of this rank's batches in ``epoch``."""
        order = self._order(epoch)
        for b in range(self._batches):
            start = (b * self.world_size + self.rank) * self.batch_size
            yield order[start:start + self.batch_size]

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Yield ``(x, y, index)`` for batches ``start..`` of ``epoch``.

        ``x`` is float, normalised, on the device; ``index`` holds the samples' dataset indices (CRD
        and other instance-level methods need them).
        """
        for x, y, index, _ in self.epoch_views(epoch, start):
            yield x, y, index

    def epoch_views(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor | None]]:
        """As :meth:`epoch`, with each batch's views: ``(x, y, index, view)``.

        ``view`` is the ``(B, 3)`` ``(dy, dx, flip)`` of each sample's random crop and flip
        (:meth:`AugmentConfig.draw`), for targets tied to pixels to follow the images
        (:func:`~kdkit.data.augment.follow_maps`, :func:`~kdkit.data.augment.follow_boxes`); ``None`` when the images
        keep their geometry (no augmentation) or their geometry is not given by a view (a strong view).
        """
        gen = torch.Generator()
        for b, idx in enumerate(self.batch_indices(epoch)):
            if b < start:
                continue
            if len(idx) == 0:
                return
            raw = self.images.index_select(0, idx)
            labels = self.labels.index_select(0, idx)
            batch_seed = (self.seed * 1_000_003 + epoch) * 100_003 + b
            view = None
            if self.replay is not None:
                raw, view = self.replay(raw, idx, epoch)
            elif self.augment is not None and not self.augment.is_identity:
                gen.manual_seed(batch_seed)
                view = self.augment.draw(len(idx), gen)
                raw = self.augment.apply_view(raw, view)
            if self.strong is not None:
                raw = torch.cat([raw, self.strong(raw, batch_seed)])
                labels, idx, view = labels.repeat(2), idx.repeat(2), None
            x = normalize(raw, self.mean, self.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, labels, idx, view

def make_loaders(data: ImageData, *, batch_size: int, eval_batch_size: int = 1000,
                 augment: AugmentConfig | None = None, device: torch.device | str = "cpu", seed: int = 0,
                 rank: int = 0, world_size: int = 1, channels_last: bool = False,
                 strong: StrongView | None = None,
                 replay: Replay | None = None) -> tuple[BatchLoader, BatchLoader]:
    """The training loader (shuffled, augmented, full batches) and the test loader of ``data``.

    Args:
        data: An in-memory dataset.
        batch_size: Training samples per batch on each process.
        eval_batch_size: Test samples per batch.
        augment: Batched training augmentation.
        device: Where batches are produced.
        seed: Seed of the order and the augmentation.
        rank: This process's rank (DDP).
        world_size: Number of processes (DDP).
        channels_last: Produce channels-last batches (match a channels-last model).
        strong: Strong second view of each training batch (two-view methods).
        replay: Stored views replacing ``augment`` (teacher cache).
    """
    train = BatchLoader(data.train_images, data.train_labels, batch_size=batch_size, mean=data.mean, std=data.std,
                        device=device, augment=augment, shuffle=True, drop_last=True, seed=seed, rank=rank,
                        world_size=world_size, channels_last=channels_last, strong=strong, replay=replay)
    test = BatchLoader(data.test_images, data.test_labels, batch_size=eval_batch_size, mean=data.mean, std=data.std,
                       device=device, shuffle=False, drop_last=False, rank=rank, world_size=world_size,
                       channels_last=channels_last)
    return train, test


@torch.no_grad()
def map_images(fn: Callable[[Tensor], Tensor], images: Tensor, mean: Sequence[float], std: Sequence[float],
               device: torch.device | str, batch_size: int = 500) -> Tensor:
    """``fn`` over un-augmented uint8 ``images`` ``(N, C, H, W)``, normalised batch by batch on ``device``.

    The one pass every "a frozen network over the training images" computation makes (a teacher's logits for a data
    setting, a method's table of features, a student's predictions between rounds): no gradient, float32 outputs.
    The caller puts the network in eval mode.

    Args:
        fn: Maps a normalised float batch ``(b, C, H, W)`` to a tensor ``(b, ...)``.
        images: uint8 images.
        mean: Per-channel mean of :func:`~kdkit.data.augment.normalize`.
        std: Per-channel standard deviation.
        device: Where each batch is normalised and ``fn`` runs.
        batch_size: Images per call of ``fn``.

    Returns:
        ``(N, ...)`` float32, on ``fn``'s output device.

    Raises:
        ValueError: No image (there is no output shape to give).
    """
    if len(images) == 0:
        raise ValueError("map_images needs at least one image")
    return torch.cat([fn(normalize(images[start:start + batch_size].to(device), mean, std)).float()
                      for start in range(0, len(images), batch_size)])
