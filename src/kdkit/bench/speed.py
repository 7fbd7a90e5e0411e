"""``kdkit bench speed``: milliseconds per optimisation step of kdkit vs hand-written PyTorch loops.

In one process, on the same pre-built batches, interleaved so machine noise cancels, it times

* (a) a hand-written PyTorch loop training the student with cross-entropy only;
* (b) a hand-written PyTorch KD loop (teacher in eval mode under ``torch.inference_mode``, channels-last,
  the same loss as the recipe's ``kd`` term written inline);
* (c) kdkit's training step as ``kdkit run`` assembles it (:func:`kdkit.assemble.assemble`; ``Engine.train_step``:
  the methods' batch transforms, teacher taps, student + bridges, objective, optimiser, schedule);
* (d) the same step reading the teacher-output cache (:mod:`kdkit.cache`) instead of running the teacher;

and, separately, the batch loader's throughput. It prints the ratios c/b (the framework's overhead over
the loop it replaces) and d/a (a cached distillation step against training the student alone), the
machine, versions and batch size, and writes everything as JSON. The teacher's weights do not change
the cost, so a recipe's teacher is built with random weights.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from kdkit.assemble import Assembled, assemble
from kdkit.checkpoint import atomic_write_text
from kdkit.method import active_methods
from kdkit.models import build_model
from kdkit.profile import machine_info
from kdkit.recipe import Recipe, find_recipe, load_recipe


def _random_teachers(recipe: Recipe, folder: Path) -> list[str]:
    """Overrides pointing every frozen teacher of ``recipe`` at randomly initialised weights (same cost)."""
    data_shape = plan_shape(recipe)
    overrides = []
    for name, spec in recipe.frozen_teachers().items():
        model = build_model(spec.arch, **data_shape, params=spec.params)
        path = folder / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        key = recipe.teacher_key(name)
        overrides += [f"{key}.checkpoint={path}", f"{key}.recipe=null"]
    return overrides


def plan_shape(recipe: Recipe) -> dict[str, int]:
    """num_classes / in_channels / image_size of the recipe's data (loads it)."""
    from kdkit.data import load_dataset

    data = load_dataset(recipe.data.dataset, recipe.data.root, **recipe.data.params)
    return {"num_classes": data.num_classes, "in_channels": data.in_channels, "image_size": data.image_size}


def _timed(fn: Callable[[Any], None], batches: list[Any]) -> float:
    start = time.perf_counter()
    for batch in batches:
        fn(batch)
    return (time.perf_counter() - start) * 1000.0 / len(batches)


def run_speed_bench(recipe_name: str, out: Path, *, steps: int = 20, repeats: int = 7, warmup: int = 5,
                    overrides: list[str] | None = None) -> dict[str, Any]:
    """Time the loops on ``recipe_name``; write ``out/speed.json`` and ``out/results.md``.

    Any recipe works: (a) and (c) always run; (b) needs a ``kd`` term (it is KD written by hand) and (d)
    a teacher whose outputs a cache can hold (one view, no method that feeds the teacher new images); the
    ratios that need a missing variant are reported as ``None``. (c) and (d) run the recipe's methods' batch
    transforms (their phases, which run at epoch starts, are not part of a step).

    Args:
        recipe_name: A recipe path or shipped name (default benchmark: ``fashion_mnist/kd``).
        out: Output folder.
        steps: Steps per timed block.
        repeats: Interleaved blocks per variant (the median is reported).
        warmup: Untimed steps per variant first.
        overrides: ``key=value`` recipe overrides (e.g. ``train.batch_size=256``).
    """
    source = find_recipe(recipe_name)
    recipe = load_recipe(source, overrides)
    kd_terms = [t for t in recipe.distill if t.loss == "kd"]
    kd = (float(kd_terms[0].params.get("temperature", 4.0)), kd_terms[0].weight) if kd_terms and recipe.teacher \
        else None
    with tempfile.TemporaryDirectory() as tmp:
        base = list(overrides or [])
        base += _random_teachers(recipe, Path(tmp))
        # (c) runs the live teacher, even for a recipe that reads a cache
        recipe = load_recipe(source, [*base, "teacher.cache=null"] if recipe.teacher is not None else base)
        if recipe.train.threads:
            torch.set_num_threads(recipe.train.threads)
        run = assemble(recipe, source=source)
        cached = None
        if recipe.teacher is not None and recipe.data.views == 1 and \
                not any(m.feeds_teacher_new_images for m in active_methods(recipe)):
            # (d) reads a cache of the same random teacher (2 views are enough to time a lookup)
            cached_recipe = load_recipe(source, [*base, f"teacher.cache.dir={tmp}/cache", "teacher.cache.views=2"])
            cached = assemble(cached_recipe, source=source)
        return _time_steps(recipe, run, cached, out, steps=steps, repeats=repeats, warmup=warmup, kd=kd)


