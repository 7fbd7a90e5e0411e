"""Independent runs side by side: ``--jobs N`` worker processes, each with ``cores / N`` torch threads.

Small networks use a multi-core CPU poorly from one process: the CNN student's step took 34 ms with 2 threads
and 45 ms with 1 on a 2-core machine, so two 1-thread processes finish two runs in the time one 2-thread
process finishes 1.5 (see ``docs/design.md``, "Parallel runs"). The demo (and any caller with several runs)
lists its runs as :class:`Job` s with the jobs each must wait for (a KD student waits for its teacher); this
module starts each job as soon as what it waits for has finished and a worker is free.

A worker runs :func:`kdkit.runner.run_or_continue`, so an interrupted batch of jobs loses nothing: run again, the
finished runs are reused and interrupted ones continue. ``train.threads`` is set in each job's recipe, so it is
part of the run's recorded recipe and digest (thread count changes float summation order).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdkit.engine import Interrupted
from kdkit.errors import KdkitError, RecipeErrors, TrainingDiverged


@dataclass(frozen=True)
class Job:
    """One run: a recipe (shipped name or path), its overrides, and the jobs that must finish first.

    Attributes:
        key: Unique name of the job (shown in progress lines, used by ``after``).
        recipe: A shipped recipe name or a recipe file.
        overrides: ``key=value`` overrides.
        after: Keys of the jobs whose runs this one needs (e.g. its teacher's).
        overwrite: Retrain even when a finished run of the same recipe exists.
    """

    key: str
    recipe: str
    overrides: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    overwrite: bool = False


def choose_jobs(requested: int | None, device: str) -> int:
    """How many runs to train at once: ``requested``; else on a CPU two when it has two cores or more (measured
    on 2 cores; more workers split the cores further), and one on an accelerator (its runs would share it)."""
    if requested is not None:
        if requested < 1:
            raise KdkitError(f"--jobs must be at least 1, got {requested}", bad=requested,
                             fix="use --jobs 1 to train one run at a time")
        return requested
    return min(os.cpu_count() or 1, 2) if device == "cpu" else 1


def threads_per_job(workers: int) -> int:
    """Torch threads of each worker when ``workers`` run at once: the cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // workers)


def run_jobs(jobs: Sequence[Job], workers: int, *, on_done: Callable[[Job, dict[str, Any], float], None] | None = None
             ) -> dict[str, dict[str, Any]]:
    """Train ``jobs`` with up to ``workers`` at once and return each job's summary by key.

    With one worker, jobs run in this process, in order, with the recipe's own thread count and progress bars.
    With more, each runs in a worker process with ``cores // workers`` torch threads and no progress bar
    (their bars would interleave); ``on_done`` is called as each finishes.

    Raises:
        KdkitError: Bad jobs (unknown or circular ``after``), or the first job that failed, with its key.
        TrainingDiverged: A job's training diverged.
        Interrupted: SIGINT/SIGTERM stopped a job (each worker saves its run's checkpoint first).
    """
    _check_graph(jobs)
    if workers == 1:
        results = {}
        for job in jobs:
            started = time.perf_counter()
            results[job.key] = _run(job, threads=None, progress=None)
            if on_done is not None:
                on_done(job, results[job.key], time.perf_counter() - started)
        return results
    threads = threads_per_job(workers)
    pending, results = list(jobs), {}
    running: dict[Future[Any], tuple[Job, float]] = {}
    # spawn, not fork: a forked child would inherit this process's torch thread pools and locks
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        while pending or running:
            for job in [j for j in pending if all(a in results for a in j.after)][:workers - len(running)]:
                pending.remove(job)
                running[pool.submit(_worker, job, threads)] = (job, time.perf_counter())
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job, started = running.pop(future)
                outcome, value = future.result()
                if outcome != "ok":
                    for other in running:
                        other.cancel()
                    raise _reraised(job, outcome, value)
                results[job.key] = value
                if on_done is not None:
                    on_done(job, value, time.perf_counter() - started)
    return results


def _check_graph(jobs: Sequence[Job]) -> None:
    keys = [job.key for job in jobs]
    if len(set(keys)) != len(keys):
        raise KdkitError(f"job keys repeat: {sorted(k for k in set(keys) if keys.count(k) > 1)}",
                         fix="give each job its own key")
    for i, job in enumerate(jobs):
        for needed in job.after:
            if needed not in keys[:i]:
                raise KdkitError(f"job {job.key!r} waits for {needed!r}, which is not an earlier job", bad=needed,
                                 choices=keys[:i], fix="list the jobs a job waits for before it")


def _run(job: Job, threads: int | None, progress: bool | None) -> dict[str, Any]:
    from kdkit.recipe import find_recipe, load_recipe
    from kdkit.runner import run_or_continue, run_recipe

    source = find_recipe(job.recipe)
    overrides = [*job.overrides, *([f"train.threads={threads}"] if threads is not None else [])]
    recipe = load_recipe(source, overrides)
    if job.overwrite:
        return run_recipe(recipe, source=source, overwrite=True, progress=progress)
    return run_or_continue(recipe, source=source, progress=progress)


def _worker(job: Job, threads: int) -> tuple[str, Any]:
    """Run one job in a worker process. Errors come back as plain data: an exception class with keyword-only
    arguments (``KdkitError``, ``TrainingDiverged``) does not survive pickling."""
    try:
        return "ok", _run(job, threads=threads, progress=False)
    except KdkitError as exc:
        fields = {"message": exc.message, "choices": exc.choices, "fix": exc.fix, "where": exc.where}
        return "error", {"message": exc.render()} if isinstance(exc, RecipeErrors) else fields
    except TrainingDiverged as exc:
        return "diverged", {"message": exc.message, "checkpoint": exc.checkpoint, "fix": exc.fix}
    except Interrupted as exc:
        return "interrupted", str(exc.checkpoint) if exc.checkpoint else None
    finally:
        sys.stdout.flush()


def _reraised(job: Job, outcome: str, value: Any) -> Exception:
    if outcome == "interrupted":
        return Interrupted(Path(value) if value else None)
    if outcome == "diverged":
        return TrainingDiverged(f"{job.key}: {value['message']}", checkpoint=value["checkpoint"], fix=value["fix"])
    # the choices arrive ranked already; finished runs are reused when the same command runs again
    return KdkitError(f"run {job.key!r} failed: {value['message']}", choices=value.get("choices"),
                      fix=value.get("fix"), where=value.get("where"))
