"""WAD as a registered method: its checks, and the pseudo-labels and weights computed before training."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from kdkit.data import UNLABELLED, normalize
from kdkit.engine import Engine, Hooks
from kdkit.errors import KdkitError, closest
from kdkit.method import Method, MethodRun, register_method
from kdkit.methods.wad.contrastive import ContrastiveSpec, cached_representation
from kdkit.methods.wad.knowledge import class_similarities, pseudo_labels_and_weights
from kdkit.methods.wad.loss import WadLoss
from kdkit.schema import Strict

LOSS = "wad"
#: Settings whose training split has labelled and unlabelled samples, the latter of unknown classes or not.
SETTINGS = ("class_mismatch", "semi_supervised")


@torch.no_grad()
def teacher_features(teacher: Any, tap: str, data: Any, device: torch.device, batch_size: int = 500) -> torch.Tensor:
    """The frozen teacher's ``tap`` on every un-augmented training image, ``(N, ...)`` float32 on ``device``."""
    out = []
    for start in range(0, len(data.train_labels), batch_size):
        x = normalize(data.train_images[start:start + batch_size].to(device), data.mean, data.std)
        out.append(teacher(x)[tap].float())
    return torch.cat(out)


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
    """The recipe section ``wad:`` (optional): how the contrastive representation is trained, for a ``wad`` term with
    ``representation: contrastive``."""

    contrastive: ContrastiveSpec = Field(default_factory=ContrastiveSpec)


class WadRun(MethodRun):
    """No engine hooks; the representation and the weights it gave, for ``summary.json``."""

    def __init__(self, facts: dict[str, Any]) -> None:
        super().__init__(Hooks())
        self.facts = facts

    def summary(self, engine: Engine) -> dict[str, Any]:
        return {"wad": self.facts}


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
        elif recipe.wad is not None and representation_of(terms[0]) != "contrastive":
            problems.append("the `wad:` section sets the contrastive representation, but the wad term reads the "
                            "teacher's: add `representation: contrastive` to the term, or remove the `wad:` section")
        arch = self.settings(recipe).contrastive.arch
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
        return WadRun(facts)
