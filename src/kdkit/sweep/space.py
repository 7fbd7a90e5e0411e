"""The sweep file: which recipe keys to tune and how, the objective, the budget and the sampler.

Everything here is checked before any trial runs: a key the recipe does not have, a range of the wrong type
or upside down, a value the recipe's schema refuses at either end of a range, an empty space, a budget of 0,
an unknown sampler or mode, and a storage URL that cannot be opened (:func:`open_storage`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from kdkit.build import resolved_terms
from kdkit.errors import KdkitError
from kdkit.recipe import Recipe, recipe_from_dict, set_by_path
from kdkit.schema import Strict, read_yaml
from kdkit.task import TASKS

SAMPLERS = ("tpe", "gp", "random")
MODES = ("plain", "boss")
DIRECTIONS = ("maximize", "minimize")
DOCS = "see docs/sweep.md"


class ParamSpec(Strict):
    """One tuned key: a range (``low``, ``high``, optional ``log``/``step``) or a list of ``choices``."""

    low: float | int | None = None
    high: float | int | None = None
    log: bool = Field(False, description="sample the range on a log scale (low > 0)")
    step: float | int | None = Field(None, gt=0, description="grid step of the range")
    choices: list[Any] | None = Field(None, description="the values to choose from (any YAML scalars)")

    @model_validator(mode="after")
    def _range_or_choices(self) -> ParamSpec:
        ranged = self.low is not None or self.high is not None
        if self.choices is not None and (ranged or self.log or self.step is not None):
            raise ValueError("give either `choices:` or a range (`low:`, `high:`), not both")
        if self.choices is None and (self.low is None or self.high is None):
            raise ValueError("a range needs both `low:` and `high:` (or give `choices:`)")
        if self.choices is not None and not self.choices:
            raise ValueError("`choices:` is empty; list at least one value")
        return self


class BossSpec(Strict):
    """BOSS mode (Bayesian Optimization meets Self-Distillation): later trials start from and distil from
    the best earlier ones."""

    startup: int = Field(2, ge=1, description="finished trials trained from scratch before BOSS starts")
    k: int = Field(2, ge=1, description="teachers: the best k finished trials' networks")
    weight: float = Field(1.0, gt=0, description="total weight of the self-distillation terms (MSE to each "
                          "teacher's logits, weight/k each: the gradient of MSE to the teachers' mean logits)")
    init: bool = Field(True, description="initialise the student from the best finished trial's weights")


class SweepSpec(Strict):
    """A sweep file (``kdkit sweep RECIPE SWEEP``)."""

    space: dict[str, ParamSpec] = Field(..., description="recipe keys by dotted path, as in `kdkit run` "
                                        "overrides (train.optimizer.lr, distill.0.temperature)")
    objective: str | None = Field(None, description="the metric to optimise (default: the recipe's "
                                  "train.best_metric, else the task's best metric, e.g. top1)")
    direction: str = "maximize"
    trials: int = Field(20, description="finished trials wanted (the budget)")
    sampler: str = "tpe"
    startup: int = Field(10, ge=0, description="trials tpe and gp draw at random before they model the finished "
                         "ones (Optuna's n_startup_trials, default 10: lower it for budgets of a few tens of trials)")
    seed: int = Field(0, description="seed of the sampler and of the validation split")
    storage: str | None = Field(None, description="Optuna storage URL (default: sqlite file sweep.db in the output "
                                "folder; postgresql:// or mysql:// URLs are passed to Optuna as they are)")
    validation: float = Field(0.1, gt=0, lt=1, description="share of the training images held out to score trials")
    mode: str = "plain"
    boss: BossSpec = Field(default_factory=BossSpec)
    study: str | None = Field(None, description="Optuna study name (default: derived from the recipe and space)")


@dataclass(frozen=True)
class Param:
    """A checked tuned key."""

    key: str
    spec: ParamSpec
    kind: str  # "int", "float" or "choice"

    def suggest(self, trial: Any) -> Any:
        """Draw this key's value from an Optuna trial."""
        s = self.spec
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, s.choices)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(s.low), int(s.high), step=int(s.step or 1), log=s.log)
        return trial.suggest_float(self.key, float(s.low), float(s.high), step=s.step, log=s.log)


