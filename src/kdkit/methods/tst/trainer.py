"""TST's alternating optimisation as engine hooks.

Shao et al., IJCAI 2023. Two phases alternate:

* **Policy phase** (at the start of each epoch in ``tst.policy_epochs``, for ``policy_passes`` passes
  over the training set): teacher and student are frozen, the student in eval mode, and the policy
  ``A`` (:class:`~kdkit.methods.tst.policy.AugmentPolicy`) minimises, over batches ``(x, y)``,

      L_A = mean_i [ -log p_T(y_i | A(x)_i) - log(1 - p_S(y_i | A(x)_i)) ]

  (samples the teacher still gets right and the student gets wrong) -- on a single-label classification task;
  on any other task (detection, segmentation, multi-label), whose targets have no one class per image, the
  policy minimises the task's own supervised loss of the teacher minus the student's,

      L_A = S(T(A(x)), y) - S(S(A(x)), y)

  (kdkit's generalisation: the paper applies TST to COCO detectors and Cityscapes segmenters, but its text read
  here does not give their objective) -- with SGD (lr 0.01, momentum 0.9,
  gradient-norm clip 10, a fresh optimiser each phase, as in the official code). The student's mode
  and ``requires_grad`` flags are restored afterwards.
* **Student phase** (every training step): the batch becomes ``[A(x); x]`` with labels and indices
  repeated (``A`` applied without gradients), and the recipe's objective (CE and any distill terms,
  batch means) is applied to it, which is the paper's ``1/2 L(A(x)) + 1/2 L(x)``.

The policy is checkpointed with the run (the engine hooks' ``state``) together with the seconds spent in
policy phases; all random draws are seeded from ``(train.seed, epoch, batch, rank)``, so a resumed run
sees the same augmentation. Rank 0 appends the policy's probabilities and magnitudes to
``tst_policy.jsonl`` after every epoch (and to TensorBoard when enabled) and writes ``tst_policy.png``
and ``tst_samples.png`` after the last epoch.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distributed import DistContext, all_reduce_sum
from kdkit.errors import KdkitError
from kdkit.methods.tst.policy import AugmentPolicy, batch_generator

POLICY_ORDER_OFFSET = 1_000_000  # loader "epochs" used for the policy phases' batch order, never trained on
LOG_FILE = "tst_policy.jsonl"


def discrepancy_objective(supervised: Callable[[Tensor, Tensor], Tensor], teacher_out: Tensor, student_out: Tensor,
                          targets: Tensor) -> Tensor:
    """``S(teacher_out, y) - S(student_out, y)``: the task's supervised loss of the teacher minus the student's,
    TST's objective on tasks without one class per image (low where the teacher is right and the student wrong)."""
    return supervised(teacher_out, targets) - supervised(student_out, targets)


def augmenter_objective(teacher_logits: Tensor, student_logits: Tensor, labels: Tensor) -> Tensor:
    """``mean_i[-log p_T(y_i|x_i) - log(1 - p_S(y_i|x_i))]`` for logits ``(B, K)`` and labels ``(B,)``.

    ``log(1 - p_S(y))`` is computed as ``logsumexp_{j != y} z_j - logsumexp_j z_j`` (exact, no
    cancellation when ``p_S(y)`` is close to 1).
    """
    teacher_term = F.cross_entropy(teacher_logits, labels)
    target = F.one_hot(labels, student_logits.shape[1]).bool()
    others = torch.logsumexp(student_logits.masked_fill(target, float("-inf")), dim=1)
    log_not_y = others - torch.logsumexp(student_logits, dim=1)
    return teacher_term - log_not_y.mean()


class TstState(nn.Module):
    """What a TST run checkpoints: the policy, and the seconds and phases spent training it."""

    def __init__(self, policy: AugmentPolicy) -> None:
        super().__init__()
        self.policy = policy
        self.register_buffer("policy_seconds", torch.zeros((), dtype=torch.float64))
        self.register_buffer("phases", torch.zeros((), dtype=torch.int64))


