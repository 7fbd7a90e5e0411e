"""One writer per run folder and per cache build: a second writer exits 2 naming the holder, or waits for the
first one's result and reuses it (docs/faults.md, "Concurrency")."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from conftest import built_cache, write_recipe
from kdkit import runner, teacher_cache
from kdkit.cli import main
from kdkit.errors import KdkitError
from kdkit.locks import exclusive, holder, owner_file
from kdkit.recipe import recipe_from_dict


def _hold(folder: str, ready: Any, release: Any, result: tuple[Path, Path] | None) -> None:
    """In another process: hold ``folder``'s lock until told to let go, then move ``result`` into place (what
    that process made) before the lock is released."""
    with exclusive(Path(folder), what="test"):
        ready.set()
        release.wait(60)
        if result is not None:
            shutil.move(result[0], result[1])


@contextmanager
def held_elsewhere(folder: Path, result: tuple[Path, Path] | None = None) -> Iterator[tuple[Any, Any]]:
    """Another process holds ``folder``'s lock inside the block; yields it and the event that makes it let go.
    Forked, so that it starts without importing kdkit again."""
    mp = multiprocessing.get_context("fork")
    ready, release = mp.Event(), mp.Event()
    proc = mp.Process(target=_hold, args=(str(folder), ready, release, result), daemon=True)
    proc.start()
    try:
        assert ready.wait(30), "the holder did not take the lock"
        yield proc, release
    finally:
        release.set()
        proc.join(30)


def release_when_waiting(monkeypatch: pytest.MonkeyPatch, module: ModuleType, release: Any) -> None:
    """Make the holder let go as soon as ``module`` starts waiting for it (no timing guess)."""
    real = module.exclusive

    def waiting_then_release(folder: Path, **kwargs: Any) -> Any:
        announce = kwargs["on_wait"]
        kwargs["on_wait"] = lambda who: (announce(who), release.set())
        return real(folder, **kwargs)

    monkeypatch.setattr(module, "exclusive", waiting_then_release)


def test_a_lock_nests_in_its_process_records_its_holder_and_refuses_another(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with exclusive(folder, what="run folder"), exclusive(tmp_path / "." / "run", what="run folder"):
        assert holder(folder).startswith(f"pid {os.getpid()} on host {socket.gethostname()} (")
    assert not owner_file(folder).exists()  # released: no stale record
    with held_elsewhere(folder) as (proc, _), pytest.raises(KdkitError) as info, \
            exclusive(folder, what="run folder", fix="use another folder"):
        pass
    assert f"run folder {str(folder)!r} is being written by pid {proc.pid}" in info.value.render()
    assert "fix: use another folder" in info.value.render()


@pytest.mark.slow
def test_a_second_run_into_a_run_folder_in_use_exits_2_naming_the_holder(tmp_path: Path, tiny: dict,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = write_recipe(tmp_path / "r.yaml", tiny)
    run_dir = Path(tiny["output"]["dir"])
    run_dir.mkdir()
    (run_dir / ".metrics.json.tmp-1").write_text("[]")  # a temporary of the running writer: left alone
    with held_elsewhere(run_dir) as (proc, _):
        assert main(["run", str(path), "train.seed=1", "train.optimizer.lr=0.2"]) == 2
    err = capsys.readouterr().err
    assert f"is being written by pid {proc.pid} on host {socket.gethostname()}" in err and "output.dir" in err
    assert (run_dir / ".metrics.json.tmp-1").exists() and not (run_dir / "checkpoints").exists()
    assert main(["run", str(path), "train.epochs=1"]) == 0  # once it let go
    assert not (run_dir / ".metrics.json.tmp-1").exists()


@pytest.mark.slow
def test_a_student_waits_for_the_teacher_another_process_is_training_and_reuses_it(
        tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    teacher = {**tiny, "name": "teacher", "model": {"arch": "cnn_teacher"}, "train": {**tiny["train"], "epochs": 1},
               "output": {"progress": False, "dir": str(tmp_path / "teacher")}}
    runner.run_recipe(recipe_from_dict(teacher))  # what the other process is about to finish
    summary = tmp_path / "teacher" / "summary.json"
    finished = summary.read_text()
    shutil.move(summary, tmp_path / "summary.json")  # ... not finished yet
    student = {**tiny, "teacher": {"arch": "cnn_teacher", "recipe": str(write_recipe(tmp_path / "t.yaml", teacher))},
               "distill": [{"loss": "kd", "temperature": 4}], "train": {**tiny["train"], "epochs": 1}}
    path = write_recipe(tmp_path / "student.yaml", student)
    capsys.readouterr()
    with held_elsewhere(tmp_path / "teacher", result=(tmp_path / "summary.json", summary)) as (proc, release):
        release_when_waiting(monkeypatch, runner, release)
        assert main(["run", str(path)]) == 0
    out = capsys.readouterr()
    assert f"teacher: waiting for pid {proc.pid}" in out.err and "teacher: reusing teacher" in out.out
    assert "teacher: training teacher first" not in out.out and "resume:" not in out.out  # nor taken over
    assert summary.read_text() == finished


def test_runs_needing_the_same_missing_cache_wait_for_its_build_and_use_it(
        cached: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    elsewhere = tmp_path / "built_elsewhere"
    built_cache(cached, [f"teacher.cache.dir={elsewhere}"])  # what the other process is about to finish

    def build_again(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("the cache was built a second time")

    monkeypatch.setattr(teacher_cache, "write_cache", build_again)
    folder = tmp_path / "cache"
    with held_elsewhere(folder, result=(elsewhere, folder)) as (proc, release):
        release_when_waiting(monkeypatch, teacher_cache, release)
        _, _, cache, _, _ = built_cache(cached)
    assert cache.folder == folder and f"teacher cache: waiting for pid {proc.pid}" in capsys.readouterr().err
