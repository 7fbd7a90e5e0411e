"""``kdkit search SPACE.yaml``: find a distiller for the space's base recipe, each candidate scored by a proxy run.

Each trial is an ordinary run (``OUT/trials/<number>/``) of the base recipe with the candidate as its ``distill:``,
``search.proxy.epochs`` epochs, scored on a validation split of its training images (the test split is never read
by a trial; only ``kdkit run OUT/best.yaml`` touches it). With ``proxy.cache`` (the default) every trial reads the
teacher from one cache of ``epochs`` stored views holding every teacher tap of the space's pairs, so the teacher
runs once per search. Trials are recorded in an Optuna storage (``OUT/search.db`` by default) with their distiller
and recipe before they train, and the strategy rebuilds its state from that record, so a search stopped at any
moment (``kill -9`` included) continues where it stopped when the same command is run again
(:class:`kdkit.sweep.trials.TrialLoop`).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

from kdkit.build import plan
from kdkit.errors import KdkitError
from kdkit.grammar.space import BoundSpace, SearchSettings, load_space, pair_shapes
from kdkit.recipe import Recipe, load_recipe, recipe_from_dict
from kdkit.search.actions import Decisions, candidate_of, candidate_record
from kdkit.search.output import write_outputs
from kdkit.search.strategies import STRATEGIES, Tried, propose
from kdkit.sweep.space import check_objective, shown_url
from kdkit.sweep.trials import TrialLoop, open_study, require_optuna, trial_base

STRATEGY_CHOICES = tuple(STRATEGIES)


def run_search(space_path: str | Path, overrides: list[str] | None = None, *, out: str | Path | None = None,
               trials: int | None = None, strategy: str | None = None) -> dict[str, Any]:
    """Run (or continue) a search and return the content of ``OUT/search.json``.

    Args:
        space_path: The ``SPACE.yaml`` (:class:`~kdkit.grammar.space.SearchSpaceSpec`).
        overrides: ``key=value`` overrides of the base recipe (as ``kdkit run`` takes), e.g. a teacher checkpoint.
        out: Output folder (default ``runs/search_<space file name>_<strategy>``).
        trials: Budget of finished trials, replacing ``search.trials``.
        strategy: ``mcts``, ``evolution`` or ``random``, replacing ``search.strategy``.

    Raises:
        KdkitError: Any bad input (space, budget, strategy, storage, base recipe), before a trial runs.
    """
    require_optuna()  # before any other check: without it nothing can run
    spec, source = load_space(space_path)
    settings = _settings(spec.search, trials, strategy)
    recipe = load_recipe(source, overrides)
    shape = plan(recipe, training=False, source=source).shape  # the base recipe is checked whole first
    space = BoundSpace(spec, pair_shapes(spec, recipe, (shape.num_classes, shape.in_channels, shape.image_size)),
                       source=str(space_path))
    objective = check_objective(settings.objective, recipe, where="search.objective")
    base = proxy_base(recipe, source, space, settings, objective)
    # names, taps, shapes, files and the cache's taps, checked on one candidate before any trial
    plan(recipe_from_dict({**base, "distill": space.sample(settings.seed).to_distill()}), training=False,
         source=source)
    folder = Path(out or f"runs/search_{Path(space_path).stem}_{settings.strategy}").resolve()
    name = settings.study or study_name(recipe, base, spec.model_dump(mode="json"), settings)
    url = settings.storage or f"sqlite:///{folder / 'search.db'}"
    with open_study(folder, name, url, command="search", direction="maximize") as (study, storage):
        header = {"study": name, "storage": shown_url(url), "space": str(space_path), "recipe": str(source),
                  "objective": objective, "strategy": settings.strategy, "budget": settings.trials,
                  "seed": settings.seed, "proxy": settings.proxy.model_dump(), "space_size": space.size(),
                  "cores": len(space.cores), "out": str(folder)}
        original = recipe.to_dict()
        Search(study, storage, space, settings, base, folder, objective, url=url, header=header,
               original=original).run()
        return write_outputs(folder, header, study, original, space)


def _settings(settings: SearchSettings, trials: int | None, strategy: str | None) -> SearchSettings:
    """``search:`` with the command line's ``--trials`` and ``--strategy``."""
    if trials is not None and trials < 1:
        raise KdkitError(f"a budget of {trials} trials searches nothing", bad=str(trials), where="--trials",
                         fix="give --trials 1 or more")
    if strategy is not None and strategy not in STRATEGY_CHOICES:
        raise KdkitError(f"unknown search strategy {strategy!r}", bad=strategy, choices=list(STRATEGY_CHOICES),
                         where="--strategy", fix="use mcts (Auto-KD), evolution (KD-Zero) or random")
    update = {k: v for k, v in (("trials", trials), ("strategy", strategy)) if v is not None}
    return settings.model_copy(update=update)


