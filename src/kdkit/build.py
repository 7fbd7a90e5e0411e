"""Turn a validated :class:`~kdkit.recipe.Recipe` into ready objects, checking everything first.

:func:`plan` builds the data, the models, the taps, the bridges and the objective, probes tap shapes
once, and collects every problem it finds (unknown model/loss/bridge, bad tap path, shapes that need
a bridge, missing files, checkpoints that do not fit) into one :class:`~kdkit.errors.RecipeErrors`,
before any training starts. ``kdkit validate`` calls it with ``training=False``, where missing data
or teacher files are warnings (the recipe itself is fine; the files belong to the machine).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit.bridges import BRIDGES, FUSING_BRIDGES, SHAPE_PARAMS, bridge_hint, bridges_for
from kdkit.bridges.roles import DeployingBridge, StructuredBridge
from kdkit.checkpoint import load_model_weights, resolve_weights
from kdkit.data import SETTINGS, ImageData, apply_setting, hold_out, load_dataset, map_images, subset
from kdkit.data.settings import check_setting
from kdkit.distill import (
    FrozenTeacher,
    Objective,
    PeerGroup,
    PerTap,
    Student,
    SupervisedLoss,
    TapSpec,
    TeacherEnsemble,
    Term,
    as_specs,
)
from kdkit.errors import KdkitError, RecipeErrors
from kdkit.hardware import Precision, choose_amp
from kdkit.losses import LOSSES, DistillLoss
from kdkit.method import active_methods
from kdkit.models import build_model
from kdkit.params import check_params, with_defaults
from kdkit.recipe import CacheSpec, Recipe, TeacherSpec, TrainedSpec, find_recipe, load_recipe
from kdkit.taps import LOGITS, Tap, probe_shapes, resolve_tap
from kdkit.task import LOGITS_LAYOUTS, TASKS, BoundTask, Task, tasks_serving

# Shapes of datasets whose files may be absent when a recipe is only validated.
KNOWN_SHAPES: dict[str, tuple[int, int, int]] = {
    "fashion_mnist": (10, 1, 28), "mnist": (10, 1, 28), "cifar10": (10, 3, 32), "cifar100": (100, 3, 32),
}


@dataclass(frozen=True)
class DataShape:
    """What models need to know about the data."""

    num_classes: int
    in_channels: int
    image_size: int


@dataclass
class Plan:
    """Everything a run needs, built and checked."""

    recipe: Recipe
    data: ImageData | None
    shape: DataShape
    student: Student
    objective: Objective
    teacher: FrozenTeacher | None
    device: torch.device
    precision: Precision  # train.amp resolved for the device (``auto`` decided)
    warnings: list[str] = field(default_factory=list)
    tap_shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    task: BoundTask | None = None  # None only when validating without the data files


def geometry_problems(recipe: Recipe, task: Task) -> list[KdkitError]:
    """Why ``recipe`` cannot train ``task``, whose targets are tied to pixel positions (masks, boxes). The random
    crop and flip of ``data.augment`` are followed by the targets (:meth:`kdkit.task.BoundTask.follow`); anything
    else that moves the training images' pixels (RandAugment's strong view, a method's learned augmentation) would
    leave the targets where they were, a silent misalignment, and so would a method that makes batches of its own
    while the crop and flip are on. Empty when nothing does."""
    why = (f"task {recipe.task!r} moves each image's {task.target!r} targets with the random crop and flip of "
           "data.augment only, so they would not follow")
    problems = []
    if recipe.data.views == 2:
        problems.append(KdkitError(f"{why} the strong view's RandAugment (shears, rotations, translations)",
                                   bad="2", choices=["1"], fix="set data.views: 1 (data.augment.crop_padding and "
                                   "data.augment.hflip are followed by the targets)", where="data.views"))
    for method in active_methods(recipe):
        moving = method.moves_pixels(recipe)
        if moving is not None:
            problems.append(KdkitError(f"{why} method {method.name!r}, which changes the training images' geometry: "
                                       f"{moving}", bad=method.name, where=method.section or "distill",
                                       fix=f"remove what moves pixels (above) or leave method {method.name!r} out"))
    augment = recipe.data.augment
    if augment.crop_padding or augment.hflip:
        key = "data.augment.crop_padding" if augment.crop_padding else "data.augment.hflip"
        for method in active_methods(recipe):
            if method.feeds_teacher_new_images:
                # its own batches of new images (a learned policy's [A(x); x] and policy passes) read the targets
                # by sample index, without the views of the crop and flip: they would be misaligned
                problems.append(KdkitError(
                    f"method {method.name!r} makes training images of its own and reads their {task.target!r} "
                    f"targets by sample index, so they would not follow the random crop and flip ({key})",
                    bad=method.name, where=key, fix="set data.augment.crop_padding: 0 and data.augment.hflip: false, "
                    f"or leave method {method.name!r} out"))
    return problems


def cache_problems(recipe: Recipe, task: Task, cache: CacheSpec) -> list[KdkitError]:
    """Why ``recipe`` (training ``task``) cannot read a teacher-output cache with settings ``cache``; empty when it
    can. The one rule: the planner refuses with it and ``kdkit bench speed`` asks it whether to time a cached step.

    A cache replays stored crop/flip views of the training images and returns the teacher's stored outputs on
    them: nothing else may feed the teacher (a strong view, a method's new images). A dense task's outputs (feature
    maps, logit maps) are stored whole, like any tap, and its targets follow the replayed views as they follow
    drawn ones (the loader hands them on); ``logits: topk`` keeps the top classes of one vector per view, which a
    map of per-position outputs does not have.
    """
    problems = []
    if recipe.data.views != 1:
        problems.append(KdkitError("teacher.cache stores outputs for the crop/flip views only; data.views: 2 needs "
                                   "the teacher on the strong view too", bad="2", where="data.views",
                                   fix="remove teacher.cache or use data.views: 1"))
    for method in active_methods(recipe):
        if method.feeds_teacher_new_images:
            problems.append(KdkitError(f"teacher.cache cannot be combined with method {method.name!r}: it makes new "
                                       "images the teacher has to see", bad=method.name, where="teacher.cache",
                                       fix="remove teacher.cache (the teacher runs on every batch)"))
    if task.pixel_targets and cache.logits == "topk":
        problems.append(KdkitError(f"topk keeps the top classes of one logit vector per view; task {recipe.task!r} "
                                   "has per-position outputs, stored whole", bad="topk", choices=["full"],
                                   where="teacher.cache.logits", fix="set teacher.cache.logits: full"))
    return problems


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else is checked."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise KdkitError(f"unknown device {spec!r}", choices=["auto", "cpu", "cuda", "cuda:0", "mps"], bad=spec,
                         fix="use auto, cpu or cuda[:N]", where="train.device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdkitError(f"device {spec!r} requested but CUDA is not available here", choices=["auto", "cpu"],
                         fix="use train.device=auto or cpu", where="train.device")
    return device


def weights_recipe(spec: TeacherSpec | TrainedSpec, base: Path | None, where: str = "teacher.recipe") -> Recipe | None:
    """The recipe whose run gives a network's weights (``teacher.recipe``, ``peers.NAME.recipe``), when the spec
    names one (parsed once per file version)."""
    if spec.recipe is None:
        return None
    file = find_recipe(spec.recipe, relative_to=base, where=where).resolve()
    return _parsed_recipe(file, file.stat().st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _parsed_recipe(file: Path, version: int) -> Recipe:
    """``load_recipe(file)``, kept while the file is unchanged (a run asks for its teacher's recipe to train it
    first, to find its weights and to key its cache); recipes are immutable, so sharing one is safe."""
    return load_recipe(file)


def trained_weights(spec: TeacherSpec | TrainedSpec, base: Path | None, at: str = "teacher") -> Path:
    """Where a network's trained weights are: its checkpoint, or the finished run of its recipe (``at`` is its
    place in the recipe, for messages)."""
    if spec.checkpoint is not None:
        return resolve_weights(spec.checkpoint)
    run_recipe = weights_recipe(spec, base, f"{at}.recipe")
    assert run_recipe is not None
    if not (run_recipe.run_dir / "summary.json").is_file():
        raise KdkitError(f"the recipe {spec.recipe!r} of {at} has no finished run in {run_recipe.run_dir}",
                         fix=f"`kdkit run` trains it automatically first; or run that recipe yourself, or give "
                             f"{at}.checkpoint", where=f"{at}.recipe")
    return resolve_weights(run_recipe.run_dir)


def _spec(value: str | list[str] | None) -> TapSpec | None:
    """A recipe's tap value as a spec: a string, or a tuple for a list of taps."""
    return tuple(value) if isinstance(value, list) else value


