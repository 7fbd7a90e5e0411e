"""``kdkit bench speed``: milliseconds per optimisation step of kdkit vs hand-written PyTorch loops, with spreads.

In one process, interleaved (:mod:`kdkit.bench.timing`: blocks of steps rotated across variants, repeated for
several rounds), it times

* (a) a hand-written PyTorch loop training the student with cross-entropy only;
* (b) a hand-written PyTorch distillation loop with the same teacher (BatchNorm folded): for a recipe whose one
  term is ``kd``, Hinton's KD written inline (teacher under ``torch.inference_mode``); for any other recipe of
  plain terms (no method, no peers, no bridge that rewrites or deploys), the recipe's own loss modules and bridges
  called on tensors that forward hooks written here capture (teacher under ``torch.no_grad``) -- the same models
  and losses without kdkit's engine, so c/b is kdkit's own overhead;
* (c) kdkit's training step as ``kdkit run`` assembles it (:func:`kdkit.assemble.assemble`; ``Engine.train_step``:
  the methods' batch transforms, teacher taps, student + bridges, objective, optimiser, schedule);
* (d) the same step reading the teacher-output cache (:mod:`kdkit.cache`) instead of running the teacher;
* (c) and (d) under bf16 autocast, where the device runs it (a CPU always can; without AMX/AVX512-BF16 it is
  emulated and the rows say so);
* the batch loader alone.

Every step fetches its batch from a loader built as the run's (augmentation included) and ends with the optimiser
and the recipe's per-step lr schedule, so the hand-written loops do what kdkit's step does. They are the fastest
honest variants: each runs in both memory layouts (contiguous and channels-last) and the faster one is the
reference. Each row shows its median over rounds with the interquartile range; the ratios c/b, d/a (and the
bf16 ones) are taken per round and summarised the same way, and a target is called met or missed only when the
median's 95 % confidence interval (:func:`kdkit.bench.timing.median_interval`) is on one side of it.

How far from the limit: FLOPs of the student's training step (forward + backward) and of the teacher's forward,
counted by ``torch.utils.flop_counter``, the rate each reaches and its fraction of this CPU's peak
(:mod:`kdkit.hardware`), and a profile of kdkit's step (``profile.txt``, top operators by self CPU time) with the
part of a step that dominates. The teacher's weights do not change the cost, so a recipe's teacher is built with
random weights.
"""

from __future__ import annotations

import copy
import itertools
import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from kdkit.assemble import Assembled, assemble
from kdkit.bench.limits import achieved, inference_flops, step_profile, training_flops
from kdkit.bench.timing import UNDECIDED, faster, interleaved, paired_ratios, spread, verdict
from kdkit.build import cache_problems
from kdkit.checkpoint import atomic_write_text
from kdkit.data.loader import BatchLoader
from kdkit.distill import as_specs, pick
from kdkit.engine import step_part
from kdkit.hardware import choose_amp, this_cpu_peak
from kdkit.models import build_model
from kdkit.profile import machine_info
from kdkit.recipe import CacheSpec, Recipe, find_recipe, load_recipe
from kdkit.schedule import build_optimizer, build_schedule
from kdkit.taps import LOGITS, Tap, resolve_tap
from kdkit.task import TASKS, BoundTask

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
#: ``ratio: (numerator, denominator, target or None, what it measures)``; a or b is the faster layout's loop.
RATIOS: dict[str, tuple[str, str, float | None, str]] = {
    "c/b": ("c_kdkit_kd", "b", 1.03, "kdkit KD step / best hand-written KD loop"),
    "d/a": ("d_kdkit_kd_cached", "a", 1.10, "kdkit cached step / best hand-written CE loop"),
    "c_bf16/b": ("c_kdkit_kd_bf16", "b", 0.80, "kdkit KD step in bf16 / best hand-written fp32 KD loop"),
    "c_bf16/c": ("c_kdkit_kd_bf16", "c_kdkit_kd", None, "bf16 / fp32, kdkit KD step"),
    "d_bf16/d": ("d_kdkit_kd_cached_bf16", "d_kdkit_kd_cached", None, "bf16 / fp32, kdkit cached step"),
}
#: Ratios whose target applies only where bf16 is native.
NATIVE_BF16_TARGETS = ("c_bf16/b",)


