"""ORC as a registered method: the ``orc:`` section (intensive teaching of the pivot teacher) beside the ``orc`` term;
the recipes it refuses and why, the batch and the pivot teacher's forward handed to the loss, and the roles in
``summary.json``."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from kdkit.distill import Term, as_specs
from kdkit.engine import Engine, Hooks
from kdkit.errors import KdkitError
from kdkit.method import Method, MethodRun, register_method
from kdkit.methods.orc.loss import Feedback, OrcBatch, OrcLoss
from kdkit.schema import Strict

LOSS = "orc"
LOGITS = "logits"


class OrcSpec(Strict):
    """The recipe section ``orc:``: the pivot teacher's intensive teaching on the students' error samples."""

    alpha: float = Field(1.0, gt=0, le=100, description="the mixup weight of a batch and its error samples is drawn "
                         "from Beta(alpha, alpha) (not given by the sources read; mixup's usual 1)")
    feedback: Feedback = Field("any", description="a sample is an error sample when `any` student of the group "
                               "misclassifies it, or `all` do")


def orc_terms(recipe: Any) -> list[int]:
    """Indices of the recipe's ``orc`` terms."""
    return [i for i, t in enumerate(recipe.distill) if t.loss == LOSS]


def group_names(term: Any) -> list[str] | None:
    """The networks an ``orc`` term reads, in order (pivot last), or ``None`` when a tap is not ``NAME.logits``."""
    taps = [term.student] if isinstance(term.student, str) else list(term.student or [])
    names = [tap.split(".", 1)[0] for tap in taps]
    return names if all(tap == f"{n}.{LOGITS}" for tap, n in zip(taps, names, strict=True)) else None


def group_problems(recipe: Any, i: int) -> list[str]:
    """The ``orc`` term must read every trained network's logits once, the pivot teacher last, a pre-trained peer."""
    term = recipe.distill[i]
    members = list(recipe.trained_members())
    names = group_names(term)
    if names is None or sorted(names) != sorted(members):
        example = ", ".join(f"{m}.{LOGITS}" for m in members)
        return [f"distill.{i}.student is {term.student!r}: ORC trains every network of the group through its term, "
                f"which reads each trained network's logits once, the pivot teacher last (choices: a list of "
                f"{example} in any order); set distill.{i}.student to such a list"]
    promote = term.params.get("promote", 1)
    promote = promote if isinstance(promote, int) else 1  # a wrong type is reported by the loss's parameter check
    problems = []
    if len(names) < promote + 2:
        problems.append(f"ORC with promote {promote} needs a pivot teacher, {promote} temporary teacher(s) and at "
                        f"least one student left to teach: {len(names)} networks ({', '.join(names)}) are too few; "
                        f"add peers (at least {promote + 2} networks) or lower distill.{i}.promote")
    pivot = names[-1]
    if pivot == recipe.deploy:
        problems.append(f"the pivot teacher (the last tap of distill.{i}.student) is {pivot!r}, the deployed network; "
                        "ORC deploys a student: list the pivot teacher's logits last, or set `deploy:` to a student")
    elif recipe.trained_members()[pivot].checkpoint is None and recipe.trained_members()[pivot].recipe is None:
        at = recipe.member_key(pivot)
        problems.append(f"ORC's pivot teacher {pivot!r} (the last tap of distill.{i}.student) starts pre-trained, as "
                        f"in the paper: {at}.checkpoint and {at}.recipe are None (choices: a trained run's folder or "
                        f"weights file, or the recipe that trains it); give the pivot a `recipe:` (e.g. teacher.yaml) "
                        "or a `checkpoint:`")
    return problems