def _shape_of(shapes: dict[str, tuple[int, ...]], spec: TapSpec) -> Any:
    return shapes[spec] if isinstance(spec, str) else [shapes[s] for s in spec]


def build_bridge(name: str, params: dict[str, Any], s_shape: Any, t_shape: Any, where: str) -> nn.Module:
    """Build bridge ``name`` from probed shapes; a multi-tap term gets one bridge per tap unless the
    bridge fuses all taps itself (registered with ``fuses_taps=True``, e.g. ReviewKD's ABF)."""
    factory = BRIDGES.get(name, where=f"{where}.bridge")
    checked = check_params(factory, params, skip=SHAPE_PARAMS, where=f"{where}.bridge_params",
                           what=f"bridge {name!r}")
    if isinstance(s_shape, list) and name not in FUSING_BRIDGES:
        return PerTap([factory(s, t, **checked) for s, t in zip(s_shape, t_shape, strict=True)])
    return factory(s_shape, t_shape, **checked)


@torch.no_grad()
def bridged_shape(bridge: nn.Module, shape: Any) -> Any:
    """Per-sample output shape(s) of ``bridge`` for input shape(s) ``shape`` (one probe in eval mode)."""
    if isinstance(bridge, StructuredBridge):  # its output is not one tensor: it states the shape
        return bridge.output_shape(shape)
    was_training = bridge.training
    bridge.eval()
    if isinstance(shape, list):
        out = [tuple(o.shape[1:]) for o in bridge([torch.zeros(2, *one) for one in shape])]
    else:
        out = tuple(bridge(torch.zeros(2, *shape)).shape[1:])
    bridge.train(was_training)
    return out


def needs_teacher(loss_cls: Any, params: dict[str, Any]) -> bool:
    """Whether a term of this loss with these parameters compares the student with a teacher tensor
    (``DistillLoss.teacher_needed``)."""
    return loss_cls.teacher_needed(params)


def _located(exc: KdkitError, where: str) -> KdkitError:
    """``exc`` with its location placed under the term's (``distill.0.metric``)."""
    # no `bad=`: the choices are already ordered closest first and must keep that order
    return KdkitError(exc.message, choices=exc.choices, fix=exc.fix,
                      where=f"{where}.{exc.where}" if exc.where else where)


