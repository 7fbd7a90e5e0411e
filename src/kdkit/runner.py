"""``kdkit run``: from a recipe to a finished run folder.

A run folder holds ``recipe.yaml`` (the resolved recipe), ``resolved_params.yaml`` (every parameter of its
distillation terms, defaults included), ``deploy.json`` and ``deploy_samples.safetensors`` (the deployed network's
input, normalisation, class names and task, and its first test images: :mod:`kdkit.deployment`),
``metrics.csv``/``metrics.json``, ``checkpoints/`` and, when finished, ``summary.json``. A teacher named by
``teacher.recipe`` is trained first (or its finished run reused when the recipe's digest matches).

One process writes a run folder at a time (:mod:`kdkit.locks`): a second run into a folder in use exits
with code 2 naming the holder, since it would train something else into the same files (or the same thing
twice); a student whose teacher is being trained by another process waits for that run and reuses it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from kdkit._version import __version__
from kdkit.assemble import assemble, check_same_recipe
from kdkit.build import plan, resolve_device, resolved_terms, weights_recipe
from kdkit.checkpoint import atomic_write_text, pointed, remove_leftovers
from kdkit.deployment import deployment_of, write_deployment
from kdkit.distill import PeerGroup
from kdkit.distributed import DistContext, barrier, init_distributed
from kdkit.engine import Callback, Engine
from kdkit.errors import KdkitError
from kdkit.locks import exclusive
from kdkit.models import count_parameters
from kdkit.profile import Deployed, count_flops, latency_ms, machine_info, used_parameters
from kdkit.recipe import Recipe

#: First lines of a run folder's ``resolved_params.yaml``.
RESOLVED_HEADER = ("# Every parameter each distillation term's loss and bridge was built with: the recipe's values\n"
                   "# and the defaults it left out (`kdkit ls losses NAME` describes them). Not part of the recipe.\n")


def finished_summary(recipe: Recipe) -> dict[str, Any] | None:
    """The summary of a finished run of exactly this recipe, if its run folder holds one."""
    path = recipe.run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("recipe_digest") == recipe.digest() else None


def run_or_continue(recipe: Recipe, *, source: Path | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Reuse a finished run of exactly ``recipe``, continue an interrupted one from its last checkpoint, or
    start over when the folder holds another recipe's run (what benchmarks and the demo do, so that running
    them again after an interruption loses nothing)."""
    saved = recipe.run_dir / "recipe.yaml"
    same = False
    if saved.is_file() and pointed(recipe.run_dir / "checkpoints", "latest") is not None:
        try:
            check_same_recipe(yaml.safe_load(saved.read_text()) or {}, recipe.to_dict(), recipe.run_dir)
            same = True
        except KdkitError:
            same = False
    return run_recipe(recipe, source=source, reuse=True, resume=same, overwrite=not same, progress=progress)


def train_weights_first(recipe: Recipe, source: Path | None, *, device: str | None = None,
                        progress: bool | None = None, ctx: DistContext | None = None) -> None:
    """Train the networks whose weights come from a recipe without a finished run: a teacher's ``recipe:``, or
    a trained network's (``model.recipe``, ``peers.NAME.recipe``: its starting weights) when no checkpoint is given.

    When another process is writing the teacher's run folder (another student training the same teacher
    first), rank 0 waits for it and reuses its finished run (or resumes it, if that process died).
    """
    ctx = ctx or DistContext()
    for spec in recipe.weights_sources().values():
        if spec.checkpoint is not None or spec.recipe is None:
            continue
        teacher_recipe = weights_recipe(spec, source.parent if source else None)
        assert teacher_recipe is not None
        if finished_summary(teacher_recipe) is not None:
            continue
        run_dir = teacher_recipe.run_dir
        with _holding(run_dir, ctx, wait=True):
            barrier(ctx)  # every rank decides once rank 0 holds the folder: nobody can finish it meanwhile
            if finished_summary(teacher_recipe) is not None:
                if ctx.is_main:
                    print(f"teacher: reusing {teacher_recipe.name}, finished meanwhile in {run_dir}")
                continue
            if ctx.is_main:
                print(f"teacher: training {teacher_recipe.name} first (run folder {run_dir})")
            run_recipe(teacher_recipe, resume=True, device=device, progress=progress)