def _random_teachers(recipe: Recipe, folder: Path) -> list[str]:
    """Overrides pointing every frozen teacher of ``recipe`` at randomly initialised weights (same cost)."""
    data_shape = plan_shape(recipe)
    data_shape["num_classes"] = TASKS.get(recipe.task).outputs(data_shape["num_classes"])  # + background, ...
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


def bf16_autocast_runs(device: torch.device) -> bool:
    """Whether bf16 autocast runs on ``device`` at all (natively or emulated): every CPU, CUDA GPUs torch says
    support it."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def run_speed_bench(recipe_name: str, out: Path, *, steps: int = 10, rounds: int = 15, warmup: int = 5,
                    profile_steps: int = 20, overrides: list[str] | None = None) -> dict[str, Any]:
    """Time the loops on ``recipe_name``; write ``out/speed.json``, ``out/results.md`` and ``out/profile.txt``.

    Any recipe works: (a) and (c) always run; (b) needs a teacher and plain terms (:func:`hand_writable`) and (d)
    a teacher whose outputs a cache can hold (one view, no method that feeds the teacher new images); a ratio
    that needs a missing variant is left out. (c) and (d) run the recipe's methods' batch transforms (their
    phases, which run at epoch starts, are not part of a step).

    Args:
        recipe_name: A recipe path or shipped name (default benchmark: ``fashion_mnist/kd``).
        out: Output folder.
        steps: Steps per timed block.
        rounds: Blocks per variant, interleaved (medians and spreads are over rounds).
        warmup: Untimed steps per variant first.
        profile_steps: kdkit steps run under the profiler.
        overrides: ``key=value`` recipe overrides (e.g. ``train.batch_size=256``).
    """
    source = find_recipe(recipe_name)
    recipe = asked = load_recipe(source, overrides)
    kd_terms = [t for t in recipe.distill if t.loss == "kd"]
    # Hinton's KD inline only for a recipe whose one term it is; other recipes get the generic hand-written loop
    kd = (float(kd_terms[0].params.get("temperature", 4.0)), kd_terms[0].weight) \
        if len(recipe.distill) == 1 and kd_terms and recipe.teacher else None
    with tempfile.TemporaryDirectory() as tmp:
        base = [*(overrides or []), *_random_teachers(recipe, Path(tmp))]
        # (c) runs the live teacher, even for a recipe that reads a cache
        live = [*base, "teacher.cache=null"] if recipe.teacher is not None else base
        recipe = load_recipe(source, [*live, "train.amp=off"])
        if recipe.train.threads:
            torch.set_num_threads(recipe.train.threads)
        runs = {"c_kdkit_kd": assemble(recipe, source=source)}
        # (d) reads a cache of the same random teacher (2 views are enough to time a lookup), when the planner's
        # rule allows the recipe one
        cache = [*base, f"teacher.cache.dir={tmp}/cache", "teacher.cache.views=2"]
        cacheable = asked.teacher is not None and not cache_problems(
            asked, TASKS.get(asked.task), (asked.teacher.cache or CacheSpec()).model_copy(update={"views": 2}))
        if cacheable:
            runs["d_kdkit_kd_cached"] = assemble(load_recipe(source, [*cache, "train.amp=off"]), source=source)
        if bf16_autocast_runs(runs["c_kdkit_kd"].built.device):
            runs["c_kdkit_kd_bf16"] = assemble(load_recipe(source, [*live, "train.amp=bf16"]), source=source)
            if cacheable:
                runs["d_kdkit_kd_cached_bf16"] = assemble(load_recipe(source, [*cache, "train.amp=bf16"]),
                                                          source=source)
        return _bench(recipe, runs, out, kd=kd, steps=steps, rounds=rounds, warmup=warmup,
                      profile_steps=profile_steps)


# -- the variants ---------------------------------------------------------------------------------

def endless(loader: BatchLoader) -> Iterator[Batch]:
    """The loader's batches, epoch after epoch."""
    for epoch in itertools.count():
        yield from loader.epoch(epoch)