def resolved_terms(recipe: Recipe) -> list[dict[str, Any]]:
    """Each distillation term's loss and bridge with every parameter they are built with: the recipe's values
    (validated) and the declared defaults of the others. A run folder records it in ``resolved_params.yaml``,
    apart from ``recipe.yaml``, so the recipe's digest (which reuses finished runs) stays what the recipe says.

    Raises:
        RecipeErrors: A term's parameters are invalid (as :func:`plan` reports them).
    """
    terms = []
    for i, (term, name) in enumerate(zip(recipe.distill, _term_names(recipe), strict=True)):
        where = f"distill.{i}"
        entry: dict[str, Any] = {
            "name": name, "loss": term.loss,
            "params": with_defaults(LOSSES.get(term.loss, where=f"{where}.loss"), term.params, where=where,
                                    what=f"loss {term.loss!r}")}
        if term.bridge is not None:
            entry["bridge"] = term.bridge
            entry["bridge_params"] = with_defaults(BRIDGES.get(term.bridge, where=f"{where}.bridge"),
                                                   term.bridge_params, skip=SHAPE_PARAMS,
                                                   where=f"{where}.bridge_params", what=f"bridge {term.bridge!r}")
        terms.append(entry)
    return terms


def _term_names(recipe: Recipe) -> list[str]:
    names: list[str] = []
    for i, term in enumerate(recipe.distill):
        name = term.name or term.loss
        if name in names:
            name = f"{name}@{term.student}" if term.student else f"{name}{i}"
        while name in names:
            name = f"{name}_{i}"
        names.append(name)
    return names


@dataclass
class _Terms:
    """The terms of a recipe as far as they could be built: losses, what each side reads, the taps to record."""

    names: list[str]
    losses: dict[str, DistillLoss] = field(default_factory=dict)
    reads: dict[str, tuple[TapSpec, TapSpec | None]] = field(default_factory=dict)
    student_taps: dict[str, Tap] = field(default_factory=dict)
    teacher_taps: dict[str, Tap] = field(default_factory=dict)
    peer_teacher: set[str] = field(default_factory=set)  # terms whose teacher side is a trained peer


