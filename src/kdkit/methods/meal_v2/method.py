"""MEAL V2 as a registered method: recognised from its discriminator term; the recipes it refuses and why.

The similarity term (``multi_teacher_kd`` at temperature 1, or ``kd`` with one teacher) is the recipe's to give; a
recipe without one trains on the discriminator alone (an ablation), which is allowed.
"""

from __future__ import annotations

from typing import Any

from kdkit.method import Method, MethodRun, register_method

LOSS = "meal_v2_discriminator"


@register_method
class MealV2Method(Method):
    """MEAL V2 (Shen & Savvides, 2020): the teachers' averaged softmax as the only supervision, plus a discriminator."""

    name = "meal_v2"

    def active(self, recipe: Any) -> bool:
        return any(t.loss == LOSS for t in recipe.distill)

    def check(self, recipe: Any) -> list[str]:
        problems = []
        teachers = len(recipe.teachers or {}) + (recipe.teacher is not None)
        if not teachers:
            problems.append(f"MEAL V2 distils an ensemble of teachers: teachers: {recipe.teachers!r}, teacher: None; "
                            "give `teachers:` (at least one, by name) or `teacher:`")
        if recipe.train.ce_weight:
            problems.append(f"MEAL V2 uses no hard labels (the teachers' averaged softmax is the only supervision): "
                            f"train.ce_weight is {recipe.train.ce_weight:g}; set train.ce_weight: 0")
        if recipe.peers is not None:
            problems.append("MEAL V2 trains one student against its teachers: remove `peers:`")
        return problems

    def attach(self, built: Any, ctx: Any) -> MethodRun | None:
        return None
