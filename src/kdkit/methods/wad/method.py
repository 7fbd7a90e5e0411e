"""WAD as a registered method: its checks, the pseudo-labels and weights computed before training, and its rounds."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from kdkit.data import UNLABELLED, map_images
from kdkit.engine import Engine, Hooks, Phase
from kdkit.errors import KdkitError, closest
from kdkit.method import Method, MethodRun, register_method
from kdkit.methods.wad.contrastive import ContrastiveSpec, cached_representation
from kdkit.methods.wad.knowledge import class_similarities, pseudo_labels_and_weights
from kdkit.methods.wad.loss import WadLoss
from kdkit.methods.wad.rounds import RoundsState, most_confident, promotion_fraction, round_starts
from kdkit.schema import Strict

LOSS = "wad"
ROUNDS = "wad_rounds"  # the phase's name (its statistics in summary.json) and the checkpointed state's
#: Settings whose training split has labelled and unlabelled samples, the latter of unknown classes or not.
SETTINGS = ("class_mismatch", "semi_supervised")


def teacher_features(teacher: Any, tap: str, data: Any, device: torch.device, batch_size: int = 500) -> torch.Tensor:
    """The frozen teacher's ``tap`` on every un-augmented training image, ``(N, ...)`` float32 on ``device``."""
    return map_images(lambda x: teacher(x)[tap], data.train_images, data.mean, data.std, device, batch_size)


