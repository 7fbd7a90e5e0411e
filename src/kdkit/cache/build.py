"""``kdkit cache build``: run the teacher once over K stored views of every training image.

What a cache holds is fixed by its *identity*: the teacher's architecture and weights (SHA-256 of the
weights file), the training images (SHA-256 of their bytes) and normalisation, the augmentation, the
number of views, the view seed, the stored taps and their storage. The default folder is named by the
identity's hash, so every recipe (and every student seed) needing the same outputs shares one cache,
and a cache can never be silently reused for something else: an explicit ``teacher.cache.dir`` whose
manifest differs is refused.

One process builds a cache folder at a time (:mod:`kdkit.locks`): runs that need the same missing cache
wait for the first one's build and use it (its identity is checked like any other cache's).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kdkit.build import Plan, teacher_weights
from kdkit.cache.replay import CachedTeacher, ViewReplay
from kdkit.cache.store import (
    FORMAT,
    CacheWriter,
    TapLayout,
    TeacherCache,
    file_sha256,
    identity_key,
    remove_partials,
    tensor_sha256,
)
from kdkit.cache.views import apply_views, draw_views
from kdkit.data.augment import AugmentConfig, normalize
from kdkit.distill import as_specs
from kdkit.errors import KdkitError
from kdkit.locks import exclusive
from kdkit.recipe import Recipe
from kdkit.taps import LOGITS

CACHE_ROOT = Path("runs/cache")


def recipe_augment(recipe: Recipe) -> AugmentConfig:
    """The recipe's batched augmentation."""
    return AugmentConfig(crop_padding=recipe.data.augment.crop_padding, hflip=recipe.data.augment.hflip)


def stored_taps(built: Plan) -> list[str]:
    """Teacher tap specs the recipe's terms read, in first-use order."""
    specs: list[str] = []
    for term in built.objective.terms:
        if term.teacher_tap is None or term.teacher_is_peer:  # no frozen teacher behind it
            continue
        for spec in as_specs(term.teacher_tap):
            if spec not in specs:
                specs.append(spec)
    return specs


def cache_identity(recipe: Recipe, built: Plan, source: Path | None = None) -> dict[str, Any]:
    """Everything that determines a cache's content (see the module docstring)."""
    assert recipe.teacher is not None and recipe.teacher.cache is not None and built.data is not None
    spec, data = recipe.teacher.cache, built.data
    weights = teacher_weights(recipe.teacher, source.parent if source else None)
    augment = recipe_augment(recipe)
    identity = {
        "format": FORMAT,
        "teacher": {"arch": recipe.teacher.arch, "params": recipe.teacher.params,
                    "weights_sha256": file_sha256(weights)},
        "data": {"dataset": recipe.data.dataset, "params": recipe.data.params, "subset": recipe.data.subset,
                 "subset_seed": recipe.data.subset_seed, "num_samples": len(data.train_labels),
                 "num_classes": data.num_classes, "mean": list(data.mean), "std": list(data.std),
                 "images_sha256": tensor_sha256(data.train_images, data.train_labels)},
        "augment": {"crop_padding": augment.crop_padding, "hflip": augment.hflip},
        # Without augmentation every view is the same image: one is stored.
        "views": 1 if augment.is_identity else spec.views,
        "seed": spec.seed, "taps": stored_taps(built), "logits": spec.logits,
        "topk": min(spec.topk, data.num_classes) if spec.logits == "topk" else 0, "dtype": spec.dtype,
    }
    return json.loads(json.dumps(identity))  # tuples -> lists, as read back from a manifest


def cache_folder(recipe: Recipe, identity: dict[str, Any]) -> Path:
    """``teacher.cache.dir``, or ``runs/cache/<identity hash>``."""
    assert recipe.teacher is not None and recipe.teacher.cache is not None
    return Path(recipe.teacher.cache.dir) if recipe.teacher.cache.dir else CACHE_ROOT / identity_key(identity)


def write_cache(built: Plan, identity: dict[str, Any], folder: Path, *, batch_size: int = 512,
                overwrite: bool = False, progress: bool = True) -> Path:
    """Run ``built.teacher`` over every stored view of every training image and write the cache.

    Args:
        built: The recipe's plan (its teacher, data and objective).
        identity: From :func:`cache_identity`.
        folder: Final cache folder.
        batch_size: Images per teacher forward.
        overwrite: Replace an existing folder.
        progress: Show a progress bar.
    """
    data, teacher = built.data, built.teacher
    assert data is not None and teacher is not None
    augment = AugmentConfig(**identity["augment"])
    n, k = len(data.train_labels), identity["views"]
    table = draw_views(n, k, augment, identity["seed"])
    device = built.device
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


def open_cache(recipe: Recipe, built: Plan, source: Path | None = None, *, build: bool = True,
               overwrite: bool = False, progress: bool = True) -> tuple[TeacherCache, ViewReplay, CachedTeacher]:
    """Open the recipe's teacher cache (building it first when missing and ``build``).

    Returns:
        The cache, the loader's view replay and the cached teacher (same view schedule).

    Raises:
        KdkitError: The folder holds a cache of something else, an incomplete cache, or no cache and
            ``build`` is False.
    """
    assert recipe.teacher is not None and recipe.teacher.cache is not None
    spec = recipe.teacher.cache
    identity = cache_identity(recipe, built, source)
    folder = cache_folder(recipe, identity)
    if overwrite or (build and not folder.exists()):
        with exclusive(folder, what="teacher cache", wait=True,
                       on_wait=lambda who: print(f"teacher cache: waiting for {who}, which is building {folder}",
                                                 file=sys.stderr, flush=True)):
            remove_partials(folder)  # no other builder runs: what interrupted builds left is garbage
            if overwrite or not folder.exists():  # else built by the process waited for: use it
                print(f"teacher cache: running the teacher over {identity['views']} view(s) of "
                      f"{identity['data']['num_samples']} images into {folder}", file=sys.stderr)
                write_cache(built, identity, folder, batch_size=spec.batch_size, overwrite=overwrite,
                            progress=progress)
    cache = TeacherCache(folder, identity)
    if built.device.type != "cpu":
        cache.to(built.device)  # no per-batch host round-trip
    replay = ViewReplay(cache, AugmentConfig(**identity["augment"]), identity["seed"])
    return cache, replay, CachedTeacher(replay)


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
