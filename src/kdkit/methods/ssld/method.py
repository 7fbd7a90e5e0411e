"""SSLD as a registered method: recognised from its ``ssld`` term; the recipes it refuses and why."""

from __future__ import annotations

from typing import Any

from kdkit.method import Method, MethodRun, register_method

LOSS = "ssld"


@register_method
class SSLDMethod(Method):
    """SSLD (Cui et al., 2021): label-free distillation, the teacher's softmax as the only supervision."""

    name = "ssld"

    def active(self, recipe: Any) -> bool:
        return any(t.loss == LOSS for t in recipe.distill)

    def check(self, recipe: Any) -> list[str]:
        problems = []
        if recipe.train.ce_weight:
            problems.append(f"SSLD distils without labels (the teacher's softmax is the only supervision, so "
                            f"unlabelled images teach like labelled ones): train.ce_weight is "
                            f"{recipe.train.ce_weight:g}; set train.ce_weight: 0")
        if not recipe.has_teacher:
            problems.append("SSLD distils a teacher: teacher: None; give `teacher:`")
        if recipe.peers is not None:
            problems.append("SSLD trains one student against a frozen teacher: remove `peers:`")
        others = sorted({t.loss for t in recipe.distill if t.loss != LOSS})
        if others:
            problems.append(f"SSLD's objective is the ssld term alone: the recipe also has {others}; remove them")
        return problems

    def attach(self, built: Any, ctx: Any) -> MethodRun | None:
        return None