class _Planner:
    """The stages of :func:`plan`; every stage adds what it finds wrong to one list, so all problems are
    reported at once (a stage skips what an earlier problem made impossible to check)."""

    def __init__(self, recipe: Recipe, training: bool, source: Path | None, deploying: bool = False) -> None:
        self.recipe, self.training, self.source = recipe, training, source
        # Rebuilding a finished run's deployed network: its checkpoint gives every weight, so no initial
        # weights, teacher weights or teacher recipe are read, and the losses are not set up.
        self.deploying = deploying
        self.base = source.parent if source is not None else None
        #: Output layouts the networks declare beyond their task's (``model.logits_layout``, e.g. RetinaNet's anchors)
        self.model_layouts: set[str] = set()
        self.errors: list[KdkitError] = []
        self.warnings: list[str] = []

    def attempt(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, or ``None`` with its problems recorded."""
        try:
            return fn(*args, **kwargs)
        except RecipeErrors as exc:
            self.errors.extend(exc.errors)
        except KdkitError as exc:
            self.errors.append(exc)
        return None

    def raise_errors(self) -> None:
        if self.errors:
            raise RecipeErrors(self.errors, str(self.source) if self.source else self.recipe.name,
                               warnings=self.warnings)

    # -- stage 1: output folder, device, data, task ------------------------------------------------------
    def output(self) -> None:
        """The run folder must be a folder (or not exist yet): found before any training, not by mkdir."""
        run_dir = self.recipe.run_dir
        blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            self.errors.append(KdkitError(f"output.dir {str(run_dir)!r} cannot be a folder: {str(blocker)!r} is a "
                                          "file", fix="set output.dir to a folder path", where="output.dir"))

    def device(self, override: torch.device | None) -> torch.device:
        recipe = self.recipe
        dev = override or self.attempt(resolve_device, recipe.train.device) or torch.device("cpu")
        if recipe.train.amp == "fp16" and dev.type != "cuda":
            self.errors.append(KdkitError("fp16 AMP needs a CUDA device", choices=["off", "bf16"], bad="fp16",
                                          fix="use train.amp=bf16 on CPU", where="train.amp"))
        return dev

    def data(self) -> tuple[ImageData | None, DataShape]:
        recipe = self.recipe
        data = None
        try:
            data = load_dataset(recipe.data.dataset, recipe.data.root, **recipe.data.params)
            self.warnings.extend(f"data: {warning}" for warning in data.warnings)  # e.g. skipped annotations
        except KdkitError as exc:
            known = recipe.data.dataset in KNOWN_SHAPES and "unknown dataset" not in exc.message
            if self.training or not known:
                self.errors.append(exc if exc.where else KdkitError(exc.message, fix=exc.fix, where="data"))
            else:
                self.warnings.append(f"data: {exc.render()}")
        if data is not None and recipe.data.subset is not None:
            data = self.attempt(subset, data, recipe.data.subset, recipe.data.subset_seed)
        if data is not None and recipe.data.validation is not None:  # before the setting: it is scored by labels
            data = self.attempt(hold_out, data, recipe.data.validation.fraction, recipe.data.validation.seed)
        setting = recipe.data.setting
        checked = None if setting is None else self.attempt(check_setting, setting.name, setting.params)
        if checked is not None:  # a setting, and its parameters are valid
            self.setting_fits(setting.name, checked)
            if data is not None and not self.reads_teacher():  # else applied once the teacher is loaded
                data = self.attempt(apply_setting, data, setting.name, setting.params, setting.seed)
        if data is not None:
            return data, DataShape(data.num_classes, data.in_channels, data.image_size)
        return None, DataShape(*KNOWN_SHAPES.get(recipe.data.dataset, (10, 3, 32)))

    def setting_fits(self, name: str, params: dict[str, Any]) -> None:
        """Refuse a setting on a task it builds no targets for, or without the previous model it needs."""
        found, recipe = SETTINGS.get(name), self.recipe
        if found.tasks and recipe.task not in found.tasks:
            self.errors.append(KdkitError(f"setting {name!r} builds targets for {', '.join(found.tasks)}, not task "
                                          f"{recipe.task!r}", bad=recipe.task, choices=list(found.tasks),
                                          fix=f"set task: {found.tasks[0]}", where="task"))
        classes = found.old_model(params)
        if classes is None:
            return
        teacher = recipe.teacher
        if teacher is None or teacher.classes != classes:
            got = "no teacher" if teacher is None else f"teacher.classes {teacher.classes}"
            self.errors.append(KdkitError(f"setting {name!r} {params} continues a model of {classes} classes, "
                                          f"but the recipe has {got}", bad=str(None if teacher is None else
                                                                             teacher.classes),
                                          choices=[str(classes)], fix=f"add `teacher:` (the previous step's run: "
                                          f"recipe or checkpoint) with classes: {classes}", where="teacher"))

    def reads_teacher(self) -> bool:
        """Whether the recipe's data setting ranks the training images by the teacher's logits."""
        setting = self.recipe.data.setting
        return setting is not None and setting.name in SETTINGS and \
            SETTINGS.get(setting.name).reads_teacher(setting.params)

    def teacher_setting(self, data: ImageData | None, teacher_model: nn.Module | None) -> ImageData | None:
        """``data`` under a setting that reads the teacher's logits on the training images (computed here, with the
        loaded teacher); other data as it is. Validation checks names only: its teacher has no weights."""
        setting = self.recipe.data.setting
        if setting is None or data is None or not self.reads_teacher() or not self.training or teacher_model is None:
            return data
        logits = teacher_logits(teacher_model, data)
        return self.attempt(apply_setting, data, setting.name, setting.params, setting.seed, teacher_logits=logits)

    def unlabelled(self, data: ImageData | None, found: _Terms) -> None:
        """Refuse what cannot train on unlabelled samples: a supervised loss with no label at all, nothing that
        learns from the unlabelled samples, terms or methods that read the labels."""
        recipe = self.recipe
        if data is None:
            return
        total, labelled = len(data.train_labels), data.num_labelled
        if labelled == total:
            return
        what = f"{total - labelled} of the {total} training samples of {data.name!r} are unlabelled"
        setting = f" (data.setting {recipe.data.setting.name!r})" if recipe.data.setting is not None else ""
        if labelled == 0 and recipe.train.ce_weight:
            self.errors.append(KdkitError(f"all {total} training samples are unlabelled{setting}: the supervised loss "
                                          f"(train.ce_weight {recipe.train.ce_weight:g}) has no label to learn from",
                                          fix="set train.ce_weight: 0 and learn from a teacher with `distill:` terms",
                                          where="train.ce_weight"))
        if not recipe.distill:
            alone = (", or train on the labelled samples alone (data.subset gives semi_supervised's labelled images "
                     "with the same seed)") if labelled else ""
            self.errors.append(KdkitError(f"{what}{setting} and no `distill:` term learns from them",
                                          fix="add a distillation term that needs no labels (e.g. {loss: kd})" + alone,
                                          where="distill"))
        label_free = [name for name, cls in LOSSES.items() if not cls.uses_labels]
        for i, (term, name) in enumerate(zip(recipe.distill, found.names, strict=True)):
            loss = found.losses.get(name)
            if loss is not None and loss.uses_labels:
                self.errors.append(KdkitError(f"loss {term.loss!r} reads the class labels, but {what}{setting}",
                                              choices=label_free, bad=term.loss,
                                              fix="use a loss that needs no labels, or a setting whose training "
                                                  "samples are all labelled", where=f"distill.{i}.loss"))
        for method in active_methods(recipe):
            if method.needs_labels:
                self.errors.append(KdkitError(f"method {method.name!r} needs the label of every training sample, but "
                                              f"{what}{setting}", fix="use a setting whose training samples are all "
                                              f"labelled, or leave method {method.name!r} out", where="data.setting"))

    def task(self, data: ImageData | None) -> Task | None:
        recipe = self.recipe
        task = self.attempt(TASKS.get, recipe.task, where="task")
        if task is not None and data is not None and (problem := task.check_data(data)) is not None:
            self.errors.append(KdkitError(f"task {recipe.task!r} {problem}", choices=tasks_serving(data),
                                          bad=recipe.task, fix=f"use a task dataset {data.name!r} serves, or a "
                                          "dataset with these targets (`kdkit ls datasets`)", where="task"))
        if task is not None and task.pixel_targets:
            self.errors += geometry_problems(recipe, task)
        if task is not None and recipe.teacher is not None and recipe.teacher.cache is not None:
            self.errors += cache_problems(recipe, task, recipe.teacher.cache)
        metric = recipe.train.best_metric
        if task is not None and metric is not None and metric not in task.selectable(data):
            self.errors.append(KdkitError(f"task {recipe.task!r} has no metric {metric!r} to pick the best epoch by"
                                          + (f" on {data.name!r}" if data is not None else ""),
                                          choices=task.selectable(data), bad=metric,
                                          fix="pick the best epoch by one of the task's metrics",
                                          where="train.best_metric"))
        return task

    # -- stage 2: the networks ------------------------------------------------------------------------
    def network(self, spec: Any, shape: DataShape, at: str) -> nn.Module | None:
        # the task decides the networks' outputs (segmentation adds background); an unknown task is reported
        # by stage 1, and the networks are then built for the classes alone. A teacher of fewer classes (a
        # class-incremental step's old model) is built for its own.
        classes = getattr(spec, "classes", None) or shape.num_classes
        if classes > shape.num_classes:
            self.errors.append(KdkitError(f"{at}.classes {classes} exceeds the data's {shape.num_classes} classes",
                                          bad=str(classes), choices=[str(shape.num_classes)],
                                          fix=f"set {at}.classes to at most {shape.num_classes}",
                                          where=f"{at}.classes"))
            return None
        task = TASKS.get(self.recipe.task) if self.recipe.task in TASKS else None
        outputs = task.outputs(classes) if task is not None else classes
        return self.attempt(build_model, spec.arch, num_classes=outputs, in_channels=shape.in_channels,
                            image_size=shape.image_size, params=spec.params, where=f"{at}.arch")

    def trained(self, shape: DataShape) -> nn.Module | None:
        """The trained network: ``model``, or one :class:`PeerGroup` of it and its peers."""
        recipe = self.recipe
        members: dict[str, nn.Module | None] = {}
        for member, spec in recipe.trained_members().items():
            at = recipe.member_key(member)
            members[member] = built = self.network(spec, shape, at)
            if built is not None and spec.init == "teacher" and not self.deploying:
                self.from_teacher(built, spec, at)
            if built is not None and not self.deploying:
                self.start_weights(built, spec, at)
        if recipe.peers is None:
            return members["model"]
        if any(m is None for m in members.values()):
            return None
        return PeerGroup(members, recipe.deploy)  # type: ignore[arg-type]  # one module: taps, DDP, checkpoints

    def start_weights(self, built: nn.Module | None, spec: TeacherSpec | TrainedSpec, at: str) -> None:
        """Load a network's weights (a teacher's, or a trained network's starting ones): its ``checkpoint``, or
        its ``recipe``'s finished run; a recipe that cannot be found is reported even when ``built`` failed."""
        if spec.recipe is not None:
            self.attempt(weights_recipe, spec, self.base, f"{at}.recipe")
        if built is None or (spec.checkpoint is None and spec.recipe is None):
            return
        if self.training:
            weights = self.attempt(trained_weights, spec, self.base, at)
            if weights is not None:
                self.attempt(load_model_weights, built, weights, where=f"{at}.checkpoint")
        elif spec.checkpoint is not None and not Path(spec.checkpoint).exists():
            self.warnings.append(f"{at}.checkpoint: {spec.checkpoint!r} does not exist here")
        elif spec.checkpoint is not None:  # names and shapes only: the model is on the meta device
            self.attempt(load_model_weights, built, spec.checkpoint, where=f"{at}.checkpoint")

    def from_teacher(self, built: nn.Module, spec: Any, at: str) -> None:
        """Start ``built`` from the frozen teacher's weights (``init: teacher``), growing its output layers."""
        teacher = self.recipe.teacher
        own = "checkpoint" if spec.checkpoint is not None else "recipe" if spec.recipe is not None else None
        if teacher is None or own is not None:
            self.errors.append(KdkitError(
                f"{at}.init 'teacher' needs one frozen `teacher:` and no {at}.checkpoint or {at}.recipe"
                + (" (there is no teacher)" if teacher is None else f" ({own} is {getattr(spec, own)!r})"),
                bad="teacher", choices=["fresh"], fix=f"add `teacher:` (the previous step's run) and drop "
                f"{at}.checkpoint and {at}.recipe, or set {at}.init: fresh", where=f"{at}.init"))
            return
        if spec.arch != teacher.arch or spec.params != teacher.params:
            self.errors.append(KdkitError(f"{at}.init 'teacher' needs the teacher's arch and params, got "
                                          f"{spec.arch} {spec.params} vs {teacher.arch} {teacher.params}",
                                          bad=spec.arch, choices=[teacher.arch], fix=f"set {at} to the "
                                          "teacher's arch and params", where=f"{at}.init"))
            return
        if self.training:
            weights = self.attempt(trained_weights, teacher, self.base)
        elif teacher.checkpoint is not None and Path(teacher.checkpoint).exists():
            weights = resolve_weights(teacher.checkpoint)
        else:  # validation: the teacher's run may not exist yet (training makes it first)
            return
        if weights is not None:
            self.attempt(load_model_weights, built, weights, where=f"{at}.init", grow=True)

    def frozen(self, shape: DataShape) -> nn.Module | None:
        """The frozen teacher, or one :class:`TeacherEnsemble` of the named teachers (weights loaded)."""
        recipe = self.recipe
        models: dict[str, nn.Module | None] = {}
        for member, spec in recipe.frozen_teachers().items():
            at = recipe.teacher_key(member)
            models[member] = built = self.network(spec, shape, at)
            if self.deploying:  # only the shapes of its taps are needed (to build the bridges)
                continue
            self.start_weights(built, spec, at)
        if recipe.teachers is not None:
            return TeacherEnsemble(models) if all(m is not None for m in models.values()) else None  # type: ignore[arg-type]
        return models.get("teacher")

    # -- stage 3: the terms ---------------------------------------------------------------------------
    def terms(self, model: nn.Module | None, teacher_model: nn.Module | None) -> _Terms:
        """Each term's loss (parameters checked), taps (resolved on their network) and bridge name."""
        recipe = self.recipe
        found = _Terms(_term_names(recipe))
        self.model_layouts = {layout for net in (model, teacher_model)
                              if isinstance(layout := getattr(net, "logits_layout", None), str)}
        for i, (term, name) in enumerate(zip(recipe.distill, found.names, strict=True)):
            where = f"distill.{i}"
            loss = self.loss(term, where)
            if loss is None:
                continue
            loss_cls = type(loss)
            s_spec = _spec(term.student) or loss_cls.default_student_tap
            # Teacher-less losses read no teacher tap: the term works without a `teacher:` section.
            reads_teacher = needs_teacher(loss_cls, term.params)
            t_spec = (_spec(term.teacher) or loss_cls.default_teacher_tap) if reads_teacher else None
            if not self.sides_fit(term, loss_cls, s_spec, t_spec, where):
                continue
            found.losses[name] = loss
            found.reads[name] = (s_spec, t_spec)
            peer = recipe.reads_peer(t_spec)
            if peer:
                found.peer_teacher.add(name)
            for side, net, spec, taps in (("student", model, s_spec, found.student_taps),
                                          ("teacher", model if peer else teacher_model, t_spec,
                                           found.student_taps if peer else found.teacher_taps)):
                if net is None or spec is None:
                    continue
                for one in as_specs(spec):
                    tap = self.attempt(resolve_tap, net, one, where=f"{where}.{side}")
                    if tap is not None:
                        taps[one] = tap
            if term.bridge is not None:
                self.attempt(BRIDGES.get, term.bridge, where=f"{where}.bridge")
        return found

    def cached_taps(self, found: _Terms, teacher_model: nn.Module | None) -> None:
        """``teacher.cache.taps``: resolve each listed tap on the teacher (the cache stores them all) and refuse a
        term reading a teacher tap the list leaves out (the cache would not hold it)."""
        cache = self.recipe.teacher.cache if self.recipe.teacher is not None else None
        if cache is None or cache.taps is None or teacher_model is None:
            return
        for i, spec in enumerate(cache.taps):
            tap = self.attempt(resolve_tap, teacher_model, spec, where=f"teacher.cache.taps.{i}")
            if tap is not None:
                found.teacher_taps.setdefault(spec, tap)
        listed = set(cache.taps)
        for name, (_, t_spec) in found.reads.items():
            if t_spec is None or name in found.peer_teacher:
                continue
            for one in as_specs(t_spec):
                if one not in listed:
                    self.errors.append(KdkitError(
                        f"term {name!r} reads teacher tap {one!r}, which teacher.cache.taps does not store",
                        choices=list(cache.taps), bad=one, where="teacher.cache.taps",
                        fix=f"add {one!r} to teacher.cache.taps, or remove the list (then the terms' taps are stored)"))

    def loss(self, term: Any, where: str) -> DistillLoss | None:
        loss_cls = self.attempt(LOSSES.get, term.loss, where=f"{where}.loss")
        if loss_cls is None:
            return None
        params = self.attempt(check_params, loss_cls, term.params, where=where, what=f"loss {term.loss!r}")
        if params is None:
            return None
        try:
            return loss_cls(**params)
        except RecipeErrors as exc:  # a loss wrapping another (e.g. a per-step metric) validates it like a term
            self.errors.extend(_located(e, where) for e in exc.errors)
        except KdkitError as exc:
            self.errors.append(_located(exc, where))
        except (ValueError, TypeError) as exc:
            self.errors.append(KdkitError(f"loss {term.loss!r}: {exc}", fix="see `kdkit ls losses`", where=where))
        return None

    def sides_fit(self, term: Any, loss_cls: type[DistillLoss], s_spec: TapSpec, t_spec: TapSpec | None,
                  where: str) -> bool:
        """Whether the term's bridge and tap counts are what its loss reads (recording why not)."""
        required = loss_cls.requires_bridge
        if required is not None and term.bridge != required:
            self.errors.append(KdkitError(f"loss {term.loss!r} reads the output of the {required!r} bridge, got "
                                          f"bridge {term.bridge!r}", choices=[required], bad=str(term.bridge),
                                          fix=f"add `bridge: {required}` to the term", where=f"{where}.bridge"))
            return False
        if not self.reads_task_output(term, loss_cls, s_spec, t_spec, where):
            return False
        if t_spec is None and term.teacher is not None:
            self.errors.append(KdkitError(f"loss {term.loss!r} reads no teacher tap here (its knowledge comes from "
                                          f"elsewhere), got teacher: {term.teacher!r}", bad=str(term.teacher),
                                          fix="remove `teacher:` from the term", where=f"{where}.teacher"))
            return False
        if loss_cls.teacher_list and not isinstance(s_spec, str):
            self.errors.append(KdkitError(f"loss {term.loss!r} compares one student tap with a list of teacher "
                                          f"taps, got student taps {list(as_specs(s_spec))}",
                                          fix="give one `student:` tap", where=f"{where}.student"))
            return False
        if t_spec is not None and not loss_cls.teacher_list and len(as_specs(s_spec)) != len(as_specs(t_spec)):
            self.errors.append(KdkitError(f"{len(as_specs(s_spec))} student tap(s) {list(as_specs(s_spec))} but "
                                          f"{len(as_specs(t_spec))} teacher tap(s) {list(as_specs(t_spec))}",
                                          fix="give as many teacher taps as student taps (they are paired in order)",
                                          where=where))
            return False
        return True

    def reads_task_output(self, term: Any, loss_cls: type[DistillLoss], s_spec: TapSpec, t_spec: TapSpec | None,
                          where: str) -> bool:
        """Whether a loss that reads the networks' ``logits`` tap without a bridge understands what the task's
        logits are (KD's softmax over classes means nothing on a detector's dense outputs; recording why not)."""
        layouts = loss_cls.reads_logits
        task = TASKS.get(self.recipe.task) if self.recipe.task in TASKS else None
        if layouts is None or task is None or term.bridge is not None:
            return True
        # a network may refine its task's layout (RetinaNet's per-anchor outputs on task detection): the first
        # layout the loss does not read is the one to name
        own = sorted(self.model_layouts - {task.logits_layout})
        layout = next((x for x in own if x not in layouts), task.logits_layout)
        if layout in layouts:
            return True
        taps = [*as_specs(s_spec), *(as_specs(t_spec) if t_spec is not None else ())]
        logits = sorted({str(t) for t in taps if str(t).rsplit(".", 1)[-1] == LOGITS})
        if not logits:
            return True
        fitting = sorted(name for name, cls in LOSSES.items()
                         if cls.reads_logits is not None and layout in cls.reads_logits)
        wanted = " or ".join(LOGITS_LAYOUTS[x] for x in sorted(layouts))
        self.errors.append(KdkitError(
            f"loss {term.loss!r} reads {wanted} from tap(s) {logits}, but the `logits` of task {task.name!r} "
            f"{'with these networks ' if layout != task.logits_layout else ''}are {LOGITS_LAYOUTS[layout]}",
            choices=fitting, bad=term.loss,
            fix="use a loss made for these outputs (the choices), read feature taps with a feature loss (fitnets, "
                "cwd, mgd ...), or add a `bridge:` that maps the outputs to what the loss reads",
            where=f"{where}.loss"))
        return False

    # -- stage 4: shapes and bridges (one probe forward per network) ---------------------------------
    def bridges(self, found: _Terms, model: nn.Module | None, teacher_model: nn.Module | None, shape: DataShape,
                num_samples: int) -> tuple[dict[str, nn.Module], dict[str, tuple[Any, Any]]]:
        recipe = self.recipe
        bridges: dict[str, nn.Module] = {}
        tap_shapes: dict[str, tuple[Any, Any]] = {}
        if model is None or (teacher_model is None and recipe.has_teacher) or not found.losses:
            return bridges, tap_shapes
        # the student's logits too: teacher-less terms map onto the student's own logit width
        probe = [*found.student_taps.values(), Tap(LOGITS, "", "logits")]
        s_shapes = self.attempt(probe_shapes, model, probe, _example(model, shape)) or {}
        t_shapes = (self.attempt(probe_shapes, teacher_model, list(found.teacher_taps.values()),
                                 _example(teacher_model, shape)) or {}
                    if teacher_model is not None else {})
        for i, (term, name) in enumerate(zip(recipe.distill, found.names, strict=True)):
            if name not in found.losses:
                continue
            s_spec, t_spec = found.reads[name]
            t_from = t_shapes if t_spec is not None and name not in found.peer_teacher else s_shapes
            t_spec_or_own = t_spec if t_spec is not None else LOGITS
            if not all(s in s_shapes for s in as_specs(s_spec)) or \
                    not all(t in t_from for t in as_specs(t_spec_or_own)):
                continue
            where = f"distill.{i}"
            s_shape, t_shape = _shape_of(s_shapes, s_spec), _shape_of(t_from, t_spec_or_own)
            if term.bridge is not None and term.bridge in BRIDGES:
                bridge = self.attempt(build_bridge, term.bridge, term.bridge_params, s_shape, t_shape, where)
                if bridge is None:
                    continue
                bridges[name] = bridge
                s_shape = bridged_shape(bridge, s_shape)
            tap_shapes[name] = (s_shape, t_shape)
            if self.deploying:
                continue
            loss = found.losses[name]
            self.attempt(loss.setup, s_shape, t_shape, num_samples)
            self.check_shapes(term, loss, s_spec, t_spec, s_shape, t_shape, where)
        deploying = [f"distill.{i}" for i, name in enumerate(found.names)
                     if isinstance(bridges.get(name), DeployingBridge)]
        if len(deploying) > 1:
            self.errors.append(KdkitError(f"terms {deploying} each have a bridge that deploys the prediction; only "
                                          "one can be the deployed head", fix="keep one deploying bridge per recipe",
                                          where=deploying[1]))
        return bridges, tap_shapes

    def check_shapes(self, term: Any, loss: DistillLoss, s_spec: TapSpec, t_spec: TapSpec | None, s_shape: Any,
                     t_shape: Any, where: str) -> None:
        pairs = list(zip(s_shape, t_shape, strict=True)) if isinstance(s_spec, tuple) and loss.pairwise \
            else [(s_shape, t_shape)]
        for j, (one_s, one_t) in enumerate(pairs):
            problem = loss.check_shapes(one_s, one_t)
            if isinstance(problem, KdkitError):  # the loss names the valid choices and the fix itself
                self.errors.append(_located(problem, where))
                continue
            if problem:
                s_name = as_specs(s_spec)[j] if len(pairs) > 1 else s_spec
                t_name = as_specs(t_spec)[j] if len(pairs) > 1 and t_spec is not None else t_spec
                choices, hint = BRIDGES.names(), "choose another bridge or other taps"
                if term.bridge is None and isinstance(one_s, tuple) and isinstance(one_t, tuple):
                    # the bridges whose declared shape rule maps this student tap onto the teacher's
                    choices = bridges_for(one_s, one_t)
                    hint = bridge_hint(one_s, one_t, choices)
                self.errors.append(KdkitError(f"loss {term.loss!r} cannot compare student tap {s_name!r} with "
                                              f"teacher tap {t_name!r}: {problem}", choices=choices,
                                              fix=hint, where=where))