def _time_steps(recipe: Recipe, run: Assembled, cached: Assembled | None, out: Path, *,
                steps: int, repeats: int, warmup: int, kd: tuple[float, float] | None) -> dict[str, Any]:
    ce_weight = recipe.train.ce_weight
    built, spec = run.built, recipe.train
    dev = built.device
    train_loader = run.train_loader
    batches = [b for _, b in zip(range(steps), train_loader.epoch(0), strict=False)]
    if len(batches) < steps:
        batches = (batches * steps)[:steps]

    # (c) kdkit: the assembled engine's training step (the methods' batch transforms, then the step)
    engine = run.engine
    engine.model.train()

    def kdkit_step(batch: Any) -> None:
        engine.train_step(*batch)

    variants: dict[str, Callable[[Any], None]] = {}
    if cached is not None:
        # (d) kdkit reading the cache: its own copy of the student, batches replayed from the cache
        cached_batches = [b for _, b in zip(range(steps), cached.train_loader.epoch(0), strict=False)]
        cached_batches = (cached_batches * steps)[:steps]
        cached_engine = cached.engine
        cached_engine.model.train()
        cached_iter = iter(cached_batches * (warmup + repeats + 1))

        def kdkit_cached_step(_batch: Any) -> None:
            cached_engine.train_step(*next(cached_iter))  # the cache's own views (their indices pick the outputs)

    # (a) and (b): plain loops on copies of the same networks
    plain_student = copy.deepcopy(built.student.model)
    plain_teacher = copy.deepcopy(built.teacher.model).eval() if built.teacher else None
    opt_a = torch.optim.SGD(plain_student.parameters(), lr=spec.optimizer.lr, momentum=spec.optimizer.momentum,
                            weight_decay=spec.optimizer.weight_decay)
    kd_student = copy.deepcopy(built.student.model)
    opt_b = torch.optim.SGD(kd_student.parameters(), lr=spec.optimizer.lr, momentum=spec.optimizer.momentum,
                            weight_decay=spec.optimizer.weight_decay)

    def plain_ce(batch: Any) -> None:
        x, y, _ = batch
        loss = F.cross_entropy(plain_student(x), y)
        opt_a.zero_grad(set_to_none=True)
        loss.backward()
        opt_a.step()

    def plain_kd(batch: Any) -> None:
        assert kd is not None and plain_teacher is not None
        temperature, kd_weight = kd
        x, y, _ = batch
        with torch.inference_mode():
            z_t = plain_teacher(x)
        z_t = z_t.clone()  # an inference tensor cannot be saved for backward
        z_s = kd_student(x)
        kl = F.kl_div(F.log_softmax(z_s / temperature, 1), F.log_softmax(z_t / temperature, 1),
                      reduction="batchmean", log_target=True)
        loss = ce_weight * F.cross_entropy(z_s, y) + kd_weight * temperature**2 * kl
        opt_b.zero_grad(set_to_none=True)
        loss.backward()
        opt_b.step()

    variants["a_plain_ce"] = plain_ce
    if kd is not None:
        variants["b_plain_kd"] = plain_kd
    variants["c_kdkit_kd"] = kdkit_step
    if cached is not None:
        variants["d_kdkit_kd_cached"] = kdkit_cached_step
    for fn in variants.values():
        for batch in batches[:warmup]:
            fn(batch)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(_timed(fn, batches))
    loader_ms = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = sum(1 for _ in zip(range(steps), train_loader.epoch(1), strict=False))
        loader_ms.append((time.perf_counter() - start) * 1000.0 / max(n, 1))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "recipe": recipe.name, "batch_size": spec.batch_size, "device": str(dev), "steps": steps,
        "repeats": repeats, "ms_per_step": med, "ms_per_step_all": times,
        "ratio_c_over_b": med["c_kdkit_kd"] / med["b_plain_kd"] if "b_plain_kd" in med else None,
        "ratio_d_over_a": med["d_kdkit_kd_cached"] / med["a_plain_ce"] if "d_kdkit_kd_cached" in med else None,
        "kd_term": kd is not None, "teacher": recipe.has_teacher,
        "methods": [m.name for m, _ in run.methods],
        "loader_ms_per_batch": statistics.median(loader_ms),
        "loader_images_per_s": spec.batch_size * 1000.0 / statistics.median(loader_ms),
        "machine": machine_info(), "command": " ".join(sys.argv),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "speed.json", json.dumps(result, indent=1))
    atomic_write_text(out / "results.md", format_speed(result) + "\n")
    print(format_speed(result))
    return result


def format_speed(r: dict[str, Any]) -> str:
    """The speed benchmark as a Markdown table with its provenance."""
    m = r["ms_per_step"]
    what = "KD step" if r.get("kd_term", True) else "step (the recipe's objective)"
    if r.get("methods"):
        what += f" with method {', '.join(r['methods'])} (its batch transforms included)"
    labels = {"a_plain_ce": "(a) hand-written loop, student CE only",
              "b_plain_kd": "(b) hand-written KD loop (teacher inference_mode, channels-last)",
              "c_kdkit_kd": f"(c) kdkit {what}",
              "d_kdkit_kd_cached": f"(d) kdkit {what} reading the teacher cache"}
    lines = ["| step | ms / step |", "|---|---:|"]
    lines += [f"| {label} | {m[key]:.2f} |" for key, label in labels.items() if key in m]

    def ratio(key: str, target: float, why: str) -> str:
        value = r.get(key)
        return f"{value:.3f} (target <= {target})" if value is not None else f"n/a ({why})"

    lines += ["", f"c/b = {ratio('ratio_c_over_b', 1.03, 'no kd term')}; "
              f"d/a = {ratio('ratio_d_over_a', 1.10, 'no cacheable teacher')}; "
              f"batch loader: {r['loader_ms_per_batch']:.2f} ms / batch "
              f"({r['loader_images_per_s']:,.0f} images/s, augmentation included).",
              f"Recipe {r['recipe']}, batch {r['batch_size']}, device {r['device']}, medians of {r['repeats']} "
              f"interleaved blocks of {r['steps']} steps.",
              f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, torch {r['machine']['torch']} "
              f"({r['machine']['torch_threads']} threads). Command: `{r['command']}`"]
    return "\n".join(lines)
