"""The trial loop shared by ``kdkit sweep`` and ``kdkit search``: each trial is an ordinary run in
``OUT/trials/<number>/`` whose recipe is recorded in an Optuna storage before it trains.

Resuming loses nothing: a trial left RUNNING by a process that died (same host, its process gone) is *resumed*
under its own number from its run folder's latest checkpoint (:func:`kdkit.runner.run_or_continue`) with its
recorded recipe, so its values and finished epochs are kept (re-enqueueing a copy would redo its epochs and give it
a new number). The budget counts finished trials. What a trial is (Optuna's draws, a searched distiller) is the
subclass's :meth:`TrialLoop.new_trial`; what is written after each trial is its :meth:`TrialLoop.write`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdkit.errors import KdkitError, TrainingDiverged
from kdkit.locks import exclusive
from kdkit.recipe import Recipe, find_recipe, recipe_from_dict, set_by_path
from kdkit.runner import run_or_continue
from kdkit.sweep.space import open_storage, shown_url

TRIALS = "trials"


def trial_base(recipe: Recipe, source: Path, *, validation: float, seed: int, objective: str) -> dict[str, Any]:
    """The recipe every trial starts from: ``recipe`` scored by ``objective`` on a class-balanced ``validation``
    share of its training split (split seed ``seed``), without progress bars, with its teachers' recipe paths made
    absolute (a trial's recipe lives in ``OUT/trials/N/``, not beside the original)."""
    data = recipe.to_dict()
    for name, teacher in recipe.frozen_teachers().items():
        if teacher.recipe is not None and teacher.checkpoint is None:
            key = recipe.teacher_key(name)
            path = find_recipe(teacher.recipe, relative_to=source.parent, where=f"{key}.recipe").resolve()
            set_by_path(data, f"{key}.recipe", str(path))
    data["data"]["validation"] = {"fraction": validation, "seed": seed}
    data["output"]["progress"] = False
    data["train"]["best_metric"] = objective
    return data


def same_study(folder: Path, name: str, command: str) -> None:
    """Refuse an output folder holding another ``command``'s study (``sweep``/``search``: its ``<command>.json``
    names the study), whose trial folders would be overwritten."""
    record = folder / f"{command}.json"
    if record.is_file():
        held = json.loads(record.read_text()).get("study")
        if held != name:
            raise KdkitError(f"{folder} holds {command} {held!r}, not {name!r} (another recipe, space or setting)",
                             where="--out", fix=f"give this {command} its own --out, or rerun the command that made it")


def require_optuna() -> Any:
    """The ``optuna`` module, or a KdkitError saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise KdkitError("kdkit sweep and kdkit search need Optuna, which is not installed",
                         fix="pip install 'kdkit[search]' (or optuna)") from None
    return optuna


@contextlib.contextmanager
def open_study(folder: Path, name: str, url: str, *, command: str, direction: str) -> Iterator[tuple[Any, Any]]:
    """Hold ``folder`` for this process and open (or create, to continue later) the Optuna study ``name`` in ``url``.

    Args:
        folder: The output folder (created); another process holding it, or another study's records in it, is
            refused.
        name: The study's name.
        url: The storage URL (``sqlite:///`` file, PostgreSQL or MySQL).
        command: ``sweep`` or ``search`` (names the folder's record ``<command>.json`` and the messages).
        direction: ``maximize`` or ``minimize``; a stored study created the other way is refused.

    Yields:
        ``(study, storage)``.
    """
    optuna = require_optuna()
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive(folder, what=f"{command} folder",
                   fix=f"wait for that {command}, stop it, or give this one its own --out"):
        same_study(folder, name, command)
        storage = open_storage(url)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(study_name=name, storage=storage, direction=direction, load_if_exists=True)
        if study.direction.name.lower() != direction:
            raise KdkitError(f"study {name!r} in {shown_url(url)} was created to {study.direction.name.lower()}",
                             where="direction", fix="keep its direction, or give a new `study:` name")
        yield study, storage


class TrialLoop:
    """One process's part of a study: resume its orphaned trials, then start new ones until ``budget`` trials have
    finished (or ``budget`` trials in a row failed).

    Args:
        study: The Optuna study (its storage records every trial).
        storage: The study's storage (user attributes are written through it, also for resumed trials).
        folder: The output folder (``folder/trials/<number>/`` are the runs).
        objective: The summary metric a trial is scored by (``best_<objective>``).
        budget: Finished trials wanted.
        local: Whether the storage is a file in ``folder``, which only this process (holding the folder's lock)
            writes: then a RUNNING trial no process has claimed yet is an orphan too.
        label: The command, prefixing progress lines (``sweep``, ``search``).
    """

    def __init__(self, study: Any, storage: Any, folder: Path, objective: str, *, budget: int, local: bool,
                 label: str) -> None:
        self.study, self.storage, self.folder, self.objective, self.budget = study, storage, folder, objective, budget
        self.local, self.label = local, label
        self.owner = {"host": socket.gethostname(), "pid": os.getpid()}
        self.failures = 0

    # -- what a subclass provides -------------------------------------------------------------------------------------

    def new_trial(self) -> None:
        """Ask the study for a trial, record its recipe (user attributes ``recipe`` and ``run_dir``) and
        :meth:`train` it."""
        raise NotImplementedError

    def recover(self, trial: Any) -> dict[str, Any] | None:
        """The recipe of an orphaned trial that died before its recipe was recorded, or None (it is then failed)."""
        return None

    def write(self) -> None:
        """Write the output folder's records (called after every trial)."""
        raise NotImplementedError

    # -- the loop -----------------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Resume every orphaned trial, then run new ones until ``budget`` trials are finished."""
        while True:
            if len(self.finished()) >= self.budget:
                return
            orphan = next(iter(self.orphans()), None)
            if orphan is not None:
                self.resume(orphan)
                continue
            if self.failures >= self.budget:
                print(f"{self.label}: stopping after {self.failures} failed trials in a row (see the records)",
                      file=sys.stderr)
                return
            self.new_trial()

    def finished(self) -> list[Any]:
        """The COMPLETE trials, in number order."""
        return self.study.get_trials(deepcopy=False, states=(_state("COMPLETE"),))

    def trial_dir(self, number: int) -> Path:
        """Trial ``number``'s run folder."""
        return self.folder / TRIALS / str(number)

    def orphans(self) -> list[Any]:
        """RUNNING trials whose process is gone: started on this host by a process that no longer exists, or
        (local storage only, which no other process writes) not yet claimed by any process."""
        found = []
        for t in self.study.get_trials(deepcopy=False, states=(_state("RUNNING"),)):
            owner = t.user_attrs.get("owner")
            if owner is None:
                if self.local:
                    found.append(t)
            elif owner["host"] == self.owner["host"] and owner["pid"] != self.owner["pid"] \
                    and not _alive(owner["pid"]):
                found.append(t)
        return found

    def resume(self, trial: Any) -> None:
        """Continue an orphaned trial under its own number from its run folder's checkpoint."""
        storage, tid = self.storage, trial._trial_id
        storage.set_trial_user_attr(tid, "owner", self.owner)
        data = trial.user_attrs.get("recipe") or self.recover(trial)
        if data is None:
            storage.set_trial_user_attr(tid, "error", "interrupted before its recipe was recorded")
            self.study.tell(trial.number, state=_state("FAIL"))
            return
        storage.set_trial_user_attr(tid, "resumed", trial.user_attrs.get("resumed", 0) + 1)
        print(f"{self.label}: resuming trial {trial.number} from {data['output']['dir']}", flush=True)
        self.train(trial.number, tid, data)

    def train(self, number: int, tid: int, data: dict[str, Any]) -> None:
        """Train (or continue, or reuse) trial ``number``'s run and record its value; a run that diverges or cannot
        be built is recorded as FAIL with its error, and the loop goes on."""
        storage = self.storage
        started = time.perf_counter()
        try:
            summary = run_or_continue(recipe_from_dict(data), progress=False)
        except (TrainingDiverged, KdkitError) as exc:
            self.failures += 1
            storage.set_trial_user_attr(tid, "error", str(exc))
            self.study.tell(number, state=_state("FAIL"))
            print(f"{self.label}: trial {number} failed: {exc}", file=sys.stderr, flush=True)
        else:
            self.failures = 0
            value = float(summary[f"best_{self.objective}"])
            storage.set_trial_user_attr(tid, "train_seconds", summary.get("train_seconds"))
            self.study.tell(number, value)
            print(f"{self.label}: trial {number}: validation {self.objective} {value:.4f} "
                  f"({time.perf_counter() - started:.1f} s) {self.describe(number)}", flush=True)
        self.write()

    def describe(self, number: int) -> str:
        """One line about trial ``number`` for the progress output (its parameters)."""
        return str(self.study.trials[number].params)


def _state(name: str) -> Any:
    import optuna

    return getattr(optuna.trial.TrialState, name)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True