def with_later_problems(errors: RecipeErrors, source: str | Path | None = None) -> RecipeErrors:
    """``errors`` (the schema's) plus what :func:`plan` finds in the rest of the recipe (taps, shapes, files).

    The plan runs on :attr:`RecipeErrors.partial`, the recipe without the refused values; its problems about
    keys that were left out are dropped (they describe the defaults used in their place).
    """
    if errors.partial is None:
        return errors
    warnings: list[str] = []
    try:
        later, warnings = [], plan(errors.partial, training=False, source=source).warnings
    except RecipeErrors as exc:
        later, warnings = exc.errors, exc.warnings
    except KdkitError as exc:
        later = [exc]
    left_out = errors.left_out
    for error in later:  # locations in the trimmed recipe -> the user's recipe
        error.where = left_out.original(error.where) if error.where else error.where
    seen = {e.render() for e in errors.errors}
    kept = [e for e in later if e.render() not in seen and not (e.where and left_out.covers(e.where))]
    return RecipeErrors([*errors.errors, *kept], errors.source, warnings=warnings)


def teacher_logits(model: nn.Module, data: ImageData, batch_size: int = 1000) -> torch.Tensor:
    """``(N, K)`` float32 logits of ``model`` (in eval mode) on ``data``'s un-augmented training images, on the CPU."""
    was_training = model.training
    model.eval()
    try:
        return map_images(model, data.train_images, data.mean, data.std, next(model.parameters()).device,
                          batch_size).cpu()
    finally:
        model.train(was_training)