def proxy_base(recipe: Recipe, source: Path, space: BoundSpace, settings: SearchSettings,
               objective: str) -> dict[str, Any]:
    """The recipe every trial starts from: the base recipe on the validation split for ``proxy.epochs`` epochs (its
    lr warm-up shortened in proportion) and, with ``proxy.cache``, a teacher cache of that many views holding every
    teacher tap of the space."""
    proxy = settings.proxy
    data = trial_base(recipe, source, validation=proxy.validation, seed=settings.seed, objective=objective)
    # the base schedule, shortened: its warm-up keeps its share of the run (3 of 30 epochs would be warm-up alone)
    epochs = data["train"]["epochs"]
    data["train"]["epochs"] = proxy.epochs
    schedule = data["train"]["schedule"]
    if schedule.get("warmup_steps"):
        schedule["warmup_steps"] = round(schedule["warmup_steps"] * proxy.epochs / epochs)
    if proxy.cache:
        taps = list(dict.fromkeys(pair.teacher for pair in space.spec.pairs))
        cache = dict(data["teacher"].get("cache") or {})
        cache.update({"views": proxy.epochs, "taps": taps})
        data["teacher"]["cache"] = cache
    return data


def study_name(recipe: Recipe, base: dict[str, Any], space: dict[str, Any], settings: SearchSettings) -> str:
    """``<recipe>-<strategy>-<hash>`` of the trial recipe, the space and the search settings without the budget:
    the same command finds its study again, and a larger ``--trials`` extends it."""
    blob = json.dumps([base, {k: v for k, v in space.items() if k != "search"},
                       settings.model_dump(mode="json", exclude={"trials"})], sort_keys=True)
    return f"{recipe.name}-{settings.strategy}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


class Search(TrialLoop):
    """A search's trial loop: the strategy proposes each trial's distiller from the trials so far."""

    def __init__(self, study: Any, storage: Any, space: BoundSpace, settings: SearchSettings, base: dict[str, Any],
                 folder: Path, objective: str, *, url: str, header: dict[str, Any], original: dict[str, Any]) -> None:
        super().__init__(study, storage, folder, objective, budget=settings.trials, label="search",
                         local=url == f"sqlite:///{folder / 'search.db'}")
        self.space, self.settings, self.base = space, settings, base
        self.decisions = Decisions(space)
        self.header, self.original = header, original

    def history(self) -> list[Tried]:
        """Finished and failed trials in number order, with their distillers (a failure's reward is None)."""
        import optuna

        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
        return [Tried(candidate_of(t.user_attrs["candidate"], self.space),
                      t.value if t.state == optuna.trial.TrialState.COMPLETE else None)
                for t in self.study.get_trials(deepcopy=False, states=states) if "candidate" in t.user_attrs]

    def new_trial(self) -> None:
        candidate = propose(self.space, self.decisions, self.history(), self.settings)
        trial = self.study.ask()
        tid = trial._trial_id
        trial.set_user_attr("owner", self.owner)
        data = copy.deepcopy(self.base)
        run_dir = self.trial_dir(trial.number)
        data["name"] = f"{data['name']}_search{trial.number}"
        data["output"]["dir"] = str(run_dir)
        data["distill"] = candidate.to_distill()
        self.storage.set_trial_user_attr(tid, "candidate", candidate_record(candidate, self.space))
        self.storage.set_trial_user_attr(tid, "run_dir", str(run_dir))
        self.storage.set_trial_user_attr(tid, "recipe", data)
        self.train(trial.number, tid, data)

    def describe(self, number: int) -> str:
        return self.study.trials[number].user_attrs["candidate"]["formula"]

    def write(self) -> None:
        write_outputs(self.folder, self.header, self.study, self.original, self.space)
