"""LELP as a registered method: recognised from its term; its checks, the projections it computes from the frozen
teacher before the first batch, and what they are in ``summary.json``."""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit.data import map_images
from kdkit.distill import Term, as_specs
from kdkit.engine import Hooks
from kdkit.errors import KdkitError
from kdkit.method import Method, MethodRun, register_method
from kdkit.methods.lelp.head import LelpHead
from kdkit.methods.lelp.loss import LelpLoss
from kdkit.methods.lelp.projection import Projections, lelp_projections
from kdkit.taps import LOGITS

LOSS = "lelp"
BRIDGE = "lelp_head"


def lelp_terms(recipe: Any) -> list[int]:
    """Indices of the recipe's terms that are LELP's (its loss or its head)."""
    return [i for i, t in enumerate(recipe.distill) if t.loss == LOSS or t.bridge == BRIDGE]


def teacher_embeddings(teacher: nn.Module, data: Any, tap: str, batch_size: int = 500) -> torch.Tensor:
    """``(N, d)`` float32 embeddings (tap ``tap``, flattened) of the frozen ``teacher`` on ``data``'s un-augmented
    training images, on the teacher's device. ``teacher`` is a :class:`~kdkit.distill.FrozenTeacher` (eval mode)."""
    return map_images(lambda x: teacher(x)[tap].flatten(1), data.train_images, data.mean, data.std,
                      next(teacher.parameters()).device, batch_size)


def output_weight(teacher: Any, tap: str, classes: int) -> torch.Tensor:
    """The weight ``(C, d)`` of the linear output layer whose input is the embedding tap ``tap``.

    Raises:
        KdkitError: The tap is not the input of a linear layer with ``C`` outputs (then there is no output weight
            whose null space to project onto).
    """
    found = next((t for t in teacher.taps if t.spec == tap), None)
    module = dict(teacher.model.named_modules()).get(found.path) if found is not None else None
    if found is None or found.capture != "input" or not isinstance(module, nn.Linear) or \
            module.out_features != classes:
        what = "no tap" if found is None else f"the {found.capture} of {found.path!r} ({type(module).__name__})"
        raise KdkitError(f"LELP's null-space projection needs the teacher's output weights: its embedding tap {tap!r} "
                         f"is {what}, not the input of a linear layer with {classes} outputs",
                         bad=tap, choices=["penultimate"], where="distill.teacher",
                         fix="tap the embedding that feeds the teacher's output layer (`teacher: [logits, "
                             "penultimate]`), or set the lelp term's `null_space: false`")
    return module.weight.detach()


class LelpRun(MethodRun):
    """Computes and installs the projections when the run is attached (before the first batch); reports them.

    Args:
        term: The ``lelp`` term.
        projections: What was installed.
        seconds: Time of the teacher pass and the PCA.
    """

    def __init__(self, term: Term, projections: Projections, seconds: float) -> None:
        super().__init__(Hooks())
        self.term, self.projections, self.seconds = term, projections, seconds

    def summary(self, engine: Any) -> dict[str, Any]:
        loss: LelpLoss = self.term.loss  # type: ignore[assignment]
        classes, subclasses, width = self.projections.directions.shape
        return {"lelp": {"classes": classes, "subclasses": subclasses, "embedding_width": width,
                         "null_space": loss.null_space, "rotate": loss.rotate,
                         "subclass_temperature": loss.subclass_temperature, "temperature": loss.temperature,
                         "coordinate_std": [[round(float(v), 4) for v in row] for row in self.projections.spread],
                         "seconds": round(self.seconds, 2)}}


def install_projections(built: Any, term: Term, seed: int) -> Projections:
    """One pass of the frozen teacher over the training images, LELP's PCA, and the result installed in the loss."""
    loss: LelpLoss = term.loss  # type: ignore[assignment]
    head = built.student.bridges[term.name]
    if built.teacher is None:
        raise KdkitError("LELP projects the teacher's embeddings before training: this run has no teacher network",
                         fix="give the recipe a `teacher:`", where="teacher")
    _, embedding_tap = as_specs(term.teacher_tap)
    embeddings = teacher_embeddings(built.teacher, built.data, embedding_tap)
    weight = output_weight(built.teacher, embedding_tap, head.classes) if loss.null_space else None
    projections = lelp_projections(embeddings, built.data.train_labels, head.classes, head.subclasses,
                                   weight=weight, rotate=loss.rotate, seed=seed)
    loss.install(projections)
    return projections


@register_method
class LelpMethod(Method):
    """LELP (Loo et al., 2024): distil pseudo-subclasses from PCA projections of the teacher's embeddings."""

    name = "lelp"

    def active(self, recipe: Any) -> bool:
        return bool(lelp_terms(recipe))

    def check(self, recipe: Any) -> list[str]:
        problems = []
        terms = lelp_terms(recipe)
        if recipe.teachers:  # (no teacher at all is refused by the schema, for every term that needs one)
            problems.append("LELP projects one teacher's embeddings (and the null space of its output weights): "
                            "remove `teachers:` and give one `teacher:`")
        if len(terms) > 1:
            problems.append(f"LELP has one subclass head: distill.{terms[1]} is a second `{LOSS}` term or `{BRIDGE}` "
                            "bridge; keep one")
        for i in terms:
            term = recipe.distill[i]
            if term.loss != LOSS:
                problems.append(f"distill.{i}: the `{BRIDGE}` bridge is trained by the `{LOSS}` loss, got loss "
                                f"{term.loss!r}; set `loss: {LOSS}`")
            elif term.teacher is not None and (not isinstance(term.teacher, list) or len(term.teacher) != 2
                                               or term.teacher[0] != LOGITS):
                problems.append(f"distill.{i}.teacher: LELP reads the teacher's logits and its embedding, got "
                                f"{term.teacher!r} (choices: [logits, penultimate], or [logits, TAP]); give "
                                "`teacher: [logits, penultimate]` or leave it out")
        if recipe.peers is not None:
            problems.append("LELP trains one student from a teacher: remove `peers:`")
        return problems

    def attach(self, built: Any, ctx: Any) -> MethodRun:
        term = next(t for t in built.objective.terms if isinstance(t.loss, LelpLoss))
        if not isinstance(built.student.bridges[term.name], LelpHead):  # the planner enforces requires_bridge
            raise KdkitError("the lelp term has no lelp_head bridge", fix="add `bridge: lelp_head` to the term")
        start = time.perf_counter()
        projections = install_projections(built, term, built.recipe.train.seed)
        return LelpRun(term, projections, time.perf_counter() - start)

    def report_section(self, label: str, summary: dict[str, Any], folder: Path) -> str:
        """The projections' sizes and each direction's spread (what the subclass temperature divides)."""
        lelp = summary.get("lelp")
        if not lelp:
            return ""
        spread = "; ".join(f"class {c}: " + ", ".join(f"{v:.3g}" for v in row)
                           for c, row in enumerate(lelp["coordinate_std"]))
        return (f"<h3>{html.escape(label)}: LELP projections (<code>{html.escape(str(folder))}</code>)</h3>"
                f"<p>{lelp['subclasses']} directions per class for {lelp['classes']} classes from a "
                f"{lelp['embedding_width']}-wide teacher embedding (null-space projection "
                f"{'on' if lelp['null_space'] else 'off'}, random rotation {'on' if lelp['rotate'] else 'off'}), "
                f"computed in {lelp['seconds']:.1f} s; the coordinates' standard deviations ({html.escape(spread)}) "
                f"against the subclass temperature {lelp['subclass_temperature']:g}.</p>")
