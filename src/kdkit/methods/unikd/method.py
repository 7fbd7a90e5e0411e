"""UniKD as a registered method: its recipe section (the AKE's pretraining), the recipes it refuses, and the phase
that pretrains the AKE on the frozen teacher before the student's first step.

The phase is due while the ``unikd`` term's ``pretrained`` flag (a buffer of the loss, so in every checkpoint) is
unset: it runs once, before the first epoch's steps, and a run resumed after it finds the flag and the pretrained AKE
in its checkpoint. Its batches are the training loader's epochs ``0 .. pretrain_epochs - 1`` (a pure function of the
seed), and nothing in it draws from the global random state, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import html
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from kdkit.distill import as_specs
from kdkit.distributed import all_reduce_sum
from kdkit.engine import Engine, Hooks, Phase
from kdkit.errors import KdkitError
from kdkit.method import Method, MethodRun, register_method
from kdkit.methods.unikd.loss import UniKDLoss
from kdkit.methods.unikd.pretrain import Targets, pretrain, teacher_detections
from kdkit.models.detector import DenseSpec
from kdkit.schema import Strict
from kdkit.taps import LOGITS

LOSS = "unikd"
TASK = "detection"
PHASE = "unikd_pretrain"


class UniKDSpec(Strict):
    """The recipe section ``unikd:``: how the AKE is pretrained on the teacher."""

    pretrain_epochs: int = Field(4, ge=1, description="epochs over the training set that pretrain the AKE on the "
                                                      "teacher's features and detections, before the student trains")
    pretrain_lr: float = Field(2e-3, gt=0, description="peak AdamW learning rate of the pretraining (cosine to 0)")
    score_threshold: float = Field(0.45, gt=0, lt=1, description="teacher detections scoring above this are the "
                                                                "AKE's pretraining targets")


def unikd_terms(recipe: Any) -> list[int]:
    """Indices of the recipe's ``unikd`` terms."""
    return [i for i, t in enumerate(recipe.distill) if t.loss == LOSS]


def teacher_spec(built: Any) -> DenseSpec:
    """The frozen teacher's dense layout, or a :class:`KdkitError` when it is no dense detector."""
    spec = getattr(getattr(built.teacher, "model", None), "dense_spec", None)
    if not isinstance(spec, DenseSpec):
        raise KdkitError("unikd pretrains its AKE on the teacher's detections: the teacher must be a dense detector "
                         "(a model with a `dense_spec`)", choices=["det_teacher", "tv_fcos"],
                         fix="set teacher.arch to a detector", where="teacher.arch")
    return spec


def class_head(dim: int, classes: int) -> nn.Linear:
    """The pretraining's class head on the content embeddings, biased to probability 0.01 (focal-loss prior)."""
    head = nn.Linear(dim, classes)
    nn.init.constant_(head.bias, -torch.log(torch.tensor(99.0)).item())
    return head


