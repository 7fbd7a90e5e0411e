"""KD³ as a registered method: the ``kd3:`` section, the MixDistribution batch transform, the classifiers handed to
the loss, the recipes it refuses and the selection rate in ``summary.json``."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from kdkit.engine import Engine, Hooks
from kdkit.errors import KdkitError
from kdkit.method import Method, MethodRun, register_method
from kdkit.methods.kd3.loss import Kd3Loss
from kdkit.methods.kd3.mix import draw_mix, mix_distribution
from kdkit.schema import Strict
from kdkit.taps import resolve_tap

LOSS = "kd3"
#: The tap each side's classifier reads (its input) and the taps the term must read.
FEATURE = "penultimate"
TAPS = ["logits", FEATURE]


class Kd3Spec(Strict):
    """The recipe section ``kd3:`` (optional; with one ``kd3`` term)."""

    mix_alpha: float = Field(0.1, gt=0, description="MixDistribution weights lam ~ Beta(mix_alpha, mix_alpha) between "
                             "an image's channel statistics and a random partner's (0.1: mostly near one of the two)")


def classifier_of(model: nn.Module, where: str) -> nn.Linear:
    """The linear layer whose input is ``model``'s ``penultimate`` tap.

    Raises:
        KdkitError: The model has no such tap, or the layer there is not an ``nn.Linear``.
    """
    tap = resolve_tap(model, FEATURE, where=where)
    layer = model.get_submodule(tap.path)
    if tap.capture != "input" or not isinstance(layer, nn.Linear):
        raise KdkitError(f"KD³ aligns linear classifiers, but {where}'s {FEATURE!r} tap is not the input of a "
                         f"linear layer ({tap.path!r}: {type(layer).__name__})", bad=tap.path,
                         fix="use a model whose classifier is one linear layer on the penultimate feature "
                             "(cnn_student, cnn_teacher with head flatten or pool)", where=where)
    return layer


class Kd3Run(MethodRun):
    """``[x; MixDistribution(x)]`` batches, and the selection rate after training."""

    def __init__(self, loss: Kd3Loss, alpha: float, seed: int) -> None:
        self.loss, self.alpha, self.seed = loss, alpha, seed
        super().__init__(Hooks(batch_transforms=[self.transform]))

    def transform(self, engine: Engine, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> tuple:
        """Append each image re-styled by MixDistribution (labels and indices repeated)."""
        lam, perm = draw_mix(len(x), self.alpha, self.seed + 7919 * engine.ctx.rank, engine.epoch, engine.batch)
        mixed = mix_distribution(x, lam.to(x.device), perm.to(x.device))
        return torch.cat([x, mixed]), torch.cat([y, y]), torch.cat([index, index])

    def summary(self, engine: Engine) -> dict[str, Any]:
        seen = self.loss.seen
        return {"kd3": {"selected_share": self.loss.selected / seen if seen else None, "originals_seen": seen}}


@register_method
class Kd3Method(Method):
    """KD³ (Tang et al., ICCV 2023): knowledge distillation between different distributions (web data)."""

    name = "kd3"
    section = "kd3"
    spec = Kd3Spec
    feeds_teacher_new_images = True  # the MixDistribution images

    def active(self, recipe: Any) -> bool:
        return recipe.kd3 is not None or any(t.loss == LOSS for t in recipe.distill)

    @staticmethod
    def settings(recipe: Any) -> Kd3Spec:
        """The ``kd3:`` section, or its defaults when the recipe leaves it out."""
        return recipe.kd3 if recipe.kd3 is not None else Kd3Spec()

    def check(self, recipe: Any) -> list[str]:
        problems = []
        terms = [i for i, t in enumerate(recipe.distill) if t.loss == LOSS]
        if len(terms) != 1:
            problems.append(f"KD³ has one objective: {len(terms)} `kd3` terms in distill; give exactly one "
                            f"({{loss: kd3, student: {TAPS}, teacher: {TAPS}}})")
        for i in terms:
            term = recipe.distill[i]
            if term.student not in (None, TAPS) or term.teacher not in (None, TAPS):
                problems.append(f"distill.{i}: KD³ reads student: {term.student!r}, teacher: {term.teacher!r}; it "
                                f"needs both [logits, penultimate]: set student: {TAPS} and teacher: {TAPS}")
        if recipe.teacher is None:
            problems.append("KD³ distils one teacher: give `teacher:` (teachers: and peers: are not supported)")
        if recipe.teachers or recipe.peers is not None:
            problems.append("KD³ distils one teacher: remove `teachers:`/`peers:` and give `teacher:`")
        if recipe.data.views != 1:
            problems.append("KD³ doubles each batch itself ([x; MixDistribution(x)]): set data.views: 1")
        return problems

    def attach(self, built: Any, ctx: Any) -> MethodRun:
        term = next(t for t in built.objective.terms if isinstance(t.loss, Kd3Loss))
        student = classifier_of(built.student.model, "model")
        teacher = classifier_of(built.teacher.model, "teacher")
        term.loss.bind_classifiers(student, teacher)
        return Kd3Run(term.loss, self.settings(built.recipe).mix_alpha, built.recipe.train.seed)
