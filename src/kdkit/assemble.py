"""One assembler builds a run from a recipe: plan, teacher cache, loaders, the methods' hooks, the engine.

``kdkit run`` and ``kdkit bench speed`` both go through :func:`assemble`, so what the benchmark times is
what a run trains (a method's batch transforms and phases included). The resume policy -- which recipe
changes a checkpoint survives -- is decided here, not in the engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdkit.build import Plan, plan
from kdkit.cache import TeacherCache, ViewReplay
from kdkit.data import AugmentConfig
from kdkit.data.loader import BatchLoader, make_loaders
from kdkit.data.strong import StrongView
from kdkit.distributed import DistContext, barrier
from kdkit.engine import Callback, Engine, Hooks
from kdkit.errors import KdkitError
from kdkit.method import Method, MethodRun, active_methods
from kdkit.recipe import Recipe, recipe_from_dict
from kdkit.schedule import optimizer_factory
from kdkit.teacher_cache import open_cache

#: Recipe keys that may differ between a checkpoint and the run that resumes it: the epochs may grow, and
#: the output section says where and how files are written, not what is trained (so a run folder that was
#: moved or copied resumes with ``output.dir=NEW``).
RESUMABLE_CHANGES = frozenset({"train.epochs", "output.dir", "output.progress", "output.keep_checkpoints",
                               "output.tensorboard"})


@dataclass
class Assembled:
    """A run ready to train: its plan, loaders, methods and engine."""

    recipe: Recipe
    built: Plan
    engine: Engine
    methods: list[tuple[Method, MethodRun]]
    train_loader: BatchLoader
    eval_loader: BatchLoader
    cache_info: dict[str, Any] | None = None


def prepare_training(built: Plan, ctx: DistContext | None = None,
                     replay: ViewReplay | None = None) -> tuple[BatchLoader, BatchLoader]:
    """The recipe's training and test loaders (augmentation, strong view, DDP shard), with the student
    switched to channels-last when the recipe asks for it. ``replay`` (teacher cache) replaces the random
    augmentation by the cache's stored views."""
    recipe, data, ctx = built.recipe, built.data, ctx or DistContext()
    assert data is not None
    spec = recipe.train
    augment = AugmentConfig(crop_padding=recipe.data.augment.crop_padding, hflip=recipe.data.augment.hflip)
    strong_spec = recipe.data.strong
    strong = StrongView(strong_spec.n, strong_spec.m, strong_spec.groups) if recipe.data.views == 2 else None
    loaders = make_loaders(data, batch_size=spec.batch_size, eval_batch_size=spec.eval_batch_size, augment=augment,
                           device=built.device, seed=spec.seed, rank=ctx.rank, world_size=ctx.world_size,
                           channels_last=spec.channels_last, strong=strong, replay=replay)
    if len(loaders[0]) == 0:
        raise KdkitError(f"batch_size {spec.batch_size} x {ctx.world_size} process(es) is larger than the training "
                         f"set ({len(data.train_labels)} samples)", fix="lower train.batch_size or use more data",
                         where="train.batch_size")
    if spec.channels_last:
        built.student.to(memory_format=torch.channels_last)
    return loaders


def open_teacher_cache(recipe: Recipe, built: Plan, source: Path | None, ctx: DistContext,
                       progress: bool) -> tuple[Any, ViewReplay, dict[str, Any]]:
    """Every rank opens the recipe's cache folder; rank 0 builds it when missing while the others wait."""
    if not ctx.is_main:
        barrier(ctx)
    cache, replay, teacher = open_cache(recipe, built, source, build=ctx.is_main, progress=progress)
    if ctx.is_main:
        barrier(ctx)
    info = {"dir": str(cache.folder), "views": cache.num_views, "key": cache.manifest["key"],
            "build_seconds": cache.manifest["build_seconds"], "megabytes": round(cache.nbytes() / 2**20, 2)}
    return teacher, replay, info


def build_teacher_cache(recipe: Recipe, *, source: Path | None = None, device: torch.device | None = None,
                        overwrite: bool = False, progress: bool = True) -> TeacherCache:
    """``kdkit cache build``: the recipe's teacher cache, built (or rebuilt with ``overwrite``) from the same
    plan a run of the recipe makes, so the cache holds exactly the outputs that run reads."""
    built = plan(recipe, training=True, source=source, device=device)
    cache, _, _ = open_cache(recipe, built, source, overwrite=overwrite, progress=progress)
    return cache