def knowledge(features: torch.Tensor, labels: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-label and weight of every training sample (labelled samples: their label, weight 1; never read)."""
    labelled = labels != UNLABELLED
    pseudo, weight = labels.clone(), torch.ones(len(labels), device=features.device)
    scores = class_similarities(features[~labelled], features[labelled], labels[labelled], classes)
    pseudo[~labelled], weight[~labelled] = pseudo_labels_and_weights(scores)
    return pseudo, weight


def data_problems(data: Any) -> list[KdkitError]:
    """Why the run's data gives WAD nothing to do (no unlabelled sample, a class without a labelled one)."""
    if data is None:
        return []
    labels = data.train_labels
    if data.num_labelled == len(labels):
        return [KdkitError(f"wad learns from unlabelled samples, but all {len(labels)} of {data.name!r} are labelled",
                           fix="use data.setting class_mismatch or semi_supervised", where="data.setting")]
    missing = sorted(set(range(data.num_classes)) - set(labels[labels != UNLABELLED].tolist()))
    if missing:
        return [KdkitError(f"wad compares each unlabelled sample with the labelled samples of every class, but classes "
                           f"{missing} have none", fix="label some images of every class", where="data.setting")]
    return []


class WadSpec(Strict):
    """The recipe section ``wad:`` (optional): how the contrastive representation is trained (for a ``wad`` term with
    ``representation: contrastive``) and the official code's rounds."""

    contrastive: ContrastiveSpec = Field(default_factory=ContrastiveSpec)
    rounds: int = Field(1, ge=1, description="training rounds (the official code's split + 1; its default split 5 is "
                                             "6): after each, the unlabelled samples whose prediction best agrees "
                                             "with their pseudo-label join the labelled set; 1: one round")
    alpha: float = Field(0.1, gt=0, le=1, description="share of the unlabelled samples promoted after round i: "
                                                      "alpha (1 - i / (rounds - 1))^2 (the code's --alpha, 0.1)")


def predict(student: Any, images: torch.Tensor, data: Any, device: torch.device) -> torch.Tensor:
    """The student's float32 logits on un-augmented uint8 ``images`` (at least one), in eval mode."""
    def logits(x: torch.Tensor) -> torch.Tensor:
        out = student.model(x)
        if student.recorder is not None:
            student.recorder.pop()  # never keep tapped activations alive
        return out

    was_training = student.model.training
    student.model.eval()
    try:
        return map_images(logits, images, data.mean, data.std, device)
    finally:
        student.model.train(was_training)


class WadRounds:
    """The rounds: a phase at each round's first epoch that promotes confident unlabelled samples, and the
    re-application of the checkpointed labels when a run resumes (see :mod:`~kdkit.methods.wad.rounds`).

    Args:
        loss: The run's ``wad`` loss (its tables are recomputed after each round).
        features: ``(N, ...)`` the frozen representation of every training sample.
        data: The run's data (its un-augmented training images, normalisation, class count).
        spec: The ``wad:`` section (``rounds``, ``alpha``).
        epochs: The run's epochs.
    """

    def __init__(self, loss: WadLoss, features: torch.Tensor, data: Any, spec: WadSpec, epochs: int) -> None:
        self.loss, self.features, self.data = loss, features, data
        self.rounds, self.alpha = spec.rounds, spec.alpha
        self.starts = round_starts(epochs, spec.rounds)
        self.state = RoundsState(data.train_labels.to(features.device))

    def due(self, engine: Engine) -> bool:
        """At the first step of a round after the first, once."""
        following = int(self.state.completed) + 1
        return engine.batch == 0 and following < self.rounds and engine.epoch >= self.starts[following]

    def sync(self, engine: Engine, event: str) -> None:
        """At an epoch start, make the loader and the tables follow the (possibly just restored) labels."""
        if event == "epoch_start" and not torch.equal(engine.train_loader.labels.cpu(), self.state.labels.cpu()):
            self.apply(engine)

    def apply(self, engine: Engine) -> None:
        """The loader's labels := the state's; pseudo-labels and weights from the enlarged labelled set."""
        labels = self.state.labels
        engine.train_loader.labels.copy_(labels.to(engine.train_loader.labels.device))
        pseudo, weight = knowledge(self.features, labels.to(self.features.device), self.data.num_classes)
        self.loss.set_knowledge(pseudo, weight)

    def run(self, engine: Engine) -> dict[str, Any]:
        """Promote the ``fraction * |U|`` unlabelled samples whose prediction best agrees with their pseudo-label."""
        completed = int(self.state.completed) + 1
        labels = self.state.labels
        pool = (labels == UNLABELLED).nonzero().squeeze(1)
        fraction = promotion_fraction(completed, self.rounds, self.alpha)
        count = int(fraction * len(pool))  # the official int(alpha * u_number)
        if count:
            pseudo = self.loss.pseudo.to(labels.device)[pool]
            logits = predict(engine.student, self.data.train_images[pool.cpu()], self.data, self.features.device)
            rows = most_confident(logits.to(labels.device), pseudo, count)
            labels[pool[rows]] = pseudo[rows]
        self.state.completed.fill_(completed)
        self.apply(engine)
        previous = engine.phase_stats.get(ROUNDS, {}).get("per_round", [])
        row = {"round": completed, "fraction": round(fraction, 6), "promoted": int(count), "pool_before": len(pool)}
        per_round = [*previous, row]
        return {"completed": completed, "promoted": sum(r["promoted"] for r in per_round), "per_round": per_round}


class WadRun(MethodRun):
    """The representation and the weights it gave, for ``summary.json``; with ``wad.rounds`` > 1, the rounds' phase,
    callback and checkpointed labels."""

    def __init__(self, facts: dict[str, Any], rounds: WadRounds | None) -> None:
        hooks = Hooks() if rounds is None else Hooks(callbacks=[rounds.sync],
                                                     phases=[Phase(ROUNDS, rounds.due, rounds.run)],
                                                     state={ROUNDS: rounds.state})
        super().__init__(hooks)
        self.facts = facts

    def summary(self, engine: Engine) -> dict[str, Any]:
        rounds = engine.phase_stats.get(ROUNDS)
        return {"wad": {**self.facts, **({"rounds": rounds} if rounds is not None else {})}}


def representation_of(term: Any) -> str:
    """The term's ``representation`` parameter (``teacher`` by default)."""
    return term.params.get("representation", "teacher")


@register_method
class WadMethod(Method):
    """WAD: weight-aware distillation under class distribution mismatch (Du et al., ICCV 2023)."""

    name = "wad"
    section = "wad"
    spec = WadSpec

    def active(self, recipe: Any) -> bool:
        return recipe.wad is not None or any(t.loss == LOSS for t in recipe.distill)

    @staticmethod
    def settings(recipe: Any) -> WadSpec:
        """The ``wad:`` section, or its defaults when the recipe leaves it out."""
        return recipe.wad if recipe.wad is not None else WadSpec()

    def check(self, recipe: Any) -> list[str]:
        setting = recipe.data.setting
        problems = []
        if setting is None or setting.name not in SETTINGS:
            got = "no data.setting" if setting is None else f"data.setting {setting.name!r}"
            problems.append(f"wad pseudo-labels an unlabelled pool with the labelled classes, but the recipe has "
                            f"{got}: use data.setting {SETTINGS[0]} (unseen classes in the pool) or {SETTINGS[1]}")
        terms = [t for t in recipe.distill if t.loss == LOSS]
        if len(terms) != 1:
            problems.append(f"wad has one table of pseudo-labels: {len(terms)} `wad` terms in distill; keep one "
                            "`wad` term ({loss: wad} or {loss: wad, representation: contrastive})")
        elif (recipe.wad is not None and "contrastive" in recipe.wad.model_fields_set
              and representation_of(terms[0]) != "contrastive"):
            problems.append("the `wad:` section sets the contrastive representation, but the wad term reads the "
                            "teacher's: add `representation: contrastive` to the term, or remove the `wad:` section")
        section = self.settings(recipe)
        rounds = section.rounds
        if rounds == 2:
            problems.append("wad.rounds 2 promotes nothing: after round i the official schedule promotes alpha (1 - "
                            "i / (rounds - 1))^2 of the pool, 0 at i = rounds - 1; use rounds 1 (one round) or >= 3 "
                            "(the official code's split 5 is rounds 6)")
        if rounds > recipe.train.epochs:
            problems.append(f"wad.rounds {rounds} splits train.epochs {recipe.train.epochs} into rounds of one epoch "
                            f"at least: use rounds <= {recipe.train.epochs} or more epochs")
        arch = section.contrastive.arch
        if terms and representation_of(terms[0]) == "contrastive" and ":" not in arch:
            from kdkit.models import MODELS

            if arch not in MODELS.names():
                problems.append(f"wad.contrastive.arch {arch!r} is not a model; closest: "
                                f"{', '.join(closest(arch, MODELS.names())[:3])} (`kdkit ls models`)")
        if not recipe.train.ce_weight:
            problems.append("wad trains the labelled samples with the cross-entropy (train.ce_weight, 1 in the "
                            "official code) and the unlabelled ones with pseudo-labels: set train.ce_weight > 0")
        return problems

    def attach(self, built: Any, ctx: Any) -> MethodRun:
        problems = data_problems(built.data)
        if problems:
            raise problems[0]
        term = next(t for t in built.objective.terms if isinstance(t.loss, WadLoss))
        data = built.data
        labels = data.train_labels.to(built.device)
        facts: dict[str, Any] = {"representation": term.loss.representation}
        if term.loss.representation == "contrastive":
            from kdkit.models import build_model

            spec = self.settings(built.recipe).contrastive
            def network() -> torch.nn.Module:
                return build_model(spec.arch, num_classes=data.num_classes,
                                   in_channels=int(data.train_images.shape[1]),
                                   image_size=int(data.train_images.shape[-1]), params=spec.params,
                                   where="wad.contrastive.arch")

            trained, path, reused = cached_representation(network, spec.tap, data.train_images, data.mean, data.std,
                                                          spec, built.device)
            features = trained.features
            facts.update(arch=spec.arch, epochs=spec.epochs, features=spec.features,
                         final_nt_xent=float(f"{trained.final_loss:.6g}"), cache=str(path), reused=reused)
        else:
            features = teacher_features(built.teacher, term.teacher_tap, data, built.device)
        pseudo, weight = knowledge(features, labels, data.num_classes)
        term.loss.set_knowledge(pseudo, weight)
        unlabelled = labels == UNLABELLED
        facts["mean_weight_unlabelled"] = float(f"{float(weight[unlabelled].mean()):.6g}")
        section = self.settings(built.recipe)
        rounds = None
        if section.rounds > 1:
            rounds = WadRounds(term.loss, features, data, section, built.recipe.train.epochs)
        return WadRun(facts, rounds)
