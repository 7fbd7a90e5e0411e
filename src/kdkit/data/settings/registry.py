"""The setting registry: a *setting* turns a dataset into a data scenario (few labels, a long tail, new classes, ...).

A recipe picks one with ``data.setting: {name: NAME, seed: S, PARAM: VALUE, ...}``; it is applied to the training
split the recipe's data gives (after ``data.subset``), deterministically from ``seed``. A setting is a function
``build(data, *, seed, **params) -> ImageData`` whose keyword parameters, typed with their bounds, are the recipe's
(validated like a loss's). Unlabelled samples carry :data:`kdkit.data.base.UNLABELLED`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from kdkit.data.base import ImageData
from kdkit.params import check_params
from kdkit.registry import Registry

SettingBuild = Callable[..., ImageData]
#: Parameters kdkit fills in (never set in the recipe): the dataset, the seed, and the teacher's logits on the
#: training images for a setting that ranks samples by them.
FILLED = ("data", "seed", "teacher_logits")


def _never(params: Mapping[str, Any]) -> bool:
    return False


def _no_old_model(params: Mapping[str, Any]) -> int | None:
    return None


@dataclass(frozen=True)
class Setting:
    """A registered setting.

    Attributes:
        build: ``build(data, *, seed, **params)`` (plus ``teacher_logits=`` when :attr:`reads_teacher` says so).
        reads_teacher: Whether the setting, with these recipe parameters, ranks the training images by a frozen
            teacher's logits (then the recipe needs ``teacher:``, and the planner passes ``teacher_logits``).
        tasks: The tasks whose targets the setting builds (empty: any task).
        old_model: The number of classes of the previous model the setting's step needs as ``teacher:``
            (``teacher.classes``), or ``None`` when it needs none (a class-incremental step 2 needs step 1's).
    """

    build: SettingBuild
    reads_teacher: Callable[[Mapping[str, Any]], bool] = _never
    tasks: tuple[str, ...] = ()
    old_model: Callable[[Mapping[str, Any]], int | None] = _no_old_model


SETTINGS: Registry[Setting] = Registry("setting", fix="run `kdkit ls settings`")


def register_setting(name: str, help: str | None = None, *,
                     reads_teacher: Callable[[Mapping[str, Any]], bool] | None = None,
                     tasks: tuple[str, ...] = (),
                     old_model: Callable[[Mapping[str, Any]], int | None] | None = None,
                     ) -> Callable[[SettingBuild], SettingBuild]:
    """Register a setting function under ``name`` (``data.setting.name``); returns the function unchanged.

    Args:
        name: Recipe name.
        help: One line for ``kdkit ls settings`` (default: the docstring's first line).
        reads_teacher: See :attr:`Setting.reads_teacher` (default: never).
        tasks: See :attr:`Setting.tasks` (default: any task).
        old_model: See :attr:`Setting.old_model` (default: none needed).
    """

    def deco(build: SettingBuild) -> SettingBuild:
        summary = help or (build.__doc__ or "").strip().split("\n")[0]
        SETTINGS.add(name, Setting(build, reads_teacher or _never, tasks, old_model or _no_old_model), summary)
        return build

    return deco


def check_setting(name: str, params: Mapping[str, Any], where: str = "data.setting") -> dict[str, Any]:
    """The validated recipe parameters of setting ``name`` (unknown names, types and bounds are errors).

    Raises:
        KdkitError: An unknown setting (closest names first) or parameter; RecipeErrors for several problems.
    """
    setting = SETTINGS.get(name, where=f"{where}.name")
    return check_params(setting.build, dict(params), skip=FILLED, where=where, what=f"setting {name!r}")


def apply_setting(data: ImageData, name: str, params: Mapping[str, Any], seed: int,
                  teacher_logits: Tensor | None = None) -> ImageData:
    """``data`` turned into setting ``name`` with recipe ``params`` (validated here) and ``seed``.

    Args:
        data: The dataset (its training split is what the setting draws from).
        name: Registered setting.
        params: Its recipe parameters.
        seed: Seed of every random choice the setting makes.
        teacher_logits: ``(N, K)`` logits of a frozen teacher on ``data``'s training images, for a setting that
            reads them (:attr:`Setting.reads_teacher`).

    Raises:
        KdkitError: Bad parameters, or parameters the data cannot serve (e.g. more labels than images).
    """
    checked = check_setting(name, params)
    setting = SETTINGS.get(name)
    extra = {"teacher_logits": teacher_logits} if setting.reads_teacher(checked) else {}
    return setting.build(data, seed=seed, **checked, **extra)