class UniKDRun(MethodRun):
    """The pretraining phase and its statistics in ``summary.json``.

    Args:
        loss: The run's ``unikd`` loss (its AKE and ``pretrained`` flag).
        head: The pretraining's class head (checkpointed as method state).
        spec: The teacher's dense layout (to decode its detections).
        teacher_taps: The teacher tap specs the term reads (the AKE's input levels).
        section: The recipe's ``unikd:`` section.
        ctx: Distributed context (gradients are averaged over the processes).
    """

    def __init__(self, loss: UniKDLoss, head: nn.Module, spec: DenseSpec, teacher_taps: tuple[str, ...],
                 section: UniKDSpec, ctx: Any) -> None:
        self.loss, self.head, self.spec, self.taps = loss, head, spec, teacher_taps
        self.section, self.ctx = section, ctx
        super().__init__(Hooks(phases=[Phase(PHASE, self.due, self.run)], state={"unikd_head": head}))

    def due(self, engine: Engine) -> bool:
        return not bool(self.loss.pretrained)

    def batches(self, engine: Engine) -> Iterator[tuple[list[Tensor], Targets]]:
        """The teacher's levels and detections of every batch of the pretraining epochs."""
        for epoch in range(self.section.pretrain_epochs):
            for x, _, index in engine.train_loader.epoch(epoch):
                with torch.no_grad(), engine.autocast():
                    out = engine.teacher(x, index, epoch)
                yield ([out[tap].float() for tap in self.taps],
                       teacher_detections(self.spec, out[LOGITS], x.shape[-1], self.section.score_threshold,
                                          self.loss.queries))

    def reduce(self, grads: list[Tensor]) -> None:
        """Average ``grads`` over the processes, so every rank's AKE stays the same."""
        for g in grads:
            g.copy_(all_reduce_sum(g, self.ctx) / self.ctx.world_size)

    def run(self, engine: Engine) -> dict[str, Any]:
        assert self.loss.ake is not None
        stats = pretrain(self.loss.ake, self.head, lambda: self.batches(engine),
                         self.section.pretrain_epochs * engine.steps_per_epoch, self.section.pretrain_lr, self.reduce)
        self.loss.pretrained.fill_(True)
        return stats

    def summary(self, engine: Engine) -> dict[str, Any]:
        # the engine checkpoints phase statistics, so a run resumed after the pretraining still reports them
        return {"unikd": {"pretrain": engine.phase_stats.get(PHASE)}}


@register_method
class UniKDMethod(Method):
    """UniKD (ICCV 2023): a query decoder (AKE) pretrained on the teacher, then matched on the student."""

    name = "unikd"
    section = "unikd"
    spec = UniKDSpec

    def active(self, recipe: Any) -> bool:
        return recipe.unikd is not None or bool(unikd_terms(recipe))

    def check(self, recipe: Any) -> list[str]:
        problems = []
        terms = unikd_terms(recipe)
        if recipe.task != TASK:
            problems.append(f"UniKD's AKE learns the teacher's detections: task is {recipe.task!r} (choices: {TASK}); "
                            f"set task: {TASK}")
        if recipe.teacher is None:
            problems.append("UniKD distils one frozen teacher detector: `teacher:` is None; add a teacher")
        if not terms:
            problems.append(f"the `unikd:` section pretrains the AKE of a `{LOSS}` term, and the recipe has none; add "
                            f"`distill: [{{loss: {LOSS}, student: [p2, p3, p4], teacher: [p2, p3, p4]}}]`")
        if len(terms) > 1:
            problems.append(f"UniKD has one AKE: distill.{terms[1]} is a second `{LOSS}` term; keep one")
        if terms and recipe.unikd is None:
            problems.append(f"distill.{terms[0]} is a `{LOSS}` term, whose AKE must be pretrained on the teacher "
                            "first: add the section `unikd: {}` (its defaults: pretrain_epochs 4)")
        if recipe.peers is not None:
            problems.append("UniKD trains one student: remove `peers:`")
        return problems

    def attach(self, built: Any, ctx: Any) -> MethodRun:
        term = next(t for t in built.objective.terms if isinstance(t.loss, UniKDLoss))
        loss: UniKDLoss = term.loss  # type: ignore[assignment]
        spec = teacher_spec(built)
        head = class_head(loss.dim, spec.num_classes).to(built.device)
        return UniKDRun(loss, head, spec, as_specs(term.teacher_tap), built.recipe.unikd, ctx)

    def report_section(self, label: str, summary: dict[str, Any], folder: Path) -> str:
        """The AKE's pretraining: steps and loss at its start and end."""
        stats = (summary.get("unikd") or {}).get("pretrain")
        if not stats:
            return ""
        return (f"<h3>{html.escape(label)}: UniKD AKE pretraining (<code>{html.escape(str(folder))}</code>)</h3>"
                f"<p>{stats['steps']} steps on the teacher's detections ({stats['targets_per_image']:.2f} per "
                f"image): set loss {stats['loss_first']:.3f} at the start, {stats['loss_last']:.3f} at the end.</p>")