def fetch(batches: Iterator[Batch]) -> Batch:
    """The next batch (a named part of a step in a profile)."""
    with step_part("kdkit.loader"):
        return next(batches)


def in_layout(loader: BatchLoader, layout: str) -> BatchLoader:
    """The same loader producing batches in ``layout`` (``contiguous`` or ``channels_last``)."""
    other = copy.copy(loader)
    other.channels_last = layout == "channels_last"
    return other


def kdkit_step(run: Assembled) -> Callable[[], None]:
    """One step of kdkit's engine on the next batch of its own training loader."""
    engine, batches = run.engine, endless(run.train_loader)
    engine.model.train()

    def step() -> None:
        engine.train_step(*fetch(batches))

    return step


def _trainer(model: nn.Module, recipe: Recipe, steps_per_epoch: int) -> tuple[Any, Any]:
    """The recipe's optimiser and per-step lr schedule for a hand-written loop's copy of the student."""
    spec = recipe.train
    optimizer = build_optimizer(model.parameters(), spec.optimizer)
    return optimizer, build_schedule(optimizer, spec.schedule, spec.optimizer.lr, steps_per_epoch, spec.epochs)


def plain_ce_step(student: nn.Module, recipe: Recipe, loader: BatchLoader, task: BoundTask) -> Callable[[], None]:
    """(a): a hand-written step training ``student`` with the task's supervised loss (cross-entropy for
    classification, the detector's or the per-pixel loss for dense tasks) on the loader's next batch."""
    optimizer, schedule = _trainer(student, recipe, len(loader))
    batches = endless(loader)
    student.train()

    def step() -> None:
        x, y, index = fetch(batches)
        loss = task.loss(student(x), task.targets(y, index, "train"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()

    return step


def plain_kd_step(student: nn.Module, teacher: nn.Module, recipe: Recipe, loader: BatchLoader,
                  kd: tuple[float, float]) -> Callable[[], None]:
    """(b): a hand-written Hinton-KD step (the teacher under ``inference_mode``) on the loader's next batch."""
    optimizer, schedule = _trainer(student, recipe, len(loader))
    batches, smoothing, ce_weight = endless(loader), recipe.train.label_smoothing, recipe.train.ce_weight
    temperature, kd_weight = kd
    student.train()
    teacher.eval()

    def step() -> None:
        x, y, _ = fetch(batches)
        with torch.inference_mode():
            z_t = teacher(x)
        z_t = z_t.clone()  # an inference tensor cannot be saved for backward
        z_s = student(x)
        kl = F.kl_div(F.log_softmax(z_s / temperature, 1), F.log_softmax(z_t / temperature, 1),
                      reduction="batchmean", log_target=True)
        loss = ce_weight * F.cross_entropy(z_s, y, label_smoothing=smoothing) + kd_weight * temperature**2 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()

    return step


def captured_by_hooks(model: nn.Module, taps: list[Tap]) -> dict[str, torch.Tensor]:
    """Forward hooks on ``model`` (a copy of its own) storing each tap's tensor under its spec, as a hand-written
    loop would register them; the dict is refilled by every forward."""
    store: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def keep(spec: str, inputs: bool) -> Callable[..., None]:
        if inputs:
            return lambda _module, args: store.__setitem__(spec, args[0])
        return lambda _module, _args, output: store.__setitem__(spec, output)

    for tap in taps:
        if tap.capture == "input":
            modules[tap.path].register_forward_pre_hook(keep(tap.spec, True))
        elif tap.capture == "output":
            modules[tap.path].register_forward_hook(keep(tap.spec, False))
    return store


def hand_writable(run: Assembled) -> str | None:
    """Why the generic hand-written loop (b) cannot reproduce ``run``'s step, or ``None`` when it can."""
    built = run.built
    student = built.student
    if run.methods:
        return f"method {', '.join(m.name for m, _ in run.methods)} changes the step"
    if built.teacher is None or not run.engine.objective.terms:
        return "no teacher term"
    if student.peer_targets or student.rewriting or student.deploy_term is not None:
        return "peers or bridges that rewrite or deploy"
    return None


def hookless(model: nn.Module) -> nn.Module:
    """A copy of ``model`` without the forward hooks kdkit put on it (tap recorders), for a hand-written loop."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        # deepcopy keeps the hooks (and their closures over kdkit's recorders); PyTorch has no public way to
        # list or drop them, hence the private dicts
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    return twin


def plain_terms_step(student: nn.Module, teacher: nn.Module, run: Assembled, layout: str) -> Callable[[], None]:
    """(b) for any recipe of plain terms: ``student`` and ``teacher`` (hook-free copies of the run's, the teacher
    BN-folded), copies of the recipe's bridges and loss modules, in a hand-written loop on the next batch of the
    run's loader in ``layout`` (hooks written here capture the taps, the teacher runs under ``torch.no_grad``)."""
    built, recipe = run.built, run.recipe
    teacher.eval()
    terms = [(term.student_tap, term.teacher_tap, copy.deepcopy(built.student.bridges[term.name])
              if term.name in built.student.bridges else None, copy.deepcopy(term.loss), term.weight)
             for term in run.engine.objective.terms]
    s_taps = [resolve_tap(student, spec) for t in terms for spec in as_specs(t[0]) if spec != LOGITS]
    t_taps = [resolve_tap(teacher, spec) for t in terms if t[1] is not None for spec in as_specs(t[1])
              if spec != LOGITS]
    s_store, t_store = captured_by_hooks(student, s_taps), captured_by_hooks(teacher, t_taps)
    modules = nn.ModuleList([student, *(b for _, _, b, _, _ in terms if b is not None)])
    optimizer, schedule = _trainer(modules, recipe, len(run.train_loader))
    batches, task, ce_weight = endless(in_layout(run.train_loader, layout)), run.engine.task, recipe.train.ce_weight
    student.train()

    def step() -> None:
        x, y, index = fetch(batches)
        targets = task.targets(y, index, "train")
        with torch.no_grad():
            z_t = teacher(x)  # its hooks fill t_store
        t_out = {**t_store, LOGITS: z_t}
        z_s = student(x)
        s_out = {**s_store, LOGITS: z_s}
        loss = ce_weight * task.loss(z_s, targets) if ce_weight else z_s.new_zeros(())
        for s_spec, t_spec, bridge, term_loss, weight in terms:
            s = pick(s_out, s_spec)
            loss = loss + weight * term_loss.compute(bridge(s) if bridge is not None else s,
                                                     pick(t_out, t_spec) if t_spec is not None else None,
                                                     targets, index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()

    return step


def plain_variants(run: Assembled, kd: tuple[float, float] | None) -> dict[str, Callable[[], None]]:
    """(a) and (b) in both memory layouts, on copies of the run's student and (folded) teacher."""
    built, recipe = run.built, run.recipe
    variants: dict[str, Callable[[], None]] = {}
    for layout, fmt in LAYOUTS.items():
        variants[f"a_ce_{layout}"] = plain_ce_step(hookless(built.student.model).to(memory_format=fmt),
                                                   recipe, in_layout(run.train_loader, layout), run.engine.task)
    if kd is not None and built.teacher is not None:
        for layout, fmt in LAYOUTS.items():
            teacher = hookless(built.teacher.model).to(memory_format=fmt)
            variants[f"b_kd_{layout}"] = plain_kd_step(hookless(built.student.model).to(memory_format=fmt),
                                                       teacher, recipe, in_layout(run.train_loader, layout), kd)
    elif hand_writable(run) is None:
        for layout, fmt in LAYOUTS.items():
            variants[f"b_terms_{layout}"] = plain_terms_step(hookless(built.student.model).to(memory_format=fmt),
                                                             hookless(built.teacher.model).to(memory_format=fmt),
                                                             run, layout)
    return variants


# -- the benchmark --------------------------------------------------------------------------------

def _bench(recipe: Recipe, runs: dict[str, Assembled], out: Path, *, kd: tuple[float, float] | None, steps: int,
           rounds: int, warmup: int, profile_steps: int) -> dict[str, Any]:
    main = runs["c_kdkit_kd"]
    dev = main.built.device
    variants = plain_variants(main, kd)
    variants.update({name: kdkit_step(run) for name, run in runs.items()})
    loader_batches = endless(main.train_loader)

    def load() -> None:
        fetch(loader_batches)

    variants["loader"] = load
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = interleaved(variants, steps=steps, rounds=rounds, warmup=warmup, sync=sync)
    reference = {side: min((k for k in times if k.startswith(f"{side}_")), key=lambda k: spread(times[k]).median)
                 for side in ("a", "b") if any(k.startswith(f"{side}_") for k in times)}
    auto = choose_amp("auto", dev)
    out.mkdir(parents=True, exist_ok=True)
    loader_ms = spread(times["loader"]).median
    result = {
        "recipe": recipe.name, "batch_size": recipe.train.batch_size, "device": str(dev), "steps": steps,
        "rounds": rounds, "warmup": warmup, "block_ms": times, "reference": reference,
        "rows": {name: spread(values).to_dict() for name, values in times.items()},
        "ratios": ratios(times, reference, native_bf16=auto.amp == "bf16"),
        "amp_auto": auto.to_dict(), "kd_term": kd is not None, "teacher": recipe.has_teacher,
        "no_hand_written_distillation": None if "b" in reference else hand_writable(main),
        "methods": [m.name for m, _ in main.methods],
        "loader_ms_per_batch": loader_ms, "loader_images_per_s": recipe.train.batch_size * 1000.0 / loader_ms,
        "limits": limits(main, reference, steps=steps, rounds=max(rounds // 3, 1), warmup=warmup,
                         bf16="c_kdkit_kd_bf16" in runs, sync=sync),
        "profile": step_profile(variants["c_kdkit_kd"], profile_steps, out, dev),
        "machine": machine_info(), "command": " ".join(sys.argv),
    }
    atomic_write_text(out / "speed.json", json.dumps(result, indent=1))
    atomic_write_text(out / "results.md", format_speed(result) + "\n")
    print(format_speed(result))
    return result


def ratios(times: dict[str, list[float]], reference: dict[str, str], *, native_bf16: bool) -> dict[str, Any]:
    """Every ratio of :data:`RATIOS` whose variants ran: per-round values, their spread and the verdict."""
    found: dict[str, Any] = {}
    for name, (num, den, target, what) in RATIOS.items():
        den = reference.get(den, den)
        if num not in times or den not in times:
            continue
        if den.startswith("b_terms_"):
            what = "kdkit distillation step / best hand-written loop with the recipe's losses"
        values = paired_ratios(times[num], times[den])
        summary = spread(values)
        if target is None:
            side = faster(summary)
            call = "bf16 faster" if side == "a" else "fp32 faster" if side == "b" else UNDECIDED
        elif name in NATIVE_BF16_TARGETS and not native_bf16:
            call = "not applicable: no native bf16 here (the target is for AMX/AVX512-BF16 CPUs and bf16 GPUs)"
        else:
            call = verdict(summary, target)
        found[name] = {"what": what, "numerator": num, "denominator": den, "per_round": values,
                       "spread": summary.to_dict(), "target": target, "verdict": call}
    return found


def layout_of(variant: str) -> str:
    """The memory layout a hand-written variant ran in (``b_terms_channels_last`` -> ``channels_last``)."""
    return variant.split("_", 2)[2]


def limits(run: Assembled, reference: dict[str, str], *, steps: int, rounds: int, warmup: int, bf16: bool,
           sync: Callable[[], None]) -> dict[str, Any]:
    """Achieved FLOP/s of the student's training step (forward + backward) and the teacher's forward, in each
    layout the references found faster, against this CPU's peak (fp32 rows against the fp32 peak, bf16 rows
    against the bf16 peak)."""
    built, dev = run.built, run.built.device
    student_layout = layout_of(reference["a"])
    teacher_layout = layout_of(reference["b"]) if "b" in reference else student_layout
    student = copy.deepcopy(built.student.model).to(memory_format=LAYOUTS[student_layout]).train()
    x, y, index = next(in_layout(run.train_loader, student_layout).epoch(0))
    task = run.engine.task
    targets = task.targets(y, index, "train")

    def supervised(out: torch.Tensor) -> torch.Tensor:
        return task.loss(out, targets)

    flops = {"student_train": training_flops(student, x, supervised)}

    def student_train() -> None:
        student.zero_grad(set_to_none=True)
        supervised(student(x)).backward()

    parts: dict[str, Callable[[], Any]] = {"student_train": student_train}
    if built.teacher is not None:
        teacher = copy.deepcopy(built.teacher.model).to(memory_format=LAYOUTS[teacher_layout]).eval()
        x_t = x.contiguous(memory_format=LAYOUTS[teacher_layout])
        flops["teacher_forward"] = inference_flops(teacher, x_t)
        parts["teacher_forward"] = torch.inference_mode()(lambda: teacher(x_t))
    variants: dict[str, Callable[[], Any]] = dict(parts)
    if bf16:
        for name, part in parts.items():
            variants[f"{name}_bf16"] = torch.autocast(dev.type, dtype=torch.bfloat16)(part)
    times = interleaved(variants, steps=steps, rounds=rounds, warmup=warmup, sync=sync)
    student.zero_grad(set_to_none=True)
    peak = this_cpu_peak() if dev.type == "cpu" else None
    rows = {}
    for name, values in times.items():
        bf = name.endswith("_bf16")
        ceiling = (peak.bf16 if bf else peak.fp32) if peak is not None else None
        rows[name] = {**achieved(flops[name.removesuffix("_bf16")], spread(values).median, ceiling),
                      "spread_ms": spread(values).to_dict()}
    return {"peak": peak.to_dict() if peak is not None else None, "layouts": {"student": student_layout,
            "teacher": teacher_layout}, "rows": rows, "batch": len(y)}


# -- the table ------------------------------------------------------------------------------------

def row_labels(r: dict[str, Any]) -> dict[str, str]:
    """What each timed variant is, as the table says it."""
    what = "KD step" if r.get("kd_term", True) else "step (the recipe's objective)"
    if r.get("methods"):
        what += f" with method {', '.join(r['methods'])} (its batch transforms included)"
    slow = "" if r["amp_auto"]["amp"] == "bf16" else \
        f" - slow on this {'GPU' if r['device'].startswith('cuda') else 'CPU'}: " + \
        ("no native bf16" if r["device"].startswith("cuda") else "no AMX/AVX512-BF16")
    labels = {}
    for layout in LAYOUTS:
        shown = layout.replace("_", "-")
        labels[f"a_ce_{layout}"] = f"(a) hand-written loop, student CE only, {shown}"
        labels[f"b_kd_{layout}"] = f"(b) hand-written KD loop (teacher BN-folded, inference_mode), {shown}"
        labels[f"b_terms_{layout}"] = (f"(b) hand-written loop calling the recipe's losses and bridges (teacher "
                                       f"BN-folded, no_grad), {shown}")
    labels.update({"c_kdkit_kd": f"(c) kdkit {what}",
                   "d_kdkit_kd_cached": f"(d) kdkit {what} reading the teacher cache",
                   "c_kdkit_kd_bf16": f"(c) kdkit {what}, bf16 autocast{slow}",
                   "d_kdkit_kd_cached_bf16": f"(d) kdkit {what} reading the teacher cache, bf16 autocast{slow}",
                   "loader": "batch loader alone (augmentation included)"})
    return labels


def format_speed(r: dict[str, Any]) -> str:
    """The speed benchmark as Markdown tables with their provenance."""
    labels = row_labels(r)
    kept = set(r["reference"].values())
    lines = [f"| step | ms / step: median [interquartile range] over {r['rounds']} rounds |", "|---|---:|"]
    for name, row in r["rows"].items():
        mark = " (the faster layout: the reference)" if name in kept else ""
        lines.append(f"| {labels[name]}{mark} | {_spread_text(row)} |")
    lines += ["", "| ratio, per round | median [interquartile range] | median's 95% interval | target | verdict |",
              "|---|---:|---:|---:|---|"]
    for name, ratio in r["ratios"].items():
        target = f"<= {ratio['target']:.2f}" if ratio["target"] is not None else "faster?"
        ci = ratio["spread"]
        lines.append(f"| {name}: {ratio['what']} | {_spread_text(ci, 3)} | {ci['ci_low']:.3f}-{ci['ci_high']:.3f} "
                     f"({100 * ci['coverage']:.1f}%) | {target} | {ratio['verdict']} |")
    lines += ["", f"train.amp=auto here: {r['amp_auto']['amp']} ({r['amp_auto']['reason']}).", ""]
    lines += format_limits(r["limits"], r["profile"])
    lines += ["", f"Batch loader: {r['loader_ms_per_batch']:.2f} ms / batch ({r['loader_images_per_s']:,.0f} "
              "images/s); every step above fetches its batch from it (or from the cache's replay) and ends with "
              "the optimiser and the lr schedule.",
              f"Recipe {r['recipe']}, batch {r['batch_size']}, device {r['device']}; {r['rounds']} rounds of "
              f"interleaved blocks of {r['steps']} steps (order rotated each round), {r['warmup']} warm-up steps "
              "per variant; ratios are taken per round, then summarised. A target is met or missed only when the "
              "median's distribution-free 95% interval (order statistics of the rounds) is on one side of it.",
              f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, torch {r['machine']['torch']} "
              f"({r['machine']['torch_threads']} threads). Command: `{r['command']}`"]
    return "\n".join(lines)


def format_limits(limits_: dict[str, Any], profile: dict[str, Any]) -> list[str]:
    """The "how far from the limit" lines: peak, achieved rates, and the profile's parts."""
    peak = limits_["peak"]
    lines = [f"How far from the limit: {peak['text']}." if peak else
             "How far from the limit: this device's peak is not estimated (CPUs with x86 flags only)."]
    names = {"student_train": "student training step (forward + backward)", "teacher_forward": "teacher forward"}
    lines += ["", f"| part, batch {limits_['batch']} | GFLOP | ms: median [IQR] | GFLOP/s | fraction of peak |",
              "|---|---:|---:|---:|---:|"]
    for name, row in limits_["rows"].items():
        precision = "bf16 autocast" if name.endswith("_bf16") else "fp32"
        fraction = f"{row['fraction_of_peak']:.1%} of {precision.split()[0]} peak" \
            if row["fraction_of_peak"] is not None else "n/a"
        lines.append(f"| {names[name.removesuffix('_bf16')]}, {precision} | {row['flops'] / 1e9:.3f} | "
                     f"{_spread_text(row['spread_ms'])} | {row['flops_per_s'] / 1e9:.1f} | {fraction} |")
    shares = ", ".join(f"{name} {share:.0%}" for name, share in
                       sorted(profile["shares"].items(), key=lambda kv: -kv[1]))
    top = ", ".join(f"{op} {ms:.2f} ms" for op, ms in profile["top_ops_self_ms"].items())
    lines += ["", f"Profile of (c), per step: {shares}; dominant: {profile['dominant']}. Most self time: {top} "
              f"(top 25 operators in {profile['file']}). FLOPs count matrix products and convolutions "
              "(torch.utils.flop_counter); elementwise work is not counted."]
    return lines


def _spread_text(row: dict[str, Any], digits: int = 2) -> str:
    return f"{row['median']:.{digits}f} [{row['q1']:.{digits}f}-{row['q3']:.{digits}f}]"
