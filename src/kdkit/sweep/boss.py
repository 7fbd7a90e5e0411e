"""BOSS mode: "Bayesian Optimization Meets Self-Distillation" (Lee et al., ICCV 2023), as recipe edits.

Once ``boss.startup`` trials have finished, each new trial's recipe (the sampler's hyperparameters, as in plain
mode) is changed so that it

* initialises its student from the best finished trial's weights (``model.checkpoint``: that run folder), and
* distils from the best ``boss.k`` finished trials' networks, frozen: each becomes a named teacher
  (``teachers.trialN``, the trained architecture, its run folder as checkpoint) with one term
  ``{loss: mse, student: logits, teacher: trialN.logits, weight: boss.weight / k}``. The gradient of their sum is
  that of ``boss.weight`` x MSE to the teachers' mean logits, the paper's self-distillation loss next to the
  recipe's own ``train.ce_weight`` x CE.

The recipe's own teacher (``teacher:``) stays, renamed ``teachers.teacher``, and its terms name it
(``teacher.TAP``), so they read it alone and not the mean of every teacher.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from kdkit.errors import KdkitError
from kdkit.losses import LOSSES
from kdkit.recipe import Recipe
from kdkit.sweep.space import BossSpec

#: Prefix of the teachers BOSS adds (``trialN``).
TEACHER_PREFIX = "trial"


def check_boss(recipe: Recipe) -> None:
    """Refuse recipes BOSS cannot add teachers to (before any trial runs).

    Raises:
        KdkitError: The recipe names several teachers (``teachers:``), or caches its teacher's outputs (a cache
            holds one teacher's outputs and the BOSS teachers change every trial).
    """
    if recipe.teachers is not None:
        raise KdkitError(f"mode boss adds teachers to recipe {recipe.name!r}, which already names several "
                         f"({', '.join(recipe.teachers)}) whose terms may read their mean logits", where="mode",
                         fix="use mode: plain, or a recipe with one `teacher:` or none")
    if recipe.teacher is not None and recipe.teacher.cache is not None:
        raise KdkitError("mode boss runs the earlier trials' networks as teachers; teacher.cache stores one "
                         "teacher's outputs", where="mode", fix="remove teacher.cache from the recipe, or use "
                         "mode: plain")


def boss_recipe(data: dict[str, Any], init: Path, teachers: list[tuple[int, Path]], spec: BossSpec) -> dict[str, Any]:
    """``data`` (a trial's recipe) made a BOSS trial.

    Args:
        data: The trial's recipe, as plain data.
        init: Run folder of the best finished trial (the student's initial weights).
        teachers: ``(trial number, run folder)`` of the best ``k`` finished trials, best first.
        spec: The sweep's ``boss:`` settings.
    """
    data = copy.deepcopy(data)
    model = data["model"]
    if spec.init:
        model["checkpoint"] = str(init)
    named: dict[str, Any] = {}
    if data.get("teacher") is not None:
        named["teacher"] = data.pop("teacher")
        for term in data.get("distill") or []:
            term["teacher"] = _name_taps(term.get("teacher"), term["loss"])
    for number, run_dir in teachers:
        named[f"{TEACHER_PREFIX}{number}"] = {"arch": model["arch"], "params": copy.deepcopy(model.get("params", {})),
                                              "checkpoint": str(run_dir)}
    data["teachers"] = named
    data["distill"] = [*(data.get("distill") or []), *(
        {"loss": "mse", "student": "logits", "teacher": f"{TEACHER_PREFIX}{number}.logits",
         "weight": spec.weight / len(teachers), "name": f"boss_{TEACHER_PREFIX}{number}"}
        for number, _ in teachers)]
    return data


def _name_taps(taps: str | list[str] | None, loss: str) -> str | list[str]:
    """A term's teacher taps of the one teacher, as ``teacher.TAP`` (the loss's default tap when unset)."""
    if taps is None:
        taps = LOSSES.get(loss).default_teacher_tap
    if isinstance(taps, str):
        return f"teacher.{taps}"
    return [f"teacher.{tap}" for tap in taps]
