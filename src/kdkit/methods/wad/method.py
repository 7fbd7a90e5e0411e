"""WAD as a registered method: its checks, and the pseudo-labels and weights computed before training."""

from __future__ import annotations

from typing import Any

import torch

from kdkit.data import UNLABELLED, normalize
from kdkit.engine import Hooks
from kdkit.errors import KdkitError
from kdkit.method import Method, MethodRun, register_method
from kdkit.methods.wad.knowledge import class_similarities, pseudo_labels_and_weights
from kdkit.methods.wad.loss import WadLoss

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


@register_method
class WadMethod(Method):
    """WAD: weight-aware distillation under class distribution mismatch (Du et al., ICCV 2023)."""

    name = "wad"

    def active(self, recipe: Any) -> bool:
        return any(t.loss == LOSS for t in recipe.distill)

    def check(self, recipe: Any) -> list[str]:
        setting = recipe.data.setting
        problems = []
        if setting is None or setting.name not in SETTINGS:
            got = "no data.setting" if setting is None else f"data.setting {setting.name!r}"
            problems.append(f"wad pseudo-labels an unlabelled pool with the labelled classes, but the recipe has "
                            f"{got}: use data.setting {SETTINGS[0]} (unseen classes in the pool) or {SETTINGS[1]}")
        if len([t for t in recipe.distill if t.loss == LOSS]) > 1:
            problems.append("wad has one table of pseudo-labels: keep one `wad` term")
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
        features = teacher_features(built.teacher, term.teacher_tap, data, built.device)
        term.loss.set_knowledge(*knowledge(features, labels, data.num_classes))
        return MethodRun(Hooks())