class OrcRun(MethodRun):
    """Hands every batch (and its mixup draws) and the pivot teacher's forward to the ``orc`` loss.

    Args:
        spec: The ``orc:`` section.
        term: The ``orc`` term.
        pivot: The pivot teacher (a member of the trained group).
        seed: Seed of the draws; they are a pure function of (seed, epoch, batch), so a resumed run draws alike.
    """

    def __init__(self, spec: OrcSpec, term: Term, pivot: torch.nn.Module, seed: int) -> None:
        self.spec, self.term, self.seed = spec, term, seed
        self.loss: OrcLoss = term.loss  # type: ignore[assignment]
        self.loss.refine = pivot.__call__
        super().__init__(Hooks(batch_transforms=[self.hand_over]))

    def hand_over(self, engine: Engine, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> tuple:
        """Give the loss this batch and its draws: the mixup weight and each sample's error-sample partner."""
        rng = np.random.default_rng([self.seed + 7919 * engine.ctx.rank, engine.epoch, engine.batch])
        lam = float(rng.beta(self.spec.alpha, self.spec.alpha))
        draw = torch.from_numpy(rng.random(len(x))).to(x.device)
        self.loss.batch = OrcBatch(x, draw, lam, self.spec.feedback)
        return x, y, index

    def summary(self, engine: Engine) -> dict[str, Any]:
        names = [spec.split(".", 1)[0] for spec in as_specs(self.term.student_tap)]
        loss = self.loss
        return {"orc": {"pivot": names[-1],
                        "promotions": dict(zip(names[:-1], loss.promotions.tolist(), strict=True)),
                        "steps": int(loss.steps), "refined_steps": int(loss.refined),
                        "feedback_samples": int(loss.feedback_samples)}}


@register_method
class OrcMethod(Method):
    """ORC (Choi et al., ICCV 2023): network groups whose best students are promoted to teachers every step."""

    name = "orc"
    section = "orc"
    spec = OrcSpec
    needs_labels = True  # ranking, error samples and every network's cross-entropy read the labels

    def check(self, recipe: Any) -> list[str]:
        terms = orc_terms(recipe)
        if not terms:
            return [f"the `orc:` section refines the pivot teacher of an `orc` term's group, and distill has none "
                    f"(terms: {[t.loss for t in recipe.distill]}); add `- {{loss: orc, student: [model.logits, "
                    "PEER.logits, PIVOT.logits]}` to distill"]
        problems = []
        if len(terms) > 1:
            problems.append(f"ORC trains one network group: distill.{terms[1]} is a second `orc` term; keep one")
        if recipe.has_teacher:
            problems.append("ORC's teacher group is trained online (the pivot teacher is refined on the students' "
                            "error samples), and a frozen `teacher:`/`teachers:` cannot be: remove it and make the "
                            "pre-trained teacher a peer with `checkpoint:`, listed last in the orc term")
        if recipe.peers is None:
            problems.append("ORC trains a group of networks: `peers:` is None; add peers (at least one student and "
                            "the pivot teacher)")
        else:
            problems += group_problems(recipe, terms[0])
        if recipe.distill[terms[0]].teacher is not None:
            problems.append(f"distill.{terms[0]}.teacher is {recipe.distill[terms[0]].teacher!r}: the orc term's "
                            "teachers are members of its own group; remove `teacher:` from the term")
        if recipe.train.ce_weight:
            problems.append(f"the orc term holds every network's cross-entropy ((1 - beta) CE + beta KD): "
                            f"train.ce_weight is {recipe.train.ce_weight:g}; set train.ce_weight: 0")
        others = [i for i, t in enumerate(recipe.distill) if t.loss != LOSS]
        if others:
            problems.append(f"ORC's term trains the whole group: distill.{others[0]} "
                            f"({recipe.distill[others[0]].loss}) is another term; remove it")
        return problems

    def attach(self, built: Any, ctx: Any) -> MethodRun:
        if ctx.enabled:
            raise KdkitError("ORC refines the pivot teacher with a second forward outside DistributedDataParallel's, "
                             f"which would not all-reduce its gradients: this run has {ctx.world_size} processes",
                             bad=str(ctx.world_size), choices=["1"], fix="train ORC in one process")
        term = next(t for t in built.objective.terms if isinstance(t.loss, OrcLoss))
        pivot = as_specs(term.student_tap)[-1].split(".", 1)[0]
        return OrcRun(built.recipe.orc, term, getattr(built.student.model, pivot), built.recipe.train.seed)

    def report_section(self, label: str, summary: dict[str, Any], folder: Path) -> str:
        """How often each student was promoted."""
        stats = summary.get("orc")
        if not stats:
            return ""
        steps = max(stats["steps"], 1)
        shares = ", ".join(f"{html.escape(n)} {100 * c / steps:.1f} %" for n, c in stats["promotions"].items())
        return (f"<h3>{html.escape(label)}: ORC roles (<code>{html.escape(str(folder))}</code>)</h3>"
                f"<p>Temporary teacher in {shares} of {stats['steps']} steps; pivot teacher "
                f"{html.escape(stats['pivot'])} refined in {stats['refined_steps']} steps on "
                f"{stats['feedback_samples']} error samples.</p>")