class TstTrainer:
    """The engine hooks of TST: a batch transform, an epoch callback and the checkpointed state.

    Args:
        policy: The augmentation policy (on the training device).
        teacher: The frozen teacher (its ``model`` is differentiated w.r.t. its input; its
            ``recorder``, if any, is cleared after each call).
        seed: The run's seed (``train.seed``).
        policy_epochs: Epochs (0-based) at whose start the policy is trained.
        policy_passes: Passes over the training set per policy phase (may be fractional).
        lr: Policy SGD learning rate.
        momentum: Policy SGD momentum.
        grad_clip: Gradient-norm clip of each policy step.
        ctx: Distributed context (policy gradients are averaged over processes).
    """

    def __init__(self, policy: AugmentPolicy, *, teacher: nn.Module, seed: int, policy_epochs: list[int],
                 policy_passes: float = 30.0, lr: float = 0.01, momentum: float = 0.9, grad_clip: float = 10.0,
                 ctx: DistContext | None = None) -> None:
        if not hasattr(teacher, "model"):
            raise KdkitError("TST needs the live teacher (a FrozenTeacher), not stored outputs",
                             fix="remove teacher.cache from the recipe", where="tst")
        self.policy = policy
        self.state = TstState(policy)
        self.teacher = teacher
        self.seed = seed
        self.policy_epochs = sorted(set(policy_epochs))
        self.policy_passes = policy_passes
        self.lr, self.momentum, self.grad_clip = lr, momentum, grad_clip
        self.ctx = ctx or DistContext()
        self.last_phase: dict[str, Any] | None = None
        self._tb: Any = None

    @classmethod
    def from_plan(cls, built: Any, ctx: DistContext | None = None) -> TstTrainer:
        """Build the hooks of ``built.recipe.tst`` for a training plan (:class:`kdkit.build.Plan`)."""
        recipe, data = built.recipe, built.data
        spec = recipe.tst
        if spec is None or built.teacher is None or data is None:
            raise KdkitError("tst: needs a `tst:` section, a teacher and the data", where="tst")
        policy = AugmentPolicy(spec.ops, num_ops=spec.num_ops, temperature=spec.temperature, mean=data.mean,
                               std=data.std, channels=built.shape.in_channels, random_sign=spec.random_sign,
                               cutout_size=spec.cutout_size).to(built.device)
        return cls(policy, teacher=built.teacher, seed=recipe.train.seed, policy_epochs=spec.policy_epochs,
                   policy_passes=spec.policy_passes, lr=spec.lr, momentum=spec.momentum, grad_clip=spec.grad_clip,
                   ctx=ctx)

    # -- student phase -----------------------------------------------------------------------------

    def batch_transform(self, engine: Any, x: Tensor, y: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``([A(x); x], [y; y], [index; index])`` with the frozen policy's draw for this batch."""
        gen = batch_generator(self.seed, engine.epoch, engine.batch, stream=2 * self.ctx.rank)
        with torch.no_grad():
            augmented = self.policy(x, gen)
        both = torch.cat([augmented, x])
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            both = both.contiguous(memory_format=torch.channels_last)
        return both, y.repeat(2), index.repeat(2)

    # -- policy phase ------------------------------------------------------------------------------

    def train_policy(self, engine: Any) -> dict[str, Any]:
        """One policy phase at ``engine.epoch`` (see the module docstring). Returns its statistics."""
        started = time.perf_counter()
        student, loader, task = engine.student, engine.train_loader, engine.task
        classifying = task.task.logits_layout == "classes"  # the paper's objective needs one class per image
        flags = [p.requires_grad for p in student.parameters()]
        was_training = student.training
        student.eval()
        student.requires_grad_(False)
        self.policy.train()
        optimizer = torch.optim.SGD(self.policy.parameters(), lr=self.lr, momentum=self.momentum)
        steps = max(1, math.ceil(self.policy_passes * len(loader)))
        world = self.ctx.world_size
        # per pass: loss sum, samples the teacher gets right and the student wrong, samples, batches
        passes = math.ceil(steps / len(loader))
        sums = torch.zeros(passes, 4, device=engine.device, dtype=torch.float64)
        step = 0
        try:
            for p in range(passes):
                order = POLICY_ORDER_OFFSET + engine.epoch * 1000 + p
                for x, y, index in loader.epoch(order):
                    if step >= steps:
                        break
                    gen = batch_generator(self.seed, engine.epoch, step, stream=2 * self.ctx.rank + 1)
                    augmented = self.policy(x, gen)
                    with engine.autocast():
                        t_logits = self.teacher.model(augmented)
                        s_logits = student.model(augmented)
                    for recorder in (getattr(self.teacher, "recorder", None), student.recorder):
                        if recorder is not None:
                            recorder.pop()  # never keep tapped activations (and their graphs) alive
                    if classifying:
                        loss = augmenter_objective(t_logits.float(), s_logits.float(), y)
                    else:
                        loss = discrepancy_objective(task.loss, t_logits.float(), s_logits.float(),
                                                     task.targets(y, index, "train"))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if self.ctx.enabled:
                        for param in self.policy.parameters():
                            if param.grad is not None:
                                param.grad = all_reduce_sum(param.grad, self.ctx) / world
                    torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.grad_clip)
                    optimizer.step()
                    # samples the teacher gets right and the student wrong (none defined without one class each)
                    hit = (t_logits.argmax(1) == y) & (s_logits.argmax(1) != y) if classifying else \
                        torch.zeros((), dtype=torch.bool, device=x.device)
                    sums[p] += torch.stack([loss.detach().double() * len(y), hit.sum().double(),
                                            loss.new_tensor(float(len(y)), dtype=torch.float64),
                                            loss.new_tensor(1.0, dtype=torch.float64)])
                    step += 1
        finally:
            student.train(was_training)
            for param, flag in zip(student.parameters(), flags, strict=True):
                param.requires_grad_(flag)
        rows = all_reduce_sum(sums, self.ctx).tolist()  # one host sync per phase
        seconds = time.perf_counter() - started
        self.state.policy_seconds += seconds
        self.state.phases += 1
        per_pass = [{"loss": r[0] / max(r[2], 1.0),
                     "teacher_right_student_wrong": r[1] / max(r[2], 1.0) if classifying else None} for r in rows]
        stats = {"epoch": engine.epoch, "steps": step, "seconds": round(seconds, 3),
                 "first_pass": per_pass[0], "last_pass": per_pass[-1]}
        if engine.ctx.is_main and engine.show_progress:
            hits = "" if not classifying else (
                f", teacher right & student wrong {100 * per_pass[0]['teacher_right_student_wrong']:.1f}% -> "
                f"{100 * per_pass[-1]['teacher_right_student_wrong']:.1f}%")
            print(f"tst: policy trained at epoch {engine.epoch + 1} ({step} steps, {seconds:.1f}s): loss "
                  f"{per_pass[0]['loss']:.4f} -> {per_pass[-1]['loss']:.4f}{hits}", flush=True)
        return stats

    # -- engine events -----------------------------------------------------------------------------

    def callback(self, engine: Any, event: str) -> None:
        """Log the policy before training and after every epoch (the phase itself is an engine phase)."""
        if event == "epoch_start":
            if engine.epoch == 0 and engine.batch == 0:
                self._log(engine, {"epoch": 0})
        elif event == "epoch":
            row: dict[str, Any] = {"epoch": engine.epoch}
            self.last_phase = engine.phase_stats.get("tst", self.last_phase)
            if self.last_phase is not None and self.last_phase["epoch"] == engine.epoch - 1:
                row["phase"] = self.last_phase
            self._log(engine, row)
            if engine.epoch >= engine.epochs:
                self.finish(engine)

    def _log(self, engine: Any, row: dict[str, Any]) -> None:
        if not engine.writes:
            return
        row = {**row, **self.policy.state_summary(), "policy_seconds": round(float(self.state.policy_seconds), 3)}
        with open(Path(engine.run_dir) / LOG_FILE, "a") as f:  # append-only: a crash leaves whole lines
            f.write(json.dumps(row) + "\n")
        if engine.tensorboard:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(engine.run_dir) / "tensorboard"))
            for kind in ("probabilities", "magnitudes"):
                for name, value in row[kind].items():
                    self._tb.add_scalar(f"tst/{kind}/{name}", value, row["epoch"])
            self._tb.flush()

    def finish(self, engine: Any) -> None:
        """Write ``tst_policy.png`` and ``tst_samples.png`` into the run folder (rank 0)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if not engine.writes:
            return
        from kdkit.methods.tst.plots import plot_policy, plot_samples

        run_dir = Path(engine.run_dir)
        plot_policy(run_dir / LOG_FILE, run_dir / "tst_policy.png", self.policy_epochs)
        x, _, _ = next(iter(engine.train_loader.epoch(0)))
        plot_samples(self.policy, x[:8], run_dir / "tst_samples.png", seed=self.seed)

    def summary(self) -> dict[str, Any]:
        """Run-summary fields: seconds spent in policy phases (reported apart from the student's), the
        number of phases, and the final probabilities and magnitudes."""
        return {"tst_policy_seconds": round(float(self.state.policy_seconds), 3),
                "tst_policy_phases": int(self.state.phases), "tst_policy": self.policy.state_summary()}
