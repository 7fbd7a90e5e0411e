"""Build a teacher cache: run the teacher once over K stored views of every training image.

Plain objects in, a finished cache folder out: the teacher, the training images, the cache's identity
(:mod:`kdkit.teacher_cache` derives it from a recipe) and the folder. The writer finalises atomically, so a
folder either holds a whole cache or nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit.cache.store import CacheWriter, TapLayout
from kdkit.cache.views import apply_views, draw_views
from kdkit.data.augment import AugmentConfig, normalize
from kdkit.data.base import ImageData
from kdkit.errors import KdkitError
from kdkit.taps import LOGITS


def write_cache(teacher: nn.Module, data: ImageData, identity: dict[str, Any], folder: Path, *,
                device: torch.device, batch_size: int = 512, overwrite: bool = False, progress: bool = True) -> Path:
    """Run ``teacher`` over every stored view of every training image of ``data`` and write the cache.

    Args:
        teacher: The frozen teacher: ``teacher(x)`` returns its taps by spec (``logits`` and those in
            ``identity["taps"]``).
        data: The training images (uint8) and their normalisation.
        identity: What the cache holds (``augment``, ``views``, ``seed``, ``taps``, ``logits``, ``topk``,
            ``dtype``): see :func:`kdkit.teacher_cache.cache_identity`.
        folder: Final cache folder.
        device: Where the teacher runs.
        batch_size: Images per teacher forward.
        overwrite: Replace an existing folder.
        progress: Show a progress bar.

    Raises:
        KdkitError: The teacher does not produce a tap the identity lists.
    """
    augment = AugmentConfig(**identity["augment"])
    n, k = len(data.train_labels), identity["views"]
    table = draw_views(n, k, augment, identity["seed"])
    images = data.train_images.to(device)
    specs = identity["taps"]
    with torch.inference_mode():
        probe = teacher(normalize(images[:2], data.mean, data.std))
    missing = [s for s in specs if s not in probe]
    if missing:
        raise KdkitError(f"the teacher does not produce tap {missing[0]!r}", choices=sorted(probe), bad=missing[0])
    layouts = [TapLayout(s, tuple(probe[s].shape[1:]), "topk" if s == LOGITS and identity["logits"] == "topk" else
                         "full", identity["topk"] if s == LOGITS else 0) for s in specs]
    writer = CacheWriter(folder, identity, table, layouts, identity["dtype"])
    started = time.perf_counter()
    try:
        with _progress(progress, n * k, f"teacher cache ({k} views x {n} images)") as advance:
            for start in range(0, n, batch_size):
                rows = slice(start, min(start + batch_size, n))
                raw = images[rows]
                for view in range(k):
                    x = normalize(apply_views(raw, table[rows, view], augment), data.mean, data.std)
                    with torch.inference_mode():
                        writer.write(rows, view, teacher(x))
                    advance(len(raw))
        seconds = time.perf_counter() - started
        return writer.finalize({"teacher_seconds": round(seconds, 2), "device": str(device)}, overwrite=overwrite)
    except BaseException:
        writer.abort()
        raise


class _progress:
    """A rich progress bar (or nothing) whose ``advance(n)`` counts images."""

    def __init__(self, show: bool, total: int, label: str) -> None:
        self.show, self.total, self.label = show, total, label
        self.bar: Any = None

    def __enter__(self) -> Any:
        if not self.show:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            transient=True)
        self.bar.__enter__()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda n: self.bar.update(task, advance=n)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