def _holding(run_dir: Path, ctx: DistContext, wait: bool = False) -> contextlib.AbstractContextManager[None]:
    """Rank 0 holds ``run_dir``'s lock (the other ranks write nothing); without ``wait`` another holder is an
    error naming it."""
    if not ctx.is_main:
        return contextlib.nullcontext()
    return exclusive(run_dir, what="run folder", wait=wait,
                     on_wait=lambda who: print(f"teacher: waiting for {who}, which is writing {run_dir}",
                                               file=sys.stderr, flush=True),
                     fix="wait for that run to finish (then --resume continues it, or a student reuses it), stop "
                         "it, or give this run its own output.dir")


def run_recipe(recipe: Recipe, *, source: Path | None = None, resume: bool = False, overwrite: bool = False,
               reuse: bool = False, device: str | None = None, progress: bool | None = None,
               callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Train what ``recipe`` describes and return its summary.

    Args:
        recipe: A schema-valid recipe.
        source: The recipe file (teacher recipes are resolved relative to it).
        resume: Continue from the run folder's latest checkpoint.
        overwrite: Delete an existing run folder first.
        reuse: Return the existing summary when a finished run of this exact recipe exists.
        device: Override of ``train.device``.
        progress: Override of ``output.progress``.
        callbacks: Engine callbacks.

    Raises:
        KdkitError: Any problem with the recipe, data, models or files (before training starts); another
            process writing the run folder (naming it); a write that failed during training (e.g. a full disk).
    """
    if reuse and (done := finished_summary(recipe)) is not None:
        return done
    dev = resolve_device(device or recipe.train.device)
    ctx = init_distributed(dev)
    if ctx.enabled and dev.type == "cuda":
        dev = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(dev)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    # Every problem of this recipe (names, taps, shapes, checkpoints, output folder) before any training,
    # including that of a teacher it trains first: a misspelt loss must not cost a teacher run.
    plan(recipe, training=False, source=source)
    train_weights_first(recipe, source, device=device, progress=progress, ctx=ctx)
    with _holding(recipe.run_dir, ctx):
        return _train(recipe, source=source, resume=resume, overwrite=overwrite, dev=dev, ctx=ctx,
                      progress=progress, callbacks=callbacks)


def _train(recipe: Recipe, *, source: Path | None, resume: bool, overwrite: bool, dev: torch.device,
           ctx: DistContext, progress: bool | None, callbacks: list[Callback] | None) -> dict[str, Any]:
    """:func:`run_recipe` once its teachers are trained and rank 0 holds the run folder."""
    run_dir = recipe.run_dir
    if ctx.is_main and run_dir.is_dir():  # no other writer runs: what interrupted writes left is garbage
        remove_leftovers(run_dir)
    has_ckpt = pointed(run_dir / "checkpoints", "latest") is not None
    if has_ckpt and not (resume or overwrite):
        raise KdkitError(f"run folder {str(run_dir)!r} already holds checkpoints",
                         fix="pass --resume to continue it, --overwrite to start over, or output.dir=OTHER")
    built = plan(recipe, training=True, source=source, device=dev)
    for warning in built.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if ctx.is_main:
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        # what the deployed network takes and outputs, so exports and predictions need neither recipe nor data
        assert built.data is not None and built.task is not None
        write_deployment(run_dir, deployment_of(built.data, built.task.task, recipe.data.dataset, recipe.data.root,
                                                recipe.data.params), built.data)
        if recipe.distill:
            atomic_write_text(run_dir / "resolved_params.yaml", RESOLVED_HEADER + yaml.safe_dump(
                {"distill": resolved_terms(recipe)}, sort_keys=False))
    barrier(ctx)
    show = recipe.output.progress if progress is None else progress
    run = assemble(recipe, source=source, ctx=ctx, run_dir=run_dir, progress=show, callbacks=callbacks, built=built)
    data, spec = built.data, recipe.train
    assert data is not None
    if ctx.is_main:
        kind = f"distilling {recipe.model.arch} from {_teacher_arch(recipe)}" if recipe.has_teacher else \
            f"training {recipe.model.arch}"
        if recipe.peers:
            kind += " with peers " + ", ".join(f"{n}:{s.arch}" for n, s in recipe.peers.items()) + \
                f" (deployed: {recipe.deploy})"
        methods = f", method {', '.join(m.name for m, _ in run.methods)}" if run.methods else ""
        print(f"{recipe.name}: {kind} on {data.source} ({len(data.train_labels)} train / {len(data.test_labels)} "
              f"test images), {spec.epochs} epochs, device {dev}" + (f" x{ctx.world_size}" if ctx.enabled else "")
              + methods)
        print(built.precision.describe())
    result = run.engine.fit(resume=resume)
    summary = _summary(recipe, built, result, ctx)
    if isinstance(built.student.model, PeerGroup):  # every process: evaluation all-reduces
        summary["peers"] = peer_metrics(run.engine, built.student.model)
    if run.cache_info is not None:
        summary["teacher_cache"] = run.cache_info
    if ctx.is_main:
        for _, method_run in run.methods:
            summary.update(method_run.summary(run.engine))
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    barrier(ctx)
    return summary


def peer_metrics(engine: Engine, group: PeerGroup) -> dict[str, dict[str, float]]:
    """Each trained network's test metrics with its final weights, by name (any of them can be deployed)."""
    return {name: {metric.removeprefix("test_"): value
                   for metric, value in engine.evaluate(predict=getattr(group, name)).items()}
            for name in group.names}


def _teacher_arch(recipe: Recipe) -> str:
    """The teacher's architecture, or ``NAME:arch + ...`` for several teachers."""
    if recipe.teacher is not None:
        return recipe.teacher.arch
    return " + ".join(f"{name}:{spec.arch}" for name, spec in recipe.frozen_teachers().items())


def _summary(recipe: Recipe, built: Any, result: Any, ctx: DistContext) -> dict[str, Any]:
    data = built.data
    model = built.student.model
    shape = (data.in_channels, data.image_size, data.image_size)
    summary: dict[str, Any] = {
        "name": recipe.name, "recipe_digest": recipe.digest(), "arch": recipe.model.arch,
        "teacher_arch": _teacher_arch(recipe) if recipe.has_teacher else None,
        "dataset": data.name, "data_source": data.source, "train_samples": len(data.train_labels),
        "train_labelled": data.num_labelled,
        "test_samples": len(data.test_labels), "epochs": recipe.train.epochs, "seed": recipe.train.seed,
        "task": recipe.task, "metric": result.metric, f"best_{result.metric}": result.best,
        "best_epoch": result.best_epoch, **{f"last_{k}": v for k, v in result.last.items()},
        "train_seconds": round(result.seconds, 2),
        "params": count_parameters(model), "bridge_params": count_parameters(built.student.bridges),
        "loss_params": count_parameters(built.objective),
        "epoch_seconds": sum(r["epoch_seconds"] for r in result.history) / max(len(result.history), 1),
        # the deployed network (Student.predict): with a deploying bridge, the student up to its tap + the bridge
        "latency_ms": latency_ms(Deployed(built.student), shape, device=built.device) if ctx.is_main else None,
        "teacher_params": count_parameters(built.teacher.model) if built.teacher else None,
        "world_size": ctx.world_size, "device": str(built.device), "amp": built.precision.to_dict(),
        "kdkit": __version__,
        "machine": machine_info(), "command": " ".join(sys.argv),
        "warnings": [*built.warnings, *result.warnings],  # the plan's (e.g. skipped annotations), then the run's
    }
    if built.teacher is not None and ctx.is_main:
        summary["teacher_latency_ms"] = latency_ms(built.teacher.model, shape, device=built.device)
    if ctx.is_main:
        deployed = Deployed(built.student)
        summary["deployed"] = {"params": used_parameters(deployed, shape, device=built.device),
                               "flops": count_flops(deployed, shape, device=built.device),
                               "latency_ms": summary["latency_ms"]}
    return summary
