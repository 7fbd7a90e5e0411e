"""A recipe's teacher cache: what it holds (its identity), where it lives, and opening or building it.

What a cache holds is fixed by its *identity*: the teacher's architecture and weights (SHA-256 of the
weights file), the training images (SHA-256 of their bytes) and normalisation, the augmentation, the
number of views, the view seed, the stored taps and their storage. The default folder is named by the
identity's hash, so every recipe (and every student seed) needing the same outputs shares one cache,
and a cache can never be silently reused for something else: an explicit ``teacher.cache.dir`` whose
manifest differs is refused.

One process builds a cache folder at a time (:mod:`kdkit.locks`): runs that need the same missing cache
wait for the first one's build and use it (its identity is checked like any other cache's).

This is the recipe-aware half; :mod:`kdkit.cache` (store, views, writer, replay) knows no recipe or plan.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from kdkit.build import Plan, trained_weights
from kdkit.cache import CachedTeacher, TeacherCache, ViewReplay, write_cache
from kdkit.cache.integrity import file_sha256
from kdkit.cache.store import FORMAT, identity_key, remove_partials, tensor_sha256
from kdkit.data.augment import AugmentConfig
from kdkit.distill import as_specs
from kdkit.locks import exclusive
from kdkit.recipe import Recipe

CACHE_ROOT = Path("runs/cache")


def recipe_augment(recipe: Recipe) -> AugmentConfig:
    """The recipe's batched augmentation."""
    return AugmentConfig(crop_padding=recipe.data.augment.crop_padding, hflip=recipe.data.augment.hflip)


def stored_taps(built: Plan) -> list[str]:
    """Teacher tap specs the cache stores: ``teacher.cache.taps`` when given (the planner checked that it covers
    every tap the terms read), else the taps the terms read, in first-use order."""
    spec = built.recipe.teacher.cache if built.recipe.teacher is not None else None
    if spec is not None and spec.taps is not None:
        return list(spec.taps)
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
    weights = trained_weights(recipe.teacher, source.parent if source else None)
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
                assert built.teacher is not None and built.data is not None
                write_cache(built.teacher, built.data, identity, folder, device=built.device,
                            batch_size=spec.batch_size, overwrite=overwrite, progress=progress)
    cache = TeacherCache(folder, identity)
    if built.device.type != "cpu":
        cache.to(built.device)  # no per-batch host round-trip
    replay = ViewReplay(cache, AugmentConfig(**identity["augment"]), identity["seed"])
    return cache, replay, CachedTeacher(replay)