def load_sweep(path: str | Path, replace: dict[str, Any] | None = None) -> SweepSpec:
    """Read and validate a sweep file; ``replace`` (the command line's ``--trials``, ``--sampler``, ``--mode``)
    replaces its keys of those names.

    Raises:
        KdkitError: Missing file, bad YAML, a schema problem, an unknown sampler/mode/direction, an empty space or
            a budget below 1.
    """
    file = Path(path)
    if not file.is_file():
        raise KdkitError(f"no sweep file {str(path)!r}", fix="give the path of a SWEEP.yaml (e.g. "
                         "recipes/fashion_mnist/sweep_kd.yaml)")
    try:
        data = read_yaml(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise KdkitError(f"{file} is not valid YAML: {exc}", fix="fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise KdkitError(f"{file} must hold a mapping of sweep keys, got {type(data).__name__}", fix=DOCS)
    data.update({key: value for key, value in (replace or {}).items() if value is not None})
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, file) from None
    _check_names(spec, file)
    return spec


def _first_error(exc: ValidationError, file: Path) -> KdkitError:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "sweep"
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        fields = ParamSpec.model_fields if "space" in where else \
            BossSpec.model_fields if where.startswith("boss") else SweepSpec.model_fields
        return KdkitError(f"{file}: unknown key {key!r}", bad=key, choices=list(fields), where=where,
                          fix="remove it or correct its spelling")
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return KdkitError(f"{file}: {err['msg']}{shown}", where=where, fix=DOCS)


def _check_names(spec: SweepSpec, file: Path) -> None:
    for key, value, choices in (("sampler", spec.sampler, SAMPLERS), ("mode", spec.mode, MODES),
                                ("direction", spec.direction, DIRECTIONS)):
        if value not in choices:
            raise KdkitError(f"{file}: unknown {key} {value!r}", bad=value, choices=choices, where=key,
                             fix=f"set {key}: to one of the choices")
    if not spec.space:
        raise KdkitError(f"{file}: the search space is empty", where="space",
                         fix="name at least one recipe key, e.g. space: {train.optimizer.lr: {low: 0.01, high: 0.2, "
                         "log: true}}")
    if spec.trials < 1:
        raise KdkitError(f"{file}: a budget of {spec.trials} trials runs nothing", where="trials",
                         fix="set trials: (or --trials) to 1 or more")


def recipe_keys(recipe: Recipe) -> dict[str, Any]:
    """Every tunable leaf of ``recipe`` by dotted path, with its current value: the schema's keys (defaults
    included) and each distillation term's loss parameters (defaults included)."""
    keys: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
            for i, v in enumerate(node):
                walk(v, f"{prefix}.{i}")
        elif prefix:
            keys[prefix] = node

    walk(recipe.model_dump(mode="json"), "")
    for i, term in enumerate(resolved_terms(recipe)):
        for name, value in term["params"].items():
            keys.setdefault(f"distill.{i}.{name}", value)
    return keys


def check_space(spec: SweepSpec, recipe: Recipe, where: str = "space") -> list[Param]:
    """The tuned keys, checked against ``recipe``: each exists, a range fits the key's type and runs low to high,
    and the recipe's schema accepts both ends of every range and every choice.

    Raises:
        KdkitError: The first problem, naming the key, the valid keys or values (closest first) and the fix.
    """
    keys = recipe_keys(recipe)
    base = recipe.to_dict()
    params = []
    for key, ps in spec.space.items():
        at = f"{where}.{key}"
        if key not in keys:
            raise KdkitError(f"{key!r} is not a key of recipe {recipe.name!r}", bad=key, choices=list(keys),
                             where=at, fix="use the dotted path of a recipe key, as in `kdkit run` overrides")
        kind = _kind(key, ps, keys[key], at, base)
        for value in (ps.choices if ps.choices is not None else [ps.low, ps.high]):
            _accepted(base, key, value, at)
        params.append(Param(key, ps, kind))
    return params


def _kind(key: str, ps: ParamSpec, current: Any, at: str, base: dict[str, Any]) -> str:
    if ps.choices is not None:
        return "choice"
    ends = (ps.low, ps.high)
    if any(isinstance(v, bool) for v in ends) or (current is not None and (isinstance(current, bool)
                                                                         or not isinstance(current, int | float))):
        raise KdkitError(f"{key!r} holds {current!r} ({type(current).__name__}); a range needs a number key",
                         where=at, fix=f"use choices: [...] for {key}")
    integral = isinstance(current, int) and _refusal(base, key, float(current) + 0.5) is not None
    if integral and not all(isinstance(v, int) for v in ends):  # an int in the recipe may be a float key (T: 4)
        raise KdkitError(f"{key!r} is an integer ({current!r}) but the range is low={ps.low!r}, high={ps.high!r}",
                         where=at, fix="give integer low and high")
    if ps.low > ps.high:
        raise KdkitError(f"range of {key!r} runs from low={ps.low!r} down to high={ps.high!r}", where=at,
                         fix="swap low and high")
    if ps.log and ps.low <= 0:
        raise KdkitError(f"a log range of {key!r} needs low > 0, got {ps.low!r}", where=at,
                         fix="set low to a positive value, or log: false")
    return "int" if integral or (current is None and all(isinstance(v, int) for v in ends)) else "float"


def _accepted(base: dict[str, Any], key: str, value: Any, at: str) -> None:
    """The recipe accepts ``key = value`` (one end of a range, or a choice)."""
    refusal = _refusal(base, key, value)
    if refusal is not None:
        raise KdkitError(f"the recipe refuses {key}={value!r}: {refusal.render()}", where=at,
                         fix=f"keep the values of {key} within what the recipe accepts")


def _refusal(base: dict[str, Any], key: str, value: Any) -> KdkitError | None:
    """Why the recipe's schema or its terms' losses refuse ``key = value`` (``None``: accepted)."""
    data = copy.deepcopy(base)
    set_by_path(data, key, value)
    try:
        resolved_terms(recipe_from_dict(data))  # the losses check their parameters' types and bounds
    except KdkitError as exc:
        return exc
    return None


def check_objective(chosen: str | None, recipe: Recipe, where: str = "objective") -> str:
    """The metric trials are scored by: ``chosen``, else the recipe's ``train.best_metric``, else the task's
    best metric; it must be one that can pick a best epoch (every task metric but ``loss``)."""
    task = TASKS.get(recipe.task, where="task")
    valid = task.selectable(None)
    objective = chosen or recipe.train.best_metric or task.best
    if objective not in valid:
        raise KdkitError(f"objective {objective!r} is not a metric of task {recipe.task!r} that picks a best epoch",
                         bad=objective, choices=valid, where=where, fix=f"set {where}: to one of the choices")
    return objective


def open_storage(url: str) -> Any:
    """Open (creating its tables) the Optuna storage at ``url``.

    Raises:
        KdkitError: The URL names no database kdkit can open (bad scheme, missing folder, no server, no driver).
    """
    import optuna

    try:
        return optuna.storages.RDBStorage(url)
    except Exception as exc:  # SQLAlchemy/driver errors of every kind mean the same thing here
        raise KdkitError(f"storage {shown_url(url)!r} cannot be opened: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}", where="storage",
                         fix="give a reachable database URL (sqlite:///path/sweep.db in an existing folder, "
                         "postgresql://user@host/db, mysql://...), or leave storage out for OUT/sweep.db") from None


def shown_url(url: str) -> str:
    """``url`` with its password hidden (it is printed and written to sweep.json)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: nothing to hide
        return url