def _example(net: nn.Module, shape: DataShape) -> torch.Tensor:
    """A probe batch of two blank images on ``net``'s device (the meta device for shape-only networks)."""
    where = next(net.parameters(), None)
    return torch.zeros(2, shape.in_channels, shape.image_size, shape.image_size,
                       device=where.device if where is not None else None)


def plan(recipe: Recipe, *, training: bool, source: Path | None = None, device: torch.device | None = None) -> Plan:
    """Build and check every object of ``recipe``, in stages: device, data and task; the networks; the terms;
    shapes and bridges; then the student, teacher and objective.

    Args:
        recipe: A schema-valid recipe.
        training: True for ``kdkit run`` (missing files are errors, weights are loaded); False for
            ``kdkit validate`` (missing files are warnings, weights are not read).
        source: The recipe file, for resolving the teacher's recipe relative to it.
        device: Override of ``train.device``.

    Raises:
        RecipeErrors: Every problem found, each with its recipe location, choices and fix.
    """
    stage = _Planner(recipe, training, source)
    stage.output()
    dev = stage.device(device)
    precision = choose_amp(recipe.train.amp, dev)
    data, shape = stage.data()
    task = stage.task(data)
    # Validation only needs names, paths and shapes: build on the meta device (no weights allocated or
    # initialised), which makes `kdkit validate` on a 7M-parameter pair take milliseconds.
    with torch.device("meta") if not training else contextlib.nullcontext():
        torch.manual_seed(recipe.train.seed)
        model = stage.trained(shape)
        teacher_model = stage.frozen(shape)
        data = stage.teacher_setting(data, teacher_model)
        found = stage.terms(model, teacher_model)
        stage.cached_taps(found, teacher_model)
        stage.unlabelled(data, found)
        bridges, tap_shapes = stage.bridges(found, model, teacher_model, shape,
                                            len(data.train_labels) if data is not None else 50_000)
    stage.raise_errors()
    assert model is not None and task is not None
    dev = dev if training else torch.device("meta")  # validation built everything on the meta device
    bound = stage.attempt(task.bind, data, dev, label_smoothing=recipe.train.label_smoothing, model=model) \
        if data is not None else None
    stage.raise_errors()
    terms = [Term(name, found.losses[name], found.reads[name][0], found.reads[name][1], term.weight,
                  term.warmup_epochs, teacher_is_peer=name in found.peer_teacher)
             for term, name in zip(recipe.distill, found.names, strict=True)]
    if bound is not None and recipe.train.ce_weight and recipe.peers is not None:
        # every trained network learns from the labels: the deployed one through the objective's own term,
        # the others through one term each
        terms += [Term(f"{task.loss_name}@{member}", SupervisedLoss(bound.loss), f"{member}.{LOGITS}", None,
                       recipe.train.ce_weight) for member in recipe.trained_members() if member != recipe.deploy]
    student = Student(model, {t.name: t.student_tap for t in terms}, bridges,
                      peer_targets={t.name: t.teacher_tap for t in terms if t.teacher_is_peer}).to(dev)
    teacher = None
    if teacher_model is not None:
        specs = list(recipe.frozen_teachers().values())  # an ensemble's layout: every member must allow it
        teacher = FrozenTeacher(teacher_model.to(dev), list(found.teacher_taps.values()),
                                channels_last=all(s.channels_last for s in specs) and dev.type not in ("mps", "meta"),
                                fold_bn=all(s.fold_bn for s in specs) and training)
    objective = Objective(terms, recipe.train.ce_weight, recipe.train.label_smoothing,
                          supervised=bound.loss if bound is not None else None,
                          supervised_name=task.loss_name).to(dev)
    return Plan(recipe, data, shape, student, objective, teacher, dev, precision, stage.warnings, tap_shapes, bound)


def plan_deployed(recipe: Recipe, shape: DataShape) -> Student:
    """The student of a finished run of ``recipe`` as :func:`plan` builds it -- the trained network and every
    bridge, on the CPU with fresh weights -- for loading that run's checkpoint into (export, predict).

    Nothing but the recipe is read: no data (``shape`` is what the run recorded), no initial or teacher weights
    and no teacher recipe. The teachers are built on the meta device, only for the shapes their taps give the
    bridges, and the losses are not set up.

    Raises:
        RecipeErrors: Every problem found (unknown names, taps, bridge parameters).
    """
    stage = _Planner(recipe, training=False, source=None, deploying=True)
    torch.manual_seed(recipe.train.seed)
    model = stage.trained(shape)
    with torch.device("meta"):
        teacher_model = stage.frozen(shape)
        found = stage.terms(model, teacher_model)  # the losses are built too: the bridges need their shapes
    bridges, _ = stage.bridges(found, model, teacher_model, shape, num_samples=0)
    stage.raise_errors()
    assert model is not None
    return Student(model, {name: reads[0] for name, reads in found.reads.items()}, bridges)
