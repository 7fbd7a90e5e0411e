"""BYOT as a registered method: recognised from its terms; the recipes it refuses and why."""

from __future__ import annotations

from typing import Any

from kdkit.method import Method, MethodRun, register_method

LOSS = "byot"
BRIDGE = "byot_head"


@register_method
class ByotMethod(Method):
    """Be Your Own Teacher (Zhang et al., ICCV 2019): shallow classifiers distilled from the model's deepest one."""

    name = "byot"

    def active(self, recipe: Any) -> bool:
        return any(t.loss == LOSS or t.bridge == BRIDGE for t in recipe.distill)

    def check(self, recipe: Any) -> list[str]:
        problems = []
        if not recipe.train.ce_weight:
            problems.append("BYOT's teacher is the model's own (deepest) classifier, trained by train.ce_weight; with "
                            "0 it never learns and the shallow classifiers distil an untrained one: set "
                            "train.ce_weight to 1 - alpha (0.9 with alpha 0.1)")
        if recipe.peers is not None:
            problems.append("BYOT distils a network into its own shallow classifiers: remove `peers:`")
        for i, term in enumerate(recipe.distill):  # (the loss without the bridge: refused by its `requires_bridge`)
            if term.bridge == BRIDGE and term.loss != LOSS:
                problems.append(f"distill.{i}: the `{BRIDGE}` bridge feeds the `{LOSS}` loss, got loss {term.loss!r}; "
                                f"set `loss: {LOSS}`")
        return problems

    def attach(self, built: Any, ctx: Any) -> MethodRun | None:
        return None
