"""One training loop for teachers and students: distillation is just an objective with terms.

The engine owns the loop, evaluation, checkpoints, signals, AMP and DDP. Everything else arrives as
plain objects -- a :class:`~kdkit.distill.Student`, an optional teacher, an
:class:`~kdkit.distill.Objective`, loaders, an optimiser factory -- and as :class:`Hooks` that methods
contribute (batch transforms, callbacks, phases that train something else, modules to checkpoint,
extra parameter groups). The engine knows no recipe and no method; what may change between a
checkpoint and its resume is its caller's decision (``check_resume``).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor
from torch.profiler import record_function

from kdkit._version import __version__
from kdkit.checkpoint import (
    checkpoint_name,
    pointed,
    prune,
    read_state,
    read_weights,
    restore_best,
    save_checkpoint,
    state_mismatch,
)
from kdkit.data.loader import BatchLoader
from kdkit.distill import Objective, Student
from kdkit.distributed import DistContext, all_reduce_sum, barrier
from kdkit.errors import KdkitError, TrainingDiverged
from kdkit.metrics import MetricsLog
from kdkit.optimizers import DISTILLATION, LOSS_PARTS, PartwiseOptimizer
from kdkit.progress import ProgressBar, progress_bar
from kdkit.task import BoundTask, higher_is_better

Callback = Callable[["Engine", str], None]
#: ``transform(engine, x, y, index) -> (x, y, index)``: rewrites each training batch before the step
#: (e.g. a learned augmentation that prepends augmented copies). Transforms chain in order.
BatchTransform = Callable[["Engine", Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
#: ``make_optimizer(param_groups, steps_per_epoch) -> (optimizer, per-step lr scheduler)``.
OptimizerFactory = Callable[[list[dict[str, Any]], int], tuple[torch.optim.Optimizer, Any]]
LOG_EVERY = 10  # steps between sync points: host reads (progress bar), divergence checks, the DDP stop decision
CHANCE_EPOCHS = 3  # consecutive epochs at the task's chance level before the engine warns (all of a shorter run)
CHANCE_MARGIN = 0.05  # "at chance": at most 5 % (relative) above the task's chance level


@dataclass
class Phase:
    """Something trained apart from the main step, at the start of the epochs where ``due(engine)`` holds.

    Attributes:
        name: Key of its statistics in :attr:`Engine.phase_stats`.
        due: Whether the phase runs now (called at every epoch start, also when resuming mid-epoch:
            check ``engine.batch``).
        run: Trains it; returns statistics.
    """

    name: str
    due: Callable[[Engine], bool]
    run: Callable[[Engine], dict[str, Any]]


@dataclass
class Hooks:
    """What a method adds to a run, without subclassing the engine.

    Attributes:
        batch_transforms: Applied in order to every training batch before the step.
        callbacks: ``callback(engine, event)`` for ``"epoch_start"``, ``"step"``, ``"epoch"``.
        phases: Trained at epoch starts (before that epoch's steps).
        state: Modules saved in checkpoints (as ``extra.NAME.*``) and restored on resume, but not trained
            by the engine's optimiser (e.g. a policy with its own optimiser).
        param_groups: Extra parameter groups trained by the engine's optimiser with the student.
    """

    batch_transforms: list[BatchTransform] = field(default_factory=list)
    callbacks: list[Callback] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    state: dict[str, torch.nn.Module] = field(default_factory=dict)
    param_groups: list[dict[str, Any]] = field(default_factory=list)


class Interrupted(RuntimeError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; ``resume`` continues it."""

    def __init__(self, checkpoint: Path | None) -> None:
        self.checkpoint = checkpoint
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint written (not rank 0)"
        super().__init__(f"training interrupted; {where}")  # the front end says how to continue


@dataclass
class FitResult:
    """What a finished run reports.

    Attributes:
        run_dir: The run folder (``None`` without files).
        metric: The metric that picked the best epoch.
        best: Its best value; ``best_epoch`` the (1-based) epoch it was reached.
        last: Every evaluation metric of the last epoch, by name.
        seconds: Training wall time.
        history: One row per epoch.
        warnings: What went wrong without stopping the run (e.g. epochs at chance level), one sentence each.
    """

    run_dir: Path | None
    metric: str
    best: float
    best_epoch: int
    last: dict[str, float]
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _check_partition(params: list[torch.nn.Parameter], groups: list[dict[str, Any]] | None) -> None:
    """Refuse parameter groups that leave out or repeat one of ``params`` (a network would silently not train,
    or train twice per step)."""
    if groups is None:
        return
    grouped = [id(p) for g in groups for p in g["params"]]
    if len(grouped) != len(set(grouped)) or set(grouped) != {id(p) for p in params}:
        raise KdkitError("param_groups must hold each of the student's and objective's parameters exactly once "
                         f"({len(grouped)} grouped, {len(set(grouped))} distinct, {len(params)} expected)",
                         fix="build the groups from student.parameters() and objective.parameters()")


class Engine:
    """Train ``student`` (with an optional frozen ``teacher``) under ``objective``.

    Args:
        student: The trained model and its bridges.
        objective: CE + weighted terms.
        train_loader: Training batches (already sharded for DDP).
        eval_loader: Test batches (sharded for DDP; results are all-reduced).
        epochs: Epochs to train.
        make_optimizer: Builds the optimiser and its per-step lr scheduler from the parameter groups
            (student and objective first, then the hooks' groups) and the steps per epoch.
        param_groups: The student's and objective's parameters split into optimiser groups with their own
            settings (e.g. one per trained network); each parameter in exactly one. Default: one group.
        amp: ``"off"``, ``"bf16"`` or ``"fp16"`` autocast of the forward passes.
        compile: ``torch.compile`` the trained module for the training forward.
        run_dir: Where rank 0 writes checkpoints and metrics and every rank resumes from (``None``: no files).
        teacher: The frozen teacher (or a :class:`kdkit.cache.CachedTeacher`), or ``None`` to train from
            labels alone; called as ``teacher(x, index, epoch)``.
        device: Device of the models and batches.
        ctx: Distributed context.
        run_info: Plain data describing the run (e.g. the resolved recipe), stored in every checkpoint
            and handed to ``check_resume`` on resume.
        header: String metadata of the weights files (e.g. the architecture).
        check_resume: ``check_resume(saved_run_info, folder)`` raises when the checkpoint cannot be
            continued by this run (the caller's resume policy); ``None`` accepts any.
        keep_checkpoints: Epoch checkpoints kept besides the best one.
        tensorboard: Also log to TensorBoard.
        progress: Show a live progress bar.
        hooks: What methods add (see :class:`Hooks`); several are chained in order.
        task: The task bound to this run's data (:mod:`kdkit.task`): targets, supervised score, metrics.
        best_metric: The metric that picks the best epoch (default: the task's).
        label: Name shown in the progress bar.
        eval_every: Evaluate every this many epochs (and always after the last one); the best epoch is picked
            among the evaluated ones, and the epochs in between record no test metric.
    """

    def __init__(self, *, student: Student, objective: Objective, train_loader: BatchLoader,
                 eval_loader: BatchLoader, epochs: int, make_optimizer: OptimizerFactory,
                 param_groups: list[dict[str, Any]] | None = None, amp: str = "off",
                 compile: bool = False, run_dir: Path | None = None, teacher: torch.nn.Module | None = None,
                 device: torch.device | str = "cpu", ctx: DistContext | None = None,
                 run_info: dict[str, Any] | None = None, header: dict[str, str] | None = None,
                 check_resume: Callable[[dict[str, Any], Path], None] | None = None, keep_checkpoints: int = 1,
                 tensorboard: bool = False, progress: bool = True, hooks: Sequence[Hooks] = (),
                 task: BoundTask, best_metric: str | None = None, label: str = "train", eval_every: int = 1) -> None:
        if amp not in ("off", "bf16", "fp16"):
            raise KdkitError(f"unknown autocast mode {amp!r}", choices=["off", "bf16", "fp16"], bad=amp,
                             fix="use off, bf16 or fp16")
        self.student, self.objective, self.teacher, self.task = student, objective, teacher, task
        self.metric = best_metric or task.task.best
        if self.metric not in higher_is_better(task.metrics):  # what this run's data reports
            raise KdkitError(f"task {task.task.name!r} has no metric {self.metric!r} to pick the best epoch by",
                             choices=higher_is_better(task.metrics),
                             bad=self.metric, fix="pick the best epoch by one of the task's metrics")
        self.chance = task.chance().get(self.metric)  # that metric's value for a model that learned nothing
        self.train_loader, self.eval_loader = train_loader, eval_loader
        self.epochs, self.amp = epochs, amp
        if eval_every < 1:
            raise KdkitError(f"eval_every must be at least 1 epoch, got {eval_every}", bad=eval_every,
                             fix="use train.eval_every=1 to evaluate after every epoch")
        self.eval_every = eval_every
        self.device = torch.device(device)
        # Denormal floats make CPU arithmetic ~25x slower, and distillation produces them (see
        # kdkit.cli.main, which flushes them before torch starts its worker threads; here only this
        # thread can still be switched).
        torch.set_flush_denormal(True)
        self.ctx = ctx or DistContext()
        self.run_dir = run_dir
        self.writes = run_dir is not None and self.ctx.is_main  # only rank 0 writes files
        self.run_info = run_info or {}
        self.header = dict(header or {})
        self.check_resume = check_resume
        self.keep = keep_checkpoints
        self.tensorboard = tensorboard
        self.show_progress = progress and self.ctx.is_main
        self.batch_transforms = [t for h in hooks for t in h.batch_transforms]
        self.callbacks = [c for h in hooks for c in h.callbacks]
        self.phases = [p for h in hooks for p in h.phases]
        self.state_modules: dict[str, torch.nn.Module] = {}
        for h in hooks:
            for name, module in h.state.items():
                if name in self.state_modules:
                    raise KdkitError(f"two methods checkpoint state under the same name {name!r}",
                                     fix="give each method's state its own name")
                self.state_modules[name] = module
        self.phase_stats: dict[str, dict[str, Any]] = {}
        self.label = label
        self.keys = objective_keys(objective)
        self.steps_per_epoch = len(train_loader)
        if self.steps_per_epoch == 0:
            raise KdkitError(f"the training loader yields no batch ({train_loader.num_samples} samples for "
                             f"{self.ctx.world_size} process(es))", fix="use a smaller batch or more data")
        own = [*student.parameters(), *objective.parameters()]
        groups = [*(param_groups or [{"params": own}]), *(g for h in hooks for g in h.param_groups)]
        _check_partition(own, param_groups)
        self.optimizer, self.scheduler = make_optimizer(groups, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None
        self.partwise = self._partwise_optimizer()
        self.model: torch.nn.Module = student
        if self.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(student, device_ids=ids)
        if compile:
            # Compiled lazily on the first step; evaluation runs Student.predict uncompiled (shapes differ).
            self.model = torch.compile(self.model)
        # progress state
        self.epoch = 0
        self.batch = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"metric": self.metric, "value": -math.inf, "epoch": -1}
        self._partial: dict[str, Any] = {}
        self._stop_signal: int | None = None
        self._started = time.perf_counter()
        self.last_losses: dict[str, float] = {}

    # -- public -----------------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> FitResult:
        """Train to ``train.epochs``; with ``resume`` continue from the run folder's latest checkpoint.

        Raises:
            TrainingDiverged: A loss term, or a parameter, buffer or optimiser state, became NaN/inf (the last
                good checkpoint, every tensor of which is finite, is kept).
            Interrupted: SIGINT/SIGTERM arrived; a checkpoint was saved first.
        """
        if resume:
            self._restore()
        log = MetricsLog(self.run_dir, self.history, self.tensorboard) if self.writes else None
        # Wall time spent before a resume: the interrupted epoch's part, else the last finished epoch's total.
        spent = self._partial.get("seconds", self.history[-1]["seconds"] if self.history else 0.0)
        started = self._started = time.perf_counter() - float(spent)
        with self._signals(), self._progress() as bar:
            while self.epoch < self.epochs:
                epoch_start = time.perf_counter()
                self._emit("epoch_start")
                for phase in self.phases:
                    if phase.due(self):
                        self.phase_stats[phase.name] = phase.run(self)
                train_stats = self._train_epoch(bar)
                eval_stats = self.evaluate() if self.evaluates(self.epoch + 1) else {}
                row = {"epoch": self.epoch + 1, "step": self.global_step, **train_stats, **eval_stats,
                       "lr": self.optimizer.param_groups[0]["lr"],
                       "epoch_seconds": round(time.perf_counter() - epoch_start, 3),
                       "seconds": round(time.perf_counter() - started, 3)}
                is_best = bool(eval_stats) and eval_stats[f"test_{self.metric}"] > self.best["value"]
                if is_best:
                    self.best = {"metric": self.metric, "value": eval_stats[f"test_{self.metric}"],
                                 "epoch": self.epoch + 1}
                if self.best["epoch"] > 0:  # nothing evaluated yet: no best to record
                    row[f"best_{self.metric}"] = self.best["value"]
                if self.chance is not None and eval_stats:
                    row[f"chance_{self.metric}"] = self.chance
                self.history.append(row)
                self.epoch, self.batch, self._partial = self.epoch + 1, 0, {}
                if log is not None:
                    log.append(row)
                self._save(is_best=is_best)
                self._announce(row, bar)
                self._warn_at_chance()
                self._emit("epoch")
        if log is not None:
            log.close()
        last_row = self.history[-1] if self.history else {}
        last = {name: last_row.get(f"test_{name}", math.nan) for name in self.task.metrics}
        warnings = [self._chance_warning(first, last_epoch) for first, last_epoch in self._chance_streaks()]
        return FitResult(self.run_dir, self.metric, self.best["value"], self.best["epoch"], last,
                         time.perf_counter() - started, list(self.history), warnings)

    def evaluates(self, epoch: int) -> bool:
        """Whether the 1-based ``epoch`` ends with an evaluation (every ``eval_every``-th, and the last)."""
        return epoch % self.eval_every == 0 or epoch == self.epochs

    @torch.no_grad()
    def evaluate(self, loader: BatchLoader | None = None,
                 predict: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """The task's metrics (``test_<name>``) of the deployed model (:meth:`Student.predict`), or of ``predict``
        (e.g. one member of a group of trained networks), on ``loader`` (default: the eval loader)."""
        loader = loader or self.eval_loader
        net = self.student
        was_training = net.training
        net.eval()
        evaluator = self.task.evaluator(self.ctx)
        with self.autocast():
            for x, y, index in loader.epoch(0):
                evaluator.update((predict or net.predict)(x).float(), self.task.targets(y, index, "test"))
        if self.student.recorder is not None:
            self.student.recorder.pop()  # do not keep eval activations alive
        net.train(was_training)
        return {f"test_{name}": value for name, value in evaluator.compute().items()}

    # -- the loop ---------------------------------------------------------------------------------

    def _train_epoch(self, bar: Any) -> dict[str, float]:
        self.model.train()
        # A resumed epoch's sums so far are every process's (see _interrupt): rank 0 carries them, the others
        # start from zero, so the epoch's all-reduce below counts each step once.
        partial = self._partial if self.ctx.is_main else {}
        sums = partial.get("sums")
        # running sums of each component, then the training score, then the samples it scored
        sums = sums.to(self.device) if sums is not None else torch.zeros(len(self.keys) + 2, device=self.device)
        count = int(partial.get("count", 0))
        # Step at which each component first went non-finite, tracked on the device (no host sync),
        # so the culprit is named even when NaN has spread to every term by the next check.
        first_bad = torch.full((len(self.keys),), math.inf, device=self.device)
        checked = self.batch  # every checkpointed tensor was finite after this many steps of the epoch
        # targets tied to pixels (masks, boxes) follow each batch's crop and flip (the loader's views)
        follow = self.task.task.pixel_targets
        for x, y, index, view in self.train_loader.epoch_views(self.epoch, start=self.batch):
            comps, logits, targets = self.train_step(x, y, index, view if follow else None)
            score, scored = self.task.train_score(logits, targets)
            values = torch.stack([comps[k].detach().float() for k in self.keys])
            first_bad = torch.where(torch.isfinite(values) | torch.isfinite(first_bad), first_bad,
                                    float(self.batch))
            sums += torch.cat([values, torch.stack([score.float(), scored.float()])])
            count += 1
            self.batch += 1
            self.global_step += 1
            self._emit("step")
            if not self._sync_due():
                continue
            stop = self._sync(first_bad, checked)
            checked = self.batch
            self._update_bar(bar, sums, count)
            if stop:
                self._interrupt(sums, count)
        totals = all_reduce_sum(torch.cat([sums, sums.new_tensor([count])]), self.ctx)  # every rank's batches
        steps = max(float(totals[-1]), 1.0)
        stats = {f"train_{k}": v / steps for k, v in zip(self.keys, totals[:-3].tolist(), strict=True)}
        stats[f"train_{self.task.task.train_metric}"] = 100.0 * float(totals[-3]) / max(float(totals[-2]), 1.0)
        return stats

    def train_step(self, x: Tensor, y: Tensor, index: Tensor,
                   view: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """The batch transforms, then :meth:`step`. Returns the components, the logits and the targets the
        step used (a transform may change the batch). ``view``: the batch's crop/flip views, for targets tied
        to pixels (:meth:`kdkit.data.loader.BatchLoader.epoch_views`)."""
        for transform in self.batch_transforms:
            x, y, index = transform(self, x, y, index)
        if view is not None and len(view) != len(x):
            # a transform that adds or drops images leaves no view for them: the targets could not follow
            raise RuntimeError(f"a batch transform changed the batch from {len(view)} to {len(x)} images, so the "
                               "pixel targets cannot follow the crop/flip views")
        return self.step(x, y, index, view)

    def step(self, x: Tensor, y: Tensor, index: Tensor,
             view: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """One optimisation step on a (transformed) batch: the task's targets (moved by ``view`` when given),
        teacher taps, student + bridges, objective, backward, optimiser and lr schedule. Returns the loss
        components, the student's logits and the targets."""
        epoch_pos = self.epoch + self.batch / self.steps_per_epoch
        y = self.task.targets(y, index, "train")
        if view is not None:
            y = self.task.follow(y, view)
        with self.autocast():
            with step_part("kdkit.teacher"):
                # index/epoch let a cached teacher find the stored outputs of exactly these views
                reads = self.teacher is not None and self.objective.reads_teacher
                teacher_out = self.teacher(x, index, self.epoch) if reads else {}
            with step_part("kdkit.student"):
                logits, per_term = self.model(x)
            with step_part("kdkit.objective"):
                comps = self.objective(logits, y, per_term, teacher_out, epoch_pos, index)
        self.optimizer.zero_grad(set_to_none=True)
        with step_part("kdkit.backward"):
            if self.partwise is not None:
                self._backward_by_part(self.partwise, comps, epoch_pos)
            else:
                loss = self.scaler.scale(comps["loss"]) if self.scaler is not None else comps["loss"]
                loss.backward()
        with step_part("kdkit.optimizer"):
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
        return comps, logits, y

    def _backward_by_part(self, optimizer: PartwiseOptimizer, comps: dict[str, Tensor], epoch: float) -> None:
        """Backpropagate each part of the loss the optimiser asks for, in its order, from this step's one forward
        pass (the graph is kept until the last part); each part but the last is handed over with ``take_part``,
        the last stays in ``.grad`` for ``step``. A part that is a constant (every weight of it 0 at this epoch)
        gives no gradient."""
        parts = self.objective.parts(comps, epoch)
        *first, last = optimizer.loss_parts
        for name in first:
            if parts[name].requires_grad:
                parts[name].backward(retain_graph=True)
            optimizer.take_part(name)
        if parts[last].requires_grad:
            parts[last].backward()

    def _partwise_optimizer(self) -> PartwiseOptimizer | None:
        """The optimiser, when it takes the loss's gradient by part (:class:`~kdkit.optimizers.PartwiseOptimizer`)
        and this run can give it that; ``None`` for an ordinary optimiser.

        Raises:
            KdkitError: It asks for a part the objective does not have, or the run has what cannot backpropagate by
                part: fp16's gradient scaler (one scale and unscale per step) or DDP (one gradient all-reduce per
                forward).
        """
        optimizer = self.optimizer
        if not isinstance(optimizer, PartwiseOptimizer):
            return None
        name = type(optimizer).__name__
        unknown = [p for p in optimizer.loss_parts if p not in LOSS_PARTS]
        if unknown:
            raise KdkitError(f"optimiser {name} asks for loss part {unknown[0]!r}, which no objective has",
                             bad=unknown[0], choices=LOSS_PARTS, fix="ask for the parts the objective splits into")
        missing = [p for p in optimizer.loss_parts if p not in self.objective.contributes()]
        if missing:
            fix = ("add a distillation term" if missing[0] == DISTILLATION else "give the supervised loss a weight "
                   "above 0") + " or choose an optimiser that takes the total loss (e.g. sgd)"
            raise KdkitError(f"optimiser {name} backpropagates the loss's {' and '.join(optimizer.loss_parts)} parts "
                             f"separately, and this objective has no {missing[0]} part", fix=fix)
        if self.scaler is not None:
            raise KdkitError(f"optimiser {name} backpropagates the loss by part, which fp16's gradient scaler does "
                             "not support", bad="fp16", choices=["bf16", "off"], fix="use amp bf16 or off")
        if self.ctx.enabled:
            raise KdkitError(f"optimiser {name} backpropagates the loss by part, which DistributedDataParallel "
                             "(one gradient all-reduce per forward) does not support",
                             fix="train it in one process, or choose an optimiser that takes the total loss")
        return optimizer

    # -- sync points: divergence and stop --------------------------------------------------------

    def _sync_due(self) -> bool:
        """Whether this step is a sync point: every ``LOG_EVERY`` steps, the epoch's last step and, in a single
        process, the step a stop signal arrived. Under DDP a signal waits for the next regular sync point, which
        every process reaches at the same step: a signal reaches the processes at different moments, and they
        must stop at one step to save one consistent checkpoint."""
        if self._stop_signal is not None and not self.ctx.enabled:
            return True
        return self.batch % LOG_EVERY == 0 or self.batch == self.steps_per_epoch

    def _sync(self, first_bad: Tensor, checked: int) -> bool:
        """At a sync point: raise :class:`TrainingDiverged` when any process diverged since the last one, else
        return whether any process was asked to stop.

        Checks the loss terms (tracked every step in ``first_bad``) and every tensor a checkpoint holds (a
        BatchNorm buffer or Adam's second moment can overflow while every loss stays finite), so each
        checkpoint, saved only right after a sync point, is finite. Under DDP one all-reduce of the three flags
        makes every process raise or stop at the same step: one that left alone would leave the others
        waiting in their next gradient all-reduce.

        Args:
            first_bad: The step at which each loss component first went non-finite (``inf``: never).
            checked: The epoch's step after which the tensors were last found finite.
        """
        device = first_bad.device
        local = torch.stack([torch.isfinite(first_bad).any(), ~torch.isfinite(self._state_norm().to(device)),
                             torch.tensor(self._stop_signal is not None, device=device)]).float()
        loss_bad, state_bad, stop = all_reduce_sum(local, self.ctx).tolist()
        if loss_bad:
            raise self._loss_diverged(first_bad)
        if state_bad:
            raise self._state_diverged(checked)
        return stop > 0

    def _state_tensors(self) -> dict[str, Tensor]:
        """Every floating-point tensor a checkpoint holds, by name: the weights (:meth:`_weights`) and the
        optimiser's state (``optimizer.<parameter>.<key>``, e.g. a momentum buffer)."""
        tensors = {k: v for k, v in self._weights().items() if v.is_floating_point()}
        modules = {"": self.student, "objective.": self.objective,
                   **{f"extra.{name}.": module for name, module in self.state_modules.items()}}
        names = {id(p): prefix + k for prefix, module in modules.items() for k, p in module.named_parameters()}
        for g, group in enumerate(self.optimizer.param_groups):
            for i, param in enumerate(group["params"]):
                owner = names.get(id(param), f"group{g}[{i}]")
                state = self.optimizer.state.get(param, {})  # .get: indexing the defaultdict would add entries
                tensors.update({f"optimizer.{owner}.{key}": value for key, value in state.items()
                                if isinstance(value, Tensor) and value.is_floating_point()})
        return tensors

    def _state_norm(self) -> Tensor:
        """The largest magnitude in the checkpointed tensors (one fused reduction per device and dtype, no host
        sync): finite exactly when all of them are, since NaN propagates through the max."""
        return torch.nn.utils.get_total_norm(list(self._state_tensors().values()), norm_type=math.inf)

    def _loss_diverged(self, first_bad: Tensor) -> TrainingDiverged:
        steps = first_bad.tolist()
        fix = "lower the learning rate or that term's weight, or check its inputs (e.g. AMP overflow)"
        if all(math.isinf(s) for s in steps):
            return self._diverged(f"a loss term became NaN or inf on another process in epoch {self.epoch + 1}, by "
                                  f"step {self.batch} of {self.steps_per_epoch}", fix)
        first = min(steps)
        bad = [k for k, s in zip(self.keys, steps, strict=True) if s == first]
        culprit = next((k for k in bad if k != "loss"), "loss")
        later = [k for k, s in zip(self.keys, steps, strict=True) if first < s < math.inf]
        return self._diverged(f"loss term {culprit!r} became NaN or inf in epoch {self.epoch + 1} at step "
                              f"{int(first) + 1} of {self.steps_per_epoch}"
                              + (f" (then also {later})" if later else ""), fix)

    def _state_diverged(self, checked: int) -> TrainingDiverged:
        bad = [name for name, tensor in self._state_tensors().items() if not bool(torch.isfinite(tensor).all())]
        if not bad:
            what = "a parameter, buffer or optimiser state on another process"
        elif len(bad) == 1:
            what = repr(bad[0])
        else:
            what = f"{bad[0]!r} (and {len(bad) - 1} more: {', '.join(bad[1:4])}{', ...' if len(bad) > 4 else ''})"
        steps = f"at step {self.batch}" if self.batch - checked == 1 else f"in steps {checked + 1}-{self.batch}"
        return self._diverged(f"{what} became NaN or inf in epoch {self.epoch + 1}, {steps} of "
                              f"{self.steps_per_epoch}, while every loss term stayed finite",
                              "lower the learning rate or warm it up over more steps")

    def _diverged(self, message: str, fix: str) -> TrainingDiverged:
        latest = pointed(self.run_dir / "checkpoints", "latest") if self.run_dir else None
        return TrainingDiverged(f"training diverged: {message}", checkpoint=latest, fix=fix)

    def _interrupt(self, sums: Tensor, count: int) -> NoReturn:
        """Save a mid-epoch checkpoint, then raise :class:`Interrupted`.

        The epoch's sums so far are all-reduced first, so the checkpoint (written by rank 0) holds every
        process's share rather than rank 0's alone; every process stops at this same sync point, so the
        all-reduce is matched. On resume rank 0 carries them (see :meth:`_train_epoch`).
        """
        totals = all_reduce_sum(torch.cat([sums, sums.new_tensor([count])]), self.ctx)
        self._partial = {"sums": totals[:-1].cpu(), "count": int(totals[-1]),
                         "seconds": time.perf_counter() - self._started}
        folder = self._save(is_best=False, mid_epoch=True)
        barrier(self.ctx)  # no process exits (and makes torchrun stop the others) before the checkpoint is written
        raise Interrupted(folder)

    # -- chance level -----------------------------------------------------------------------------

    def _chance_streaks(self) -> list[tuple[int, int]]:
        """The ``(first, last)`` epochs of each run of consecutive epochs whose best-picking metric sat at the
        task's chance level, long enough to warn about (``CHANCE_EPOCHS``, or the whole of a shorter run).
        Read from the history, so a resumed run still reports what happened before its interruption."""
        needed = self._chance_needed()
        streaks: list[tuple[int, int]] = []
        first, length = None, 0
        for row in self.history:
            if f"test_{self.metric}" not in row:
                continue  # not evaluated (train.eval_every): neither breaks nor extends a streak
            chance = row.get(f"chance_{self.metric}")
            if chance is None or row[f"test_{self.metric}"] > chance * (1 + CHANCE_MARGIN):
                first, length = None, 0
                continue
            first, length = (row["epoch"] if first is None else first), length + 1
            if length < needed:
                continue
            if streaks and streaks[-1][0] == first:
                streaks[-1] = (first, row["epoch"])  # the same streak, one epoch longer
            else:
                streaks.append((first, row["epoch"]))
        return streaks

    def _chance_needed(self) -> int:
        """Consecutive evaluations at chance level that make a streak: ``CHANCE_EPOCHS``, or all of a run that
        evaluates fewer times."""
        evaluations = sum(self.evaluates(epoch) for epoch in range(1, self.epochs + 1))
        return min(CHANCE_EPOCHS, evaluations)

    def _evaluations(self, first: int, last: int) -> int:
        """Evaluated epochs among epochs ``first``..``last`` (1-based, inclusive) of the history."""
        return sum(f"test_{self.metric}" in row for row in self.history[first - 1:last])

    def _chance_warning(self, first: int, last: int) -> str:
        chance = self.history[last - 1][f"chance_{self.metric}"]
        evaluated = self._evaluations(first, last)
        return (f"test {self.metric} sat at chance level ({chance:.4g}: what a model that learned nothing scores "
                f"on this task) in {evaluated} consecutive evaluations (epochs {first}-{last}): check the learning "
                "rate, "
                "that no loss term overwhelms the supervised one early (warm it up), and the labels")

    def _warn_at_chance(self) -> None:
        """Print (rank 0, stderr) the chance-level warning once, at the epoch a streak becomes long enough."""
        streaks = self._chance_streaks()
        if not (self.ctx.is_main and streaks and streaks[-1][1] == self.epoch):
            return
        first, last = streaks[-1]
        if self._evaluations(first, last) == self._chance_needed():  # the streak has just become long enough
            print(f"warning: {self._chance_warning(first, last)}", file=sys.stderr)

    # -- checkpoints ------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "batch": self.batch, "global_step": self.global_step,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "history": self.history, "best": self.best, "partial": self._partial,
            "phase_stats": self.phase_stats,  # plain data: a resumed run's summary keeps what its phases reported
            "run_info": self.run_info, "kdkit_version": __version__,
        }

    def _weights(self) -> dict[str, Tensor]:
        weights = {k: v for k, v in self.student.state_dict().items()}
        weights.update({f"objective.{k}": v for k, v in self.objective.state_dict().items()})
        for name, module in self.state_modules.items():
            weights.update({f"extra.{name}.{k}": v for k, v in module.state_dict().items()})
        return weights

    def _save(self, is_best: bool, mid_epoch: bool = False) -> Path | None:
        # Called only right after a sync point (the epoch's last step, or the one every process stops at), whose
        # check found every tensor finite: a checkpoint never holds NaN/inf.
        barrier(self.ctx)
        if not self.writes:
            return None
        root = self.run_dir / "checkpoints"
        name = checkpoint_name(self.epoch, self.batch if mid_epoch else None)
        metadata = {**self.header, "epoch": str(self.epoch), "kdkit_version": __version__}
        folder = save_checkpoint(root, name, self._weights(), self._state(), metadata,
                                 best=dict(self.best) if is_best else None)
        prune(root, self.keep)
        return folder

    def _restore(self) -> None:
        folder = pointed(self.run_dir / "checkpoints", "latest") if self.run_dir else None
        if folder is None:
            if self.ctx.is_main:
                print("resume: no checkpoint in the run folder yet; starting from scratch")
            return
        state = read_state(folder)
        if self.check_resume is not None:  # before any weight is touched: a refused resume changes nothing
            self.check_resume(state.get("run_info", {}), folder)
        tensors, _ = read_weights(folder / "model.safetensors")
        parts = [(self.student, {k: v for k, v in tensors.items() if not k.startswith(("objective.", "extra."))}),
                 (self.objective, {k[len("objective."):]: v for k, v in tensors.items()
                                   if k.startswith("objective.")}),
                 *((module, {k[len(f"extra.{name}."):]: v for k, v in tensors.items()
                             if k.startswith(f"extra.{name}.")}) for name, module in self.state_modules.items())]
        # every part is checked before any is loaded: a checkpoint that does not fit changes nothing
        problems = [problem for module, part in parts if (problem := state_mismatch(module, part))]
        if problems:
            raise KdkitError(f"cannot resume from {folder}: its weights do not fit this run's networks "
                             f"({'; '.join(problems)})", fix="resume with the recipe and code that wrote it, or "
                             "start over with --overwrite")
        for module, part in parts:
            module.load_state_dict(part)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.epoch, self.batch, self.global_step = state["epoch"], state["batch"], state["global_step"]
        self.history, self.best, self._partial = list(state["history"]), dict(state["best"]), dict(state["partial"])
        self.phase_stats = dict(state.get("phase_stats", {}))
        if self.writes:  # a crash between the pointer writes may have left best.json off this record
            restore_best(folder.parent, self.best)
        if self.ctx.is_main:
            print(f"resume: continuing from {folder} (epoch {self.epoch + 1}, batch {self.batch})")

    # -- plumbing ---------------------------------------------------------------------------------

    def _emit(self, event: str) -> None:
        for callback in self.callbacks:
            callback(self, event)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of this run's forward passes (a no-op without AMP)."""
        if self.amp == "off":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        def request_stop(signum: int, _frame: Any) -> None:
            self._stop_signal = signum

        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread: leave signals alone
            previous = {}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextlib.contextmanager
    def _progress(self) -> Iterator[ProgressBar | None]:
        if not self.show_progress:
            yield None
            return
        with progress_bar(self.label, self.epochs * self.steps_per_epoch, self.global_step) as bar:
            yield bar

    def _update_bar(self, bar: ProgressBar | None, sums: Tensor, count: int) -> None:
        values = sums.tolist()
        means = [v / max(count, 1) for v in values[:-2]]
        self.last_losses = dict(zip(self.keys, means, strict=True))
        if bar is None:
            return
        score = 100.0 * values[-2] / max(values[-1], 1.0)
        best = f" best {self.metric} {self.best['value']:.2f}" if self.best["epoch"] > 0 else ""
        status = f"ep {self.epoch + 1}/{self.epochs} loss {means[0]:.4f} train {self.task.task.train_metric} " \
                 f"{score:.1f}{best}"
        bar.update(self.global_step, status)

    def _announce(self, row: dict[str, Any], bar: ProgressBar | None) -> None:
        if not self.ctx.is_main or not self.show_progress:
            return
        terms = " ".join(f"{k} {row[f'train_{k}']:.4f}" for k in self.keys if k != "loss")
        test = ("test " + " ".join(f"{k} {row[f'test_{k}']:.4g}" for k in self.task.metrics)
                + f"  best {self.metric} {row[f'best_{self.metric}']:.2f}") \
            if f"test_{self.metric}" in row else "(not evaluated: train.eval_every)"
        line = (f"{self.label} epoch {row['epoch']}/{self.epochs}  loss {row['train_loss']:.4f} ({terms})  "
                f"train {self.task.task.train_metric} {row[f'train_{self.task.task.train_metric}']:.2f}  {test}"
                f"  {row['epoch_seconds']:.1f}s")
        if bar is not None:
            bar.print(line)


def step_part(name: str) -> contextlib.AbstractContextManager[Any]:
    """A named range of a training step (``kdkit.teacher``, ``kdkit.student``, ...) in a torch profile, so a
    profile reads by part (``kdkit bench speed`` writes one). Opened only under a profiler: a range costs ~20 us
    per step part, the check ~0.5 us."""
    return record_function(name) if torch._C._autograd._profiler_enabled() else contextlib.nullcontext()


def objective_keys(objective: Objective) -> list[str]:
    """Names of the components an objective returns, in logging order (``loss`` first)."""
    keys = ["loss"]
    if objective.ce_weight:
        keys.append(objective.supervised_name)
    return keys + [t.name for t in objective.terms]
