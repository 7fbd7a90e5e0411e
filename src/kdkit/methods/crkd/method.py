"""Cr-KD as a registered method: recognised from its terms; the checks that need the recipe and the data."""

from __future__ import annotations

from typing import Any

from kdkit.engine import Hooks
from kdkit.errors import KdkitError
from kdkit.method import Method, MethodRun, register_method
from kdkit.methods.crkd.loss import CrKdLoss
from kdkit.methods.crkd.swap import NcdSwapLoss

LOSSES = ("crkd", "ncd_swap")
SETTING = "novel_classes"


def setting_problems(recipe: Any) -> list[str]:
    """Why the recipe's data has no novel classes to discover (empty when it has)."""
    setting = recipe.data.setting
    if setting is None or setting.name != SETTING:
        got = "no data.setting" if setting is None else f"data.setting {setting.name!r}"
        return [f"{' and '.join(LOSSES)} discover novel classes, but the recipe has {got}: use "
                f"data.setting: {{name: {SETTING}}} (known classes labelled, novel classes unlabelled)"]
    if setting.params.get("part", "all") != "all":
        return [f"{' and '.join(LOSSES)} learn the novel classes from their unlabelled images, but "
                f"data.setting.part {setting.params['part']!r} has none: use part: all (the default)"]
    return []


def known_problems(built: Any) -> list[KdkitError]:
    """The terms whose ``known`` is not the data's number of known classes."""
    data = built.data
    if data is None:
        return []
    known = data.num_classes - len(data.novel_classes)
    return [KdkitError(f"term {term.name!r} has known={term.loss.known}, but {data.name!r} has {known} known classes "
                       f"(novel: {list(data.novel_classes)})", bad=str(term.loss.known), choices=[str(known)],
                       fix=f"set known: {known} on the term", where="distill")
            for term in built.objective.terms
            if isinstance(term.loss, CrKdLoss | NcdSwapLoss) and term.loss.known != known]


@register_method
class CrKdMethod(Method):
    """Cr-KD: class-relation KD on top of UNO's swapped prediction (Gu et al., ICCV 2023)."""

    name = "crkd"

    def active(self, recipe: Any) -> bool:
        return any(t.loss in LOSSES for t in recipe.distill)

    def check(self, recipe: Any) -> list[str]:
        problems = setting_problems(recipe)
        if any(t.loss == "ncd_swap" for t in recipe.distill) and recipe.data.views != 2:
            problems.append("ncd_swap predicts each view's pseudo-labels from the other view: set data.views: 2")
        return problems

    def attach(self, built: Any, ctx: Any) -> MethodRun:
        problems = known_problems(built)
        if problems:
            raise problems[0]
        return MethodRun(Hooks())
