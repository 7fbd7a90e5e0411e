"""The sweep loop: Optuna proposes, each trial is an ordinary run in ``OUT/trials/<number>/``, scored on a
validation split carved from the training set.

Resuming loses nothing: every trial is recorded in the Optuna storage (SQLite ``OUT/sweep.db`` by default) with
its full recipe. Rerunning the same command reuses the study; a trial left RUNNING by a process that died (same
host, its process gone) is *resumed* under its own number from its run folder's latest checkpoint
(:func:`kdkit.runner.run_or_continue`), with its recorded recipe, so its parameters and finished epochs are kept
(re-enqueueing a copy would redo its epochs and give it a new number). The budget counts finished trials.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

from kdkit.build import plan
from kdkit.recipe import Recipe, find_recipe, load_recipe, recipe_from_dict, set_by_path
from kdkit.sweep.boss import boss_recipe, check_boss
from kdkit.sweep.output import write_outputs
from kdkit.sweep.space import Param, SweepSpec, check_objective, check_space, load_sweep, shown_url
from kdkit.sweep.trials import TrialLoop, open_study, require_optuna, trial_base


def run_sweep(recipe_path: str | Path, sweep_path: str | Path, overrides: list[str] | None = None, *,
              out: str | Path | None = None, trials: int | None = None, sampler: str | None = None,
              mode: str | None = None) -> dict[str, Any]:
    """Run (or continue) a sweep and return the content of ``OUT/sweep.json``.

    Args:
        recipe_path: The recipe to tune (a path or shipped name).
        sweep_path: The sweep file (:class:`~kdkit.sweep.space.SweepSpec`).
        overrides: ``key=value`` overrides of the recipe (as ``kdkit run`` takes), applied before the sweep's values.
        out: Output folder (default ``runs/sweep_<recipe name>``).
        trials: Budget of finished trials, replacing the sweep file's ``trials``.
        sampler: Replaces the sweep file's ``sampler`` (``tpe``, ``gp``, ``random``).
        mode: Replaces the sweep file's ``mode`` (``plain``, ``boss``).

    Raises:
        KdkitError: Any bad input (sweep file, space, objective, storage, recipe), before a trial runs.
    """
    require_optuna()  # before any other check: without it nothing can run
    source = find_recipe(recipe_path)
    recipe = load_recipe(source, overrides)
    spec = load_sweep(sweep_path, {"trials": trials, "sampler": sampler, "mode": mode})
    params = check_space(spec, recipe)
    objective = check_objective(spec.objective, recipe)
    if spec.mode == "boss":
        check_boss(recipe)
    folder = Path(out or f"runs/sweep_{recipe.name}").resolve()
    base = trial_base(recipe, source, validation=spec.validation, seed=spec.seed, objective=objective)
    plan(recipe_from_dict(base), training=False, source=source)  # names, taps, shapes, files: before any trial
    name = spec.study or study_name(recipe, base, spec)
    url = spec.storage or f"sqlite:///{folder / 'sweep.db'}"
    with open_study(folder, name, url, command="sweep", direction=spec.direction) as (study, storage):
        # a sampler seeded by the history: a restart must not replay the random draws of the first start
        study.sampler = make_sampler(spec.sampler, spec.seed + len(study.trials), spec.startup)
        header = {"study": name, "storage": shown_url(url), "recipe": str(source), "sweep": str(sweep_path),
                  "objective": objective, "direction": spec.direction, "budget": spec.trials,
                  "sampler": spec.sampler, "startup": spec.startup, "seed": spec.seed, "validation": spec.validation,
                  "mode": spec.mode,
                  "boss": spec.boss.model_dump() if spec.mode == "boss" else None, "out": str(folder)}
        original = recipe.to_dict()
        Sweep(study, storage, spec, params, base, folder, objective, url=url, header=header, original=original).run()
        return write_outputs(folder, header, study, original)


def make_sampler(name: str, seed: int, startup: int) -> Any:
    """The Optuna sampler ``name`` (``tpe``, ``gp`` or ``random``) seeded with ``seed``; tpe and gp draw the first
    ``startup`` trials at random."""
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    modelled = {"tpe": optuna.samplers.TPESampler, "gp": optuna.samplers.GPSampler}[name]
    return modelled(seed=seed, n_startup_trials=startup)


def study_name(recipe: Recipe, base: dict[str, Any], spec: SweepSpec) -> str:
    """``<recipe>-<hash>`` of the trial recipe and the sweep file without its budget: the same command finds its
    study again, and a larger ``--trials`` extends it."""
    blob = json.dumps([recipe_from_dict(base).digest(), spec.model_dump(mode="json", exclude={"trials"})],
                      sort_keys=True)
    return f"{recipe.name}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


class Sweep(TrialLoop):
    """A sweep's trial loop: Optuna's sampler draws each trial's values (see :class:`TrialLoop`)."""

    def __init__(self, study: Any, storage: Any, spec: SweepSpec, params: list[Param], base: dict[str, Any],
                 folder: Path, objective: str, *, url: str, header: dict[str, Any], original: dict[str, Any]) -> None:
        super().__init__(study, storage, folder, objective, budget=spec.trials, label="sweep",
                         local=url == f"sqlite:///{folder / 'sweep.db'}")
        self.spec, self.params, self.base = spec, params, base
        self.header, self.original = header, original

    def recover(self, trial: Any) -> dict[str, Any] | None:
        """A trial that died between the draw and the record: its recipe follows from the recorded draws."""
        if set(trial.params) != {p.key for p in self.params}:
            return None
        return self.recipe_of(trial.number, dict(trial.params), self.storage, trial._trial_id)

    def new_trial(self) -> None:
        trial = self.study.ask()
        trial.set_user_attr("owner", self.owner)
        values = {p.key: p.suggest(trial) for p in self.params}
        data = self.recipe_of(trial.number, values, self.storage, trial._trial_id)
        self.train(trial.number, trial._trial_id, data)

    def recipe_of(self, number: int, values: dict[str, Any], storage: Any, tid: int) -> dict[str, Any]:
        """Trial ``number``'s recipe (the base and ``values``; in BOSS mode, from the best finished trials),
        recorded in the storage before it trains."""
        data = copy.deepcopy(self.base)
        for key, value in values.items():
            set_by_path(data, key, value)
        run_dir = self.trial_dir(number)
        data["name"] = f"{data['name']}_trial{number}"
        data["output"]["dir"] = str(run_dir)
        sources = self.boss_sources()
        if sources is not None:
            init, teachers = sources
            data = boss_recipe(data, init[1], teachers, self.spec.boss)
            storage.set_trial_user_attr(tid, "boss", {"init": init[0], "teachers": [n for n, _ in teachers]})
        storage.set_trial_user_attr(tid, "run_dir", str(run_dir))
        storage.set_trial_user_attr(tid, "recipe", data)
        return data

    def boss_sources(self) -> tuple[tuple[int, Path], list[tuple[int, Path]]] | None:
        """BOSS mode, once ``boss.startup`` trials finished: the best finished trial (initial weights) and the best
        ``boss.k`` (teachers), as ``(number, run folder)``."""
        if self.spec.mode != "boss":
            return None
        done = self.finished()
        if len(done) < self.spec.boss.startup:
            return None
        sign = -1 if self.spec.direction == "maximize" else 1
        ranked = sorted(done, key=lambda t: (sign * t.value, t.number))
        picked = [(t.number, Path(t.user_attrs["run_dir"])) for t in ranked[:self.spec.boss.k]]
        return picked[0], picked

    def write(self) -> None:
        write_outputs(self.folder, self.header, self.study, self.original)