def check_same_recipe(saved: dict[str, Any], current: dict[str, Any], folder: Path) -> None:
    """Refuse to resume ``folder`` when its recipe differs from ``current`` beyond :data:`RESUMABLE_CHANGES`."""
    if not saved or not current:
        return
    a, b = _flatten(in_todays_form(saved)), _flatten(current)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        raise KdkitError(f"cannot resume from {folder}: the recipe changed since it was written ({changed[:6]})",
                         fix="resume with the same recipe (only train.epochs and the output section may "
                             "change), or start a new run with another output.dir")


def in_todays_form(saved: dict[str, Any]) -> dict[str, Any]:
    """A run folder's saved recipe in the form :meth:`Recipe.to_dict` writes today: a key added later and saved at
    its default (``model.init: fresh`` by a version that wrote it) is left out, as it is from the current recipe.
    A saved recipe that no longer parses is compared as saved, key by key (stricter, never looser)."""
    try:
        return recipe_from_dict(saved).to_dict()
    except (KdkitError, ValueError):
        return saved


def member_groups(recipe: Recipe, built: Plan) -> list[dict[str, Any]] | None:
    """Optimiser parameter groups for trained networks with their own settings (``peers.NAME.optimizer``,
    ``model.optimizer``): one group per such network, then everything else (other networks, bridges, the
    objective's modules) with ``train.optimizer``'s. ``None`` when no network has its own."""
    overrides = {name: spec.optimizer.overrides() for name, spec in recipe.trained_members().items()
                 if spec.optimizer is not None and spec.optimizer.overrides()}
    if not overrides:
        return None
    groups, taken = [], set()
    for name, keys in overrides.items():
        params = list(getattr(built.student.model, name).parameters())
        groups.append({"params": params, "member": name, **keys})
        taken |= {id(p) for p in params}
    rest = [p for p in (*built.student.parameters(), *built.objective.parameters()) if id(p) not in taken]
    return [*groups, {"params": rest}]


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def assemble(recipe: Recipe, *, source: Path | None = None, device: torch.device | None = None,
             ctx: DistContext | None = None, run_dir: Path | None = None, progress: bool = False,
             callbacks: list[Callback] | None = None, built: Plan | None = None) -> Assembled:
    """Build every object of a training run of ``recipe``.

    Args:
        recipe: A schema-valid recipe.
        source: The recipe file (teacher recipes are resolved relative to it).
        device: Override of ``train.device``.
        ctx: Distributed context.
        run_dir: The run folder (``None``: nothing is written, e.g. in benchmarks).
        progress: Show progress bars.
        callbacks: Extra engine callbacks (after the methods' ones).
        built: An existing plan of ``recipe`` to reuse (else one is made).

    Raises:
        KdkitError: Any problem with the recipe, data, models or files.
    """
    ctx = ctx or DistContext()
    built = built or plan(recipe, training=True, source=source, device=device)
    assert built.task is not None  # a training plan always has its data
    teacher, replay, cache_info = built.teacher, None, None
    if recipe.teacher is not None and recipe.teacher.cache is not None:
        teacher, replay, cache_info = open_teacher_cache(recipe, built, source, ctx, progress)
    train_loader, eval_loader = prepare_training(built, ctx, replay)
    methods = [(m, run) for m in active_methods(recipe) if (run := m.attach(built, ctx)) is not None]
    hooks = [run.hooks for _, run in methods] + [Hooks(callbacks=list(callbacks or []))]
    spec = recipe.train
    run_info = recipe.to_dict()
    engine = Engine(student=built.student, objective=built.objective, train_loader=train_loader,
                    eval_loader=eval_loader, epochs=spec.epochs, make_optimizer=optimizer_factory(spec),
                    param_groups=member_groups(recipe, built), amp=built.precision.amp,
                    compile=spec.compile, run_dir=run_dir, teacher=teacher, device=built.device, ctx=ctx,
                    run_info=run_info, header={"arch": recipe.model.arch, "recipe": json.dumps(run_info)},
                    check_resume=lambda saved, folder: check_same_recipe(saved, run_info, folder),
                    keep_checkpoints=recipe.output.keep_checkpoints, tensorboard=recipe.output.tensorboard,
                    progress=progress, hooks=hooks, task=built.task, best_metric=spec.best_metric, label=recipe.name,
                    eval_every=spec.eval_every)
    return Assembled(recipe, built, engine, methods, train_loader, eval_loader, cache_info)
