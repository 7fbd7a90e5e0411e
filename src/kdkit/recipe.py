"""Recipes: YAML files validated by a typed schema. One recipe = one reproducible experiment.

Unknown keys are errors; every schema problem is reported at once with its recipe path. Loading a
recipe never executes code (a safe YAML loader). ``key=value`` overrides use dotted paths, e.g.
``train.epochs=5 distill.0.temperature=2``; values are parsed as YAML scalars.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdkit.errors import KdkitError, RecipeErrors
from kdkit.schema import Strict, read_yaml

LOGITS_NAME = "logits"  # the tap every network has (kdkit.taps.LOGITS)


class ModelSpec(Strict):
    """A network: registered name, ``timm:NAME``, ``torchvision:NAME`` or ``package.module:factory``."""

    arch: str
    params: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments of the factory")
    checkpoint: str | None = Field(None, description="weights: a kdkit run folder, checkpoint folder, "
                                   ".safetensors or a torch state_dict file")


class MemberOptimizerSpec(Strict):
    """One trained network's own optimiser settings: each key set here overrides ``train.optimizer``'s for that
    network's parameters (a parameter group of the run's one optimiser, so its family stays
    ``train.optimizer.name``). The lr schedule scales every group alike (``min_lr`` scales with the group's lr)."""

    lr: float | None = Field(None, gt=0)
    momentum: float | None = Field(None, ge=0, description="sgd and dot only")
    nesterov: bool | None = Field(None, description="sgd only")
    weight_decay: float | None = Field(None, ge=0)
    betas: tuple[float, float] | None = Field(None, description="adamw only")
    delta: float | None = Field(None, ge=0, description="dot only")

    def overrides(self) -> dict[str, Any]:
        """The keys that are set, as torch parameter-group keys."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class TrainedSpec(ModelSpec):
    """A trained network: ``model``, or a peer trained with it."""

    init: Literal["fresh", "teacher"] = Field(
        "fresh", description="teacher: start from the frozen teacher's trained weights (same arch), a layer with "
        "more outputs than the teacher's (a class-incremental step's classifier) taking the teacher's rows first "
        "and keeping its fresh initialisation for the new ones; fresh: the arch's own initialisation")

    optimizer: MemberOptimizerSpec | None = Field(
        None, description="this network's own optimiser settings (with `peers:` only; default: train.optimizer's)")

    recipe: str | None = Field(None, description="recipe (path or shipped name, relative to this recipe) whose "
                               "finished run gives this network's starting weights when no `checkpoint:` is given; "
                               "`kdkit run` trains it first (e.g. a pivot teacher that the run goes on refining)")


class CacheSpec(Strict):
    """The teacher-output cache (FKD-style): the teacher runs once over ``views`` augmented views of every
    training image; training replays those exact views and reads the stored outputs instead of running
    the teacher (``kdkit cache build RECIPE``; ``kdkit run`` builds it when missing)."""

    dir: str | None = Field(None, description="cache folder; default runs/cache/<key>, where the key hashes "
                            "the teacher weights, data, augmentation and these settings (shared by every "
                            "recipe that needs the same outputs)")
    views: int = Field(10, ge=1, description="augmented views stored per training image; sample i reads view "
                       "(epoch + r_i) mod views, so each view is used once every `views` epochs")
    logits: Literal["full", "topk"] = Field("full", description="store all logits, or the top-k probabilities "
                                            "plus the remaining mass (FKD's format, for many classes; "
                                            "classification only: dense tasks store their logit maps whole)")
    topk: int = Field(5, ge=1, description="classes kept per view when logits: topk")
    dtype: Literal["float16", "float32"] = Field("float16", description="stored precision; float32 replays the "
                                                 "teacher's outputs exactly, at twice the disk (`kdkit cache info` "
                                                 "states the bytes per image)")
    seed: int = Field(0, description="seed of the stored views (independent of train.seed, so every "
                      "student seed shares one cache)")
    batch_size: int = Field(512, gt=0, description="images per teacher forward while building")
    taps: list[str] | None = Field(None, min_length=1, description="teacher taps to store (default: those the "
                                   "terms read); a superset lets recipes that read different taps share one "
                                   "cache (kdkit search stores every tap of its space)")


class TeacherSpec(ModelSpec):
    """The frozen teacher. ``recipe`` names the recipe that trains it when ``checkpoint`` is absent."""

    recipe: str | None = Field(None, description="recipe (path or shipped name) that trains this teacher; "
                               "used, and its run reused, when no checkpoint is given")
    classes: int | None = Field(None, ge=1, description="the classes the teacher was trained on when fewer than the "
                                "data's: the data's first `classes` (a class-incremental step's old model; its "
                                "outputs are the task's for that many classes); default the data's")
    channels_last: bool = True
    fold_bn: bool = Field(True, description="fold BatchNorm into the preceding convolutions (faster, same outputs)")
    cache: CacheSpec | None = Field(None, description="replay stored teacher outputs instead of running the "
                                    "teacher every step (see CacheSpec)")

    @model_validator(mode="after")
    def _weights_from_somewhere(self) -> TeacherSpec:
        if self.checkpoint is None and self.recipe is None:
            raise ValueError("a teacher needs trained weights: give `checkpoint:` (a file or run folder) or "
                             "`recipe:` (the recipe that trains it; its run is reused when cached)")
        return self


class AugmentSpec(Strict):
    """Batched augmentation of training images."""

    crop_padding: int = Field(0, ge=0, description="random crop after zero-padding by this many pixels")
    hflip: bool = False


class StrongAugmentSpec(Strict):
    """The strong view of two-view training (MLKD): RandAugment on top of the standard augmentation."""

    n: int = Field(2, ge=1, description="operations per image")
    m: float = Field(10.0, ge=0, le=30, description="magnitude, on RandAugment's 0..30 scale")
    groups: int = Field(8, ge=1, description="independent op draws per batch (kornia draws one per call)")


class SettingSpec(BaseModel):
    """A data setting (``kdkit ls settings``): the training split turned into a scenario (few labels, a long tail,
    novel classes, ...), after ``subset``. Keys other than ``name`` and ``seed`` are the setting's parameters."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    seed: int = Field(0, description="seed of the setting's choices (independent of train.seed, so every student "
                      "seed sees the same split)")

    @property
    def params(self) -> dict[str, Any]:
        """The setting's own parameters (the extra keys)."""
        return dict(self.model_extra or {})


class ValidationSpec(Strict):
    """A validation split carved from the training split (after ``subset``), evaluated instead of the test split:
    what a hyperparameter search (``kdkit sweep``) scores its trials on, so the test split is never read."""

    fraction: float = Field(0.1, gt=0, lt=1, description="share of the training images held out (class-balanced)")
    seed: int = Field(0, description="seed of the held-out choice (independent of train.seed)")


class DataSpec(Strict):
    """Which data, where, and how much of the training split."""

    dataset: str
    root: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    subset: int | None = Field(None, gt=0, description="train on a class-balanced random subset of this size")
    subset_seed: int = 0
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    views: Literal[1, 2] = Field(1, description="2: each batch is [weak view; strong view] of the same images "
                                 "(labels repeated), as MLKD needs")
    strong: StrongAugmentSpec = Field(default_factory=StrongAugmentSpec)
    setting: SettingSpec | None = Field(None, description="a data scenario built from the training split, e.g. "
                                        "{name: semi_supervised, labelled: 3000} (kdkit ls settings)")
    validation: ValidationSpec | None = Field(None, description="evaluate on a held-out part of the training split "
                                              "instead of the test split, e.g. {fraction: 0.1, seed: 0}")

    @field_validator("params")
    @classmethod
    def _root_is_its_own_key(cls, params: dict[str, Any]) -> dict[str, Any]:
        # every reader takes its folder as data.root; under params it would reach the reader twice
        if "root" in params:
            raise ValueError("the data folder is data.root, not data.params.root: move root up one level "
                             "(data: {dataset: NAME, root: FOLDER, params: {...}})")
        return params


class TermSpec(BaseModel):
    """A distillation term. Keys other than the fields below are the loss's parameters."""

    model_config = ConfigDict(extra="allow", frozen=True)

    loss: str
    weight: float = 1.0
    student: str | list[str] | None = Field(None, description="student tap, or a list of taps (several stages); "
                                            "default: the loss's default, usually logits")
    teacher: str | list[str] | None = Field(None, description="teacher tap(s), paired with the student's")
    bridge: str | None = None
    bridge_params: dict[str, Any] = Field(default_factory=dict)
    warmup_epochs: float = Field(0.0, ge=0, description="linear ramp of the weight from 0 over this many epochs; "
                                 "default: the loss's (dkd and reviewkd: 20, as in their reference code; others: 0)")
    name: str | None = Field(None, description="key in the logs (default: the loss name, made unique)")

    @model_validator(mode="before")
    @classmethod
    def _loss_warmup(cls, data: Any) -> Any:
        """An unset ``warmup_epochs`` becomes the loss's own default, so the resolved recipe shows what is used."""
        if isinstance(data, dict) and "warmup_epochs" not in data and isinstance(data.get("loss"), str):
            from kdkit.losses import LOSSES  # lazy, like _needs_teacher

            if data["loss"] in LOSSES:  # unknown names are reported by name elsewhere
                data = {**data, "warmup_epochs": LOSSES.get(data["loss"]).default_warmup_epochs}
        return data

    @property
    def params(self) -> dict[str, Any]:
        """The loss's own parameters (the extra keys)."""
        return dict(self.model_extra or {})


class OptimizerSpec(Strict):
    name: Literal["sgd", "adamw", "dot"] = Field(
        "sgd", description="sgd, adamw, or dot: the Distillation-Oriented Trainer (Zhao et al., ICCV 2023), SGD with "
        "momentum - delta on the supervised loss's gradient and momentum + delta on the distillation terms' (one "
        "extra backward pass per step)")
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    delta: float | None = Field(None, ge=0, description="dot only: the paper's Delta, in [0, momentum) with "
                                "momentum + delta < 1 (default with dot: 0.075, the paper's CIFAR setting)")

    @model_validator(mode="before")
    @classmethod
    def _dot_delta(cls, data: Any) -> Any:
        """An unset ``delta`` of dot becomes the paper's, so the resolved recipe shows what is used."""
        if isinstance(data, dict) and data.get("name") == "dot" and data.get("delta") is None:
            from kdkit.optimizers import DOT_DELTA  # lazy: torch is not needed to read a recipe

            data = {**data, "delta": DOT_DELTA}
        return data

    @model_validator(mode="after")
    def _family_keys(self) -> OptimizerSpec:
        if self.name != "dot":
            if self.delta is not None:
                raise ValueError(f"delta {self.delta} is a setting of dot, not of {self.name!r}; remove delta or "
                                 "set name: dot")
            return self
        if self.nesterov:
            raise ValueError("dot has no Nesterov variant (neither the paper nor its code has one); remove "
                             "nesterov: true or use name: sgd")
        from kdkit.optimizers import dot_problem

        assert self.delta is not None  # set by _dot_delta
        problem = dot_problem(self.momentum, self.delta)
        if problem:
            raise ValueError(f"{problem[0]}; {problem[1]}")
        return self


class ScheduleSpec(Strict):
    name: Literal["multistep", "cosine", "constant"] = "cosine"
    milestones: list[int] = Field(default_factory=list, description="epochs at which lr *= gamma (multistep)")
    gamma: float = 0.1
    warmup_steps: int = Field(0, ge=0, description="linear lr warm-up from 0 over this many steps")
    min_lr: float = Field(0.0, ge=0)


class TrainSpec(Strict):
    epochs: int = Field(..., gt=0)
    batch_size: int = Field(128, gt=0)
    eval_batch_size: int = Field(1000, gt=0, description="batch size of evaluation; on a CPU 256 was 1.9x faster "
                                 "per image than 1000 for the CNN pair (the batch stays in cache). The default "
                                 "stays 1000 so that finished runs keep their recipe digest")
    eval_every: int = Field(1, gt=0, description="evaluate on the test split every this many epochs; the last epoch "
                            "is always evaluated (the best epoch is picked among evaluated ones)")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    ce_weight: float = Field(1.0, ge=0, description="weight of the task's supervised loss (cross-entropy for "
                             "classification, binary cross-entropy for multilabel)")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    seed: int = 0
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, mps")
    amp: Literal["off", "auto", "bf16", "fp16"] = Field(
        "off", description="autocast of the forward passes (the teacher's too): off (fp32), bf16 (CPU/GPU), fp16 "
        "(CUDA), or auto: bf16 on CPUs with AMX or AVX512-BF16 and CUDA GPUs with native bf16, fp32 elsewhere (the "
        "choice and why are printed at the start and stored in summary.json)")
    channels_last: bool = Field(True, description="channels-last weights and batches: ~1.4x faster conv "
                                "training on CPU (oneDNN) and with AMP on GPU")
    threads: int | None = Field(None, gt=0, description="torch intra-op threads on CPU (default: torch's)")
    compile: bool = Field(False, description="torch.compile the student and its bridges (the first steps "
                          "compile, later ones run fused kernels; on CPU it needs a C++ compiler)")
    best_metric: str | None = Field(None, description="the task metric that picks the best epoch (default: the "
                                    "task's, e.g. top1 for classification, map for multilabel)")


class OutputSpec(Strict):
    dir: str = Field("runs/{name}", description="run folder; {name} is the recipe name")
    tensorboard: bool = False
    keep_checkpoints: int = Field(1, ge=1, description="epoch checkpoints kept besides 'best'")
    progress: bool = True

    @field_validator("dir")
    @classmethod
    def _dir_placeholders_are_known(cls, value: str) -> str:
        try:
            value.format(name="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{value!r} has a placeholder other than {{name}} ({exc}); write e.g. runs/{{name}}, "
                             "or double literal braces") from None
        return value


#: (path, unset value) of recipe keys added after the first release (see :meth:`Recipe.to_dict`).
_LATER_KEYS: tuple[tuple[tuple[str, ...], Any], ...] = (
    (("teacher", "cache"), None), (("train", "compile"), False), (("train", "best_metric"), None),
    (("train", "eval_every"), 1),
    (("task",), "classification"), (("teachers",), None), (("peers",), None), (("deploy",), "model"),
    (("data", "setting"), None), (("train", "optimizer", "delta"), None), (("data", "validation"), None),
    (("teacher", "cache", "taps"), None), (("teacher", "classes"), None),
)


class RecipeCore(Strict):
    """A whole experiment, without the method sections (see :data:`Recipe`). ``model`` is the network this
    recipe trains; ``teacher`` (optional) is frozen."""

    name: str
    description: str = ""
    task: str = Field("classification", description="what is learnt and measured: targets, supervised loss, "
                      "metrics (kdkit ls tasks)")
    model: TrainedSpec
    peers: dict[str, TrainedSpec] | None = Field(
        None, description="more trainable networks, trained with `model` (named `model`); terms read `NAME.TAP` on "
        "either side (a peer on the teacher side is a detached target, deep mutual learning); each learns from "
        "the labels with train.ce_weight")
    deploy: str = Field("model", description="the trained network that is deployed and evaluated: `model` or a peer")
    teacher: TeacherSpec | None = None
    teachers: dict[str, TeacherSpec] | None = Field(
        None, description="several frozen teachers by name (instead of `teacher:`): terms read `NAME.TAP` (e.g. "
        "t1.logits, t2.stage2); a term's `logits` is the mean of the teachers' logits")
    data: DataSpec
    distill: list[TermSpec] = Field(default_factory=list)
    train: TrainSpec
    output: OutputSpec = Field(default_factory=OutputSpec)

    @model_validator(mode="after")
    def _terms_need_teacher(self) -> RecipeCore:
        if self.teacher is not None or self.teachers is not None:
            return self
        needing = [f"distill.{i} ({term.loss})" for i, term in enumerate(self.distill)
                   if _needs_teacher(term.loss, term.params) and not self.reads_peer(term.teacher)]
        if needing:
            raise ValueError(f"`distill:` terms compare the model with a teacher, but no `teacher:` is given: "
                             f"{', '.join(needing)}; add `teacher:` (one) or `teachers:` (several, by name), or "
                             "remove those terms")
        return self

    @model_validator(mode="after")
    def _one_way_to_name_teachers(self) -> RecipeCore:
        if self.teachers is None:
            return self
        if self.teacher is not None:
            raise ValueError("give either `teacher:` (one teacher) or `teachers:` (several, by name), not both")
        if not self.teachers:
            raise ValueError("`teachers:` is empty: name at least one teacher, or use `teacher:`")
        bad = [name for name in self.teachers if not name.isidentifier() or name == LOGITS_NAME]
        if bad:
            raise ValueError(f"teacher names {bad} must be identifiers other than 'logits' (they prefix taps: "
                             "NAME.stage2)")
        cached = [name for name, spec in self.teachers.items() if spec.cache is not None]
        if cached:
            raise ValueError(f"teachers {cached} ask for a teacher cache, which holds one teacher's outputs; remove "
                             f"teachers.{cached[0]}.cache")
        return self

    @model_validator(mode="after")
    def _peers_are_named(self) -> RecipeCore:
        names = ["model", *(self.peers or {})]
        if self.deploy not in names:
            raise ValueError(f"deploy: {self.deploy!r} is not a trained network; choices: {names}")
        bad = [name for name in self.peers or {} if not name.isidentifier() or name in ("model", LOGITS_NAME)]
        if bad:
            raise ValueError(f"peer names {bad} must be identifiers other than 'model' and 'logits' (they prefix "
                             "taps: NAME.logits)")
        clash = sorted(set(self.peers or {}) & set(self.teachers or {}))
        if clash:
            raise ValueError(f"names {clash} are both peers and teachers; a tap NAME.X must name one network")
        return self

    @model_validator(mode="after")
    def _member_optimizers_fit(self) -> RecipeCore:
        if self.model.optimizer is not None and self.peers is None:
            raise ValueError("model.optimizer sets one network's own optimiser settings among peers; without "
                             "`peers:` set train.optimizer instead")
        family = self.train.optimizer.name
        foreign = {"sgd": ("betas", "delta"), "adamw": ("momentum", "nesterov", "delta"),
                   "dot": ("betas", "nesterov")}[family]
        for name, spec in self.trained_members().items():
            keys = sorted(spec.optimizer.overrides()) if spec.optimizer is not None else []
            wrong = [k for k in keys if k in foreign]
            where = self.member_key(name)
            if wrong:
                raise ValueError(f"{where}.optimizer.{wrong[0]} does not apply to train.optimizer.name {family!r} "
                                 f"(one optimiser family per run); remove it or change train.optimizer.name")
            if family == "dot" and spec.optimizer is not None:
                self._check_member_dot(where, spec.optimizer)
        return self

    def _check_member_dot(self, where: str, spec: MemberOptimizerSpec) -> None:
        """A network's own dot settings, with ``train.optimizer``'s where unset, must be a valid pair."""
        from kdkit.optimizers import dot_problem

        momentum = spec.momentum if spec.momentum is not None else self.train.optimizer.momentum
        delta = spec.delta if spec.delta is not None else self.train.optimizer.delta
        assert delta is not None  # dot always has one (OptimizerSpec._dot_delta)
        problem = dot_problem(momentum, delta)
        if problem:
            raise ValueError(f"{where}.optimizer: {problem[0]}; {problem[1]}")

    @model_validator(mode="after")
    def _dot_has_both_parts(self) -> RecipeCore:
        # DOT gives the supervised and the distillation gradients their own momentum: a run without one of them
        # has nothing to separate (and fp16's gradient scaler sees only one backward pass)
        if self.train.optimizer.name != "dot":
            return self
        if not self.distill:
            raise ValueError("train.optimizer.name dot needs distillation terms (it gives their gradient its own "
                             "momentum), and `distill:` is empty: add a term, or use name: sgd")
        if not self.train.ce_weight:
            raise ValueError("train.optimizer.name dot needs the supervised loss (it gives its gradient its own "
                             "momentum), and train.ce_weight is 0: set ce_weight above 0, or use name: sgd")
        if self.train.amp == "fp16":
            raise ValueError("train.optimizer.name dot backpropagates the supervised and distillation losses "
                             "separately, which fp16's gradient scaler does not support: use train.amp: bf16 or off")
        return self

    def trained_members(self) -> dict[str, TrainedSpec]:
        """The trained networks by name: ``model`` and the peers."""
        return {"model": self.model, **(self.peers or {})}

    def reads_peer(self, teacher_taps: str | Sequence[str] | None) -> bool:
        """Whether a term's teacher side names trained networks (``model.X``, ``PEER.X``) instead of a teacher:
        deep mutual learning, where a peer's output is the target."""
        if self.peers is None or not teacher_taps:
            return False
        trained = self.trained_members()
        specs = [teacher_taps] if isinstance(teacher_taps, str) else teacher_taps
        return all(spec.split(".", 1)[0] in trained for spec in specs)

    def frozen_teachers(self) -> dict[str, TeacherSpec]:
        """The frozen teachers by name (``teacher:`` is the one named ``teacher``)."""
        if self.teachers is not None:
            return dict(self.teachers)
        return {"teacher": self.teacher} if self.teacher is not None else {}

    def teacher_key(self, name: str) -> str:
        """The recipe location of frozen teacher ``name`` (``teacher``, or ``teachers.NAME``), for overrides and
        messages."""
        return "teacher" if self.teachers is None else f"teachers.{name}"

    @staticmethod
    def member_key(name: str) -> str:
        """The recipe location of trained network ``name`` (``model``, or ``peers.NAME``)."""
        return "model" if name == "model" else f"peers.{name}"

    def weights_sources(self) -> dict[str, TeacherSpec | TrainedSpec]:
        """Every network whose weights can come from a checkpoint or a recipe, by its recipe location: the frozen
        teachers and the trained networks (whose ``checkpoint``/``recipe`` give their starting weights)."""
        teachers = {self.teacher_key(name): spec for name, spec in self.frozen_teachers().items()}
        return teachers | {self.member_key(name): spec for name, spec in self.trained_members().items()}

    @property
    def has_teacher(self) -> bool:
        """Whether the recipe distils from at least one frozen teacher."""
        return self.teacher is not None or self.teachers is not None

    @model_validator(mode="after")
    def _cache_replays_plain_views(self) -> RecipeCore:
        # A cache holds the teacher's outputs on stored crop/flip views only; anything that feeds the
        # teacher other images (a strong second view, a learned augmentation) cannot read it.
        if self.teacher is not None and self.teacher.cache is not None and self.data.views != 1:
            raise ValueError("teacher.cache stores outputs for the crop/flip views only; data.views: 2 needs "
                             "the teacher on the strong view too: remove teacher.cache or use data.views: 1")
        return self

    @model_validator(mode="after")
    def _setting_has_its_teacher(self) -> RecipeCore:
        setting = self.data.setting
        if setting is None or self.has_teacher:
            return self
        from kdkit.data.settings import SETTINGS  # lazy, like the loss registry

        if setting.name in SETTINGS and SETTINGS.get(setting.name).reads_teacher(setting.params):
            raise ValueError(f"data.setting {setting.name!r} with {setting.params} ranks the training images by a "
                             "teacher's predictions, and the recipe has no teacher: add `teacher:` (its logits on the "
                             "training images are computed before training), or choose a setting that needs none")
        return self

    @model_validator(mode="after")
    def _methods_agree(self) -> RecipeCore:
        from kdkit.method import active_methods

        problems: list[str] = []
        for method in active_methods(self):
            if method.feeds_teacher_new_images and self.teacher is not None and self.teacher.cache is not None:
                problems.append(f"teacher.cache cannot be combined with method {method.name!r}: it makes new images "
                                "the teacher has to see; remove teacher.cache")
            problems += method.check(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what is saved in run folders and checkpoints)."""
        data = self.model_dump(mode="json")
        # Keys added after the first release are left out while unset, so a recipe that does not use
        # them keeps the digest its finished runs were saved with (and those runs stay reusable).
        from kdkit.method import method_sections

        later = (*_LATER_KEYS, *(((section,), None) for section in method_sections()))
        for path, unset in later:
            *parents, key = path
            node = data
            for part in parents:
                node = node.get(part) or {}
            if key in node and node[key] == unset:
                del node[key]
        for member in (data["model"], *(data.get("peers") or {}).values()):
            if member.get("init") == "fresh":  # added later, like the keys above
                del member["init"]
            if member.get("recipe", 0) is None:
                del member["recipe"]
            if member.get("optimizer", 0) is None:
                del member["optimizer"]
            elif member.get("optimizer", {}).get("delta", 0) is None:
                del member["optimizer"]["delta"]
        for teacher in (data.get("teachers") or {}).values():
            if teacher.get("classes", 0) is None:
                del teacher["classes"]
        return data

    def digest(self) -> str:
        """Short hash of the resolved recipe (used to reuse cached teacher runs)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def run_dir(self) -> Path:
        """The run folder."""
        return Path(self.output.dir.format(name=self.name))


def _with_method_sections() -> type[RecipeCore]:
    """:class:`RecipeCore` plus one optional top-level section per registered method that declares one."""
    from pydantic import create_model

    from kdkit.method import method_sections

    fields: dict[str, Any] = {
        section: (method.spec | None, Field(None, description=f"method {method.name!r} (kdkit ls methods)"))
        for section, method in method_sections().items()}
    return create_model("Recipe", __base__=RecipeCore, __module__=__name__, **fields)


#: The recipe schema: :class:`RecipeCore` and the registered methods' sections.
Recipe = _with_method_sections()


def _needs_teacher(loss: str, params: dict[str, Any]) -> bool:
    """Unknown names count as needing one (they are reported by name); teacher-less losses (or terms whose
    parameters make them so) say False."""
    from kdkit.losses import LOSSES  # lazy: the schema module stays importable on its own

    return loss not in LOSSES or LOSSES.get(loss).teacher_needed(params)


# -- loading -------------------------------------------------------------------------------------

def fields_at(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys of the schema object at location ``loc`` under the schema ``root`` (for unknown-key errors)."""
    model: Any = root
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        annotation = field.annotation
        model = None
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            for inner in (candidate, *getattr(candidate, "__args__", ())):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    model = inner
    return list(model.model_fields) if model is not None and hasattr(model, "model_fields") else []


def schema_errors(exc: ValidationError, root: type[BaseModel], *, fix: str, whole: str) -> list[KdkitError]:
    """One :class:`KdkitError` per problem pydantic found validating a file against the schema ``root``: unknown
    keys with the valid ones, missing keys, and bad values with ``fix``. ``whole`` names the file's top level (the
    location of a problem of the file as a whole)."""
    errors = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or whole
        if err["type"] == "extra_forbidden":
            key = str(loc[-1])
            errors.append(KdkitError(f"unknown key {key!r}", choices=fields_at(root, loc[:-1]), bad=key,
                                     fix="remove it or correct its spelling", where=where))
        elif err["type"] == "missing":
            errors.append(KdkitError("required key is missing", fix=f"add `{loc[-1]}:`", where=where))
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            errors.append(KdkitError(err["msg"] + shown, where=where, fix=fix))
    return errors


def name_problems(data: dict[str, Any]) -> list[KdkitError]:
    """Unknown model (of every network: model, teacher, peers, teachers), dataset, task, loss and bridge names in
    a raw recipe.

    Used when the schema check fails, so that ``kdkit validate`` still reports every problem at once.
    """
    from kdkit.bridges import BRIDGES  # registries are heavy; import only when reporting
    from kdkit.data import DATASETS
    from kdkit.losses import LOSSES
    from kdkit.models import MODELS

    problems: list[KdkitError] = []

    def check(registry: Any, value: Any, where: str) -> None:
        if isinstance(value, str) and ":" not in value and value not in registry:
            try:
                registry.get(value, where=where)  # the registry's own message: closest names first, its fix
            except KdkitError as exc:
                problems.append(exc)

    for key in ("model", "teacher"):
        if isinstance(data.get(key), dict):
            check(MODELS, data[key].get("arch"), f"{key}.arch")
    for group in ("peers", "teachers"):
        for name, spec in (data.get(group) or {}).items() if isinstance(data.get(group), dict) else ():
            if isinstance(spec, dict):
                check(MODELS, spec.get("arch"), f"{group}.{name}.arch")
    if "task" in data:
        from kdkit.task import TASKS

        check(TASKS, data["task"], "task")
    if isinstance(data.get("data"), dict):
        check(DATASETS, data["data"].get("dataset"), "data.dataset")
        if isinstance(data["data"].get("setting"), dict):
            from kdkit.data import SETTINGS

            check(SETTINGS, data["data"]["setting"].get("name"), "data.setting.name")
    for i, term in enumerate(data.get("distill") or []):
        if isinstance(term, dict):
            check(LOSSES, term.get("loss"), f"distill.{i}.loss")
            check(BRIDGES, term.get("bridge"), f"distill.{i}.bridge")
    return problems


def set_by_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data[a][b][0][c] = value`` for ``dotted = "a.b.0.c"``, creating dicts on the way."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            index = int(part) if part.isdigit() else None
            if index is None or index >= len(node):
                raise KdkitError(f"override {dotted!r}: {'.'.join(parts[:i + 1])} is not an index of a "
                                 f"{len(node)}-item list", fix="use a 0-based list index, e.g. distill.0.weight")
            node = node[index]
        else:
            if not isinstance(node.get(part, {}), dict | list):
                raise KdkitError(f"override {dotted!r}: {'.'.join(parts[:i + 1])} is a value, not a section",
                                 fix="override the value itself")
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise KdkitError(f"override {dotted!r}: {last!r} is not an index of the list", fix="use a valid index")
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key=value`` strings; values are YAML scalars (``5``, ``0.1``, ``true``, ``off``, ``[1, 2]``)."""
    pairs = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise KdkitError(f"override {item!r} is not of the form key=value",
                             fix="write e.g. train.epochs=5 or data.root=/path/to/data")
        pairs.append((key.strip(), read_yaml(raw) if raw.strip() else None))
    return pairs


def recipe_from_dict(data: dict[str, Any], overrides: list[str] | None = None, source: str | None = None) -> Recipe:
    """Validate a plain-data recipe (after overrides), reporting every schema problem at once."""
    data = copy.deepcopy(data)
    for key, value in parse_overrides(overrides or []):
        set_by_path(data, key, value)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        partial, left_out = _without_refused_values(data, exc)
        schema = schema_errors(exc, Recipe, fix="see `kdkit validate --schema`", whole="recipe")
        seen = {e.render() for e in schema}
        named = [e for e in name_problems(data) if e.render() not in seen]  # the schema may name them already
        raise RecipeErrors(schema + named, source, partial=partial, left_out=left_out) from None


def _without_refused_values(data: dict[str, Any], exc: ValidationError) -> tuple[Recipe | None, LeftOut]:
    """The recipe with every value the schema refused left out, and what was left out.

    A refused key is deleted, so its default applies; a refused list item (a distill term with an unknown loss)
    is removed from its list. ``None`` when that cannot give a valid recipe: a required key is missing or
    refused, or a check spans several keys. The later checks (taps, shapes, files) then run on this recipe, so
    a misspelt optimiser key or loss does not hide a misspelt tap or a missing checkpoint of the same recipe.
    """
    trial, left_out = copy.deepcopy(data), LeftOut()
    for _ in range(4):  # leaving a key out can uncover a check that depended on it
        keys: list[tuple[Any, ...]] = []
        items: set[tuple[tuple[Any, ...], int]] = set()
        for err in exc.errors():
            target = None if err["type"] == "missing" else _refused_target(trial, tuple(err["loc"]))
            if target is None:
                return None, left_out
            if target[0] == "item":
                items.add(target[1])
            else:
                keys.append(target[1])
        for path in keys:
            if not any(path[:len(lst) + 1] == (*lst, i) for lst, i in items):  # else it goes with its item
                left_out.delete(trial, path)
        for lst, i in sorted(items, key=lambda item: -item[1]):  # last first: earlier indices stay valid
            left_out.remove_item(trial, lst, i)
        try:
            return Recipe.model_validate(trial), left_out
        except ValidationError as again:
            exc = again
    return None, left_out


class LeftOut:
    """What :func:`_without_refused_values` left out of a recipe: keys (dotted paths in the original recipe)
    and list items, with the map from the trimmed lists' indices back to the original ones."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self._survivors: dict[tuple[Any, ...], list[int]] = {}  # list path -> original index of each item left

    def delete(self, data: dict[str, Any], path: tuple[Any, ...]) -> None:
        """Delete the key at ``path`` (of the trimmed recipe ``data``)."""
        node: Any = data
        for part in path[:-1]:
            node = node[part]
        del node[path[-1]]
        self.keys.append(self.original(".".join(map(str, path))))

    def remove_item(self, data: dict[str, Any], lst: tuple[Any, ...], index: int) -> None:
        """Remove item ``index`` of the list at ``lst`` (of the trimmed recipe ``data``)."""
        node: Any = data
        for part in lst:
            node = node[part]
        survivors = self._survivors.setdefault(lst, list(range(len(node))))
        self.keys.append(self.original(".".join(map(str, (*lst, index)))))
        node.pop(index)
        survivors.pop(index)

    def original(self, where: str) -> str:
        """``where`` (a dotted location in the trimmed recipe) as a location in the original one."""
        parts = where.split(".")
        for lst, survivors in self._survivors.items():
            n = len(lst)
            if tuple(parts[:n]) == tuple(map(str, lst)) and len(parts) > n and parts[n].isdigit() \
                    and int(parts[n]) < len(survivors):
                parts[n] = str(survivors[int(parts[n])])
        return ".".join(parts)

    def covers(self, where: str) -> bool:
        """Whether the original location ``where`` is, or lies inside, something left out."""
        return any(where == key or where.startswith(key + ".") for key in self.keys)


def _refused_target(data: dict[str, Any], loc: tuple[Any, ...]) -> tuple[str, Any] | None:
    """What to leave out for a refusal at ``loc``: ``("item", (list_path, index))`` when ``loc`` passes through a
    list item, else ``("key", path)`` of the deepest key present (pydantic appends union-member tags such as
    ``'str'`` past it); ``None`` when ``loc`` names no key of ``data``."""
    node: Any = data
    path: list[Any] = []
    for part in loc:
        if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            return "item", (tuple(path), part)
        if not (isinstance(node, dict) and part in node):
            break
        node = node[part]
        path.append(part)
    return ("key", tuple(path)) if path else None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a YAML recipe.

    Args:
        path: A YAML file, or the name of a shipped recipe (``fashion_mnist/kd``).
        overrides: ``key=value`` strings applied before validation.

    Raises:
        KdkitError: Missing file, bad YAML, or schema problems (all of them, in one error).
    """
    file = find_recipe(path)
    try:
        data = read_yaml(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise KdkitError(f"{file} is not valid YAML: {exc}", fix="fix the YAML syntax") from None
    except UnicodeDecodeError as exc:
        raise KdkitError(f"{file} is not UTF-8 text: byte {exc.object[exc.start:exc.start + 1]!r} at offset "
                         f"{exc.start}", fix="save the recipe as UTF-8") from None
    if not isinstance(data, dict):
        raise KdkitError(f"{file} must hold a mapping of recipe keys, got {type(data).__name__}",
                         fix="start from a shipped recipe (`kdkit ls recipes`)")
    data.setdefault("name", file.stem)
    return recipe_from_dict(data, overrides, source=str(file))


def recipes_root() -> Path:
    """The folder of shipped recipes (packaged copy first, then the source checkout)."""
    packaged = Path(__file__).parent / "recipes"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "recipes"


#: Shipped YAML files whose name starts with one of these are not recipes: search spaces (``search_space*.yaml``,
#: :mod:`kdkit.grammar`) and sweep files (``sweep_*.yaml``, ``kdkit sweep RECIPE SWEEP``) name a base recipe
#: instead of being one.
SEARCH_SPACE_PREFIX = "search_space"
SWEEP_PREFIX = "sweep_"
NOT_RECIPES = (SEARCH_SPACE_PREFIX, SWEEP_PREFIX)


def shipped_recipe_files() -> list[Path]:
    """The shipped recipe files (every ``*.yaml`` under ``recipes/`` but search spaces and sweep files), sorted."""
    return sorted(p for p in recipes_root().rglob("*.yaml") if not p.stem.startswith(NOT_RECIPES))


def shipped_recipes() -> list[str]:
    """Names of shipped recipes, e.g. ``fashion_mnist/kd``."""
    root = recipes_root()
    return [str(p.relative_to(root).with_suffix("")) for p in shipped_recipe_files()]


def find_recipe(path: str | Path, relative_to: Path | None = None, where: str | None = None) -> Path:
    """Resolve a recipe path or shipped name to an existing file, or raise naming the places searched (the
    working folder, ``relative_to``, the shipped recipes) and the closest shipped names.

    Args:
        path: A path, or a shipped recipe name (``fashion_mnist/kd``).
        relative_to: The folder of the recipe that names this one (``teacher.recipe`` is relative to it).
        where: The recipe key that names it, for the message.
    """
    candidates = [Path(path)]
    if relative_to is not None:
        candidates.append(relative_to / path)
    name = str(path).removesuffix(".yaml")
    candidates.append(recipes_root() / f"{name}.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(c) for c in dict.fromkeys(candidates))
    fix = "give a path to a YAML recipe or a shipped recipe name (`kdkit ls recipes`)"
    if where is not None:
        fix = (f"point {where} at the file (a path relative to the recipe that names it, or absolute), or at a "
               "shipped recipe name; a recipe copied elsewhere needs the recipes it names copied beside it")
    raise KdkitError(f"no recipe file {str(path)!r} (searched: {searched})", choices=shipped_recipes(), bad=name,
                     fix=fix, where=where)
