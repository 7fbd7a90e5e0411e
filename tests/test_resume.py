"""A crash at any point of an epoch's writes, then a resume: pointers, metrics and leftovers come back in line
with the checkpoint resume starts from; a moved or copied run folder resumes where it now is (docs/faults.md,
"Crash and resume")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import built_cache, write_recipe
from kdkit import checkpoint, engine
from kdkit.checkpoint import checkpoint_name, pointed, read_state, resolve_weights
from kdkit.cli import main
from kdkit.engine import Engine
from kdkit.metrics import read_metrics
from kdkit.recipe import find_recipe, load_recipe, recipe_from_dict
from kdkit.runner import run_recipe


class Crash(BaseException):
    """The process dies here (nothing catches it, as nothing outlives a kill)."""


@pytest.fixture
def improving(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every epoch is the best so far (test top-1 = the epoch number), so every epoch moves best.json."""
    real = Engine.evaluate

    def evaluate(self: Engine, loader: Any = None) -> dict[str, float]:
        return {**real(self, loader), "test_top1": float(self.epoch + 1)}

    monkeypatch.setattr(Engine, "evaluate", evaluate)


def pointer(run_dir: Path, which: str) -> str:
    return json.loads((run_dir / "checkpoints" / f"{which}.json").read_text())["dir"]


@pytest.mark.slow
@pytest.mark.parametrize("dies_writing", ["best.json", "latest.json"])
def test_a_crash_between_the_pointer_writes_never_leaves_best_on_older_weights(
        tiny: dict, improving: None, monkeypatch: pytest.MonkeyPatch, dies_writing: str) -> None:
    recipe = recipe_from_dict(tiny)
    real = checkpoint._replace_text

    def dies_at_epoch_2(path: Path, text: str) -> None:
        if path.name == dies_writing and '"epoch_0002"' in text:
            raise Crash
        real(path, text)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "_replace_text", dies_at_epoch_2)
        with pytest.raises(Crash):
            run_recipe(recipe)
    run_dir = recipe.run_dir
    latest = pointed(run_dir / "checkpoints", "latest")
    assert latest is not None and latest.name == "epoch_0001"
    recorded = checkpoint_name(read_state(latest)["best"]["epoch"])
    # best.json is the best epoch resume starts from, or one written just before the crash: never older
    assert pointer(run_dir, "best") >= recorded
    assert resolve_weights(run_dir).parent.name == pointer(run_dir, "best")  # what a teacher by run folder loads
    run_recipe(recipe, resume=True)
    assert pointer(run_dir, "best") == pointer(run_dir, "latest") == "epoch_0002"


@pytest.mark.slow
def test_resume_puts_back_a_best_pointer_left_behind_and_removes_leftovers(tiny: dict, improving: None) -> None:
    recipe = recipe_from_dict(tiny, ["output.keep_checkpoints=2"])
    run_recipe(recipe)
    run_dir, ckpts = recipe.run_dir, recipe.run_dir / "checkpoints"
    # the state a crash between latest.json and best.json left while latest.json was written first
    (ckpts / "best.json").write_text(json.dumps({"dir": "epoch_0001", "metric": "top1", "value": 1.0, "epoch": 1}))
    (run_dir / "summary.json").unlink()
    leftovers = [ckpts / ".epoch_0003.tmp-999999", ckpts / ".latest.json.tmp-999999", run_dir / ".metrics.json.tmp-1"]
    leftovers[0].mkdir()
    for file in leftovers[1:]:
        file.write_text("{")
    assert resolve_weights(run_dir).parent.name == "epoch_0001"
    run_recipe(recipe, resume=True)
    assert json.loads((ckpts / "best.json").read_text()) == {"dir": "epoch_0002", "metric": "top1", "value": 2.0,
                                                            "epoch": 2}
    assert resolve_weights(run_dir).parent.name == "epoch_0002"
    assert not any(p.exists() for p in leftovers)


@pytest.mark.slow
def test_resume_drops_metrics_rows_written_past_its_checkpoint(tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = recipe_from_dict(tiny)
    real = engine.save_checkpoint

    def dies_saving_epoch_2(root: Path, name: str, *args: Any, **kwargs: Any) -> Path:
        if name == "epoch_0002":
            raise Crash
        return real(root, name, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(engine, "save_checkpoint", dies_saving_epoch_2)
        with pytest.raises(Crash):
            run_recipe(recipe)
    assert [r["epoch"] for r in read_metrics(recipe.run_dir)] == [1, 2]  # logged, then the checkpoint was lost
    seen: list[list[int]] = []

    def metrics_at_start(eng: Engine, event: str) -> None:
        if event == "epoch_start":
            seen.append([r["epoch"] for r in read_metrics(recipe.run_dir)])

    run_recipe(recipe, resume=True, callbacks=[metrics_at_start])
    assert seen == [[1]]
    assert [r["epoch"] for r in read_metrics(recipe.run_dir)] == [1, 2]


def test_a_killed_cache_build_leaves_nothing_once_the_next_build_holds_the_lock(cached: dict, tmp_path: Path) -> None:
    partial = tmp_path / "cache.partial-999999"
    partial.mkdir()
    (partial / "views.npy").write_bytes(b"")
    _, _, cache, _, _ = built_cache(cached)
    assert cache.folder == tmp_path / "cache" and not partial.exists()


@pytest.mark.slow
def test_a_moved_or_copied_run_folder_resumes_where_it_now_is(tmp_path: Path, tiny: dict) -> None:
    path = write_recipe(tmp_path / "r.yaml", {**tiny, "train": {**tiny["train"], "epochs": 1}})
    first, moved, copied = tmp_path / "run", tmp_path / "elsewhere" / "run", tmp_path / "copy"
    assert main(["run", str(path)]) == 0
    moved.parent.mkdir()
    shutil.move(first, moved)
    shutil.copytree(moved, copied)
    for folder in (moved, copied):
        assert main(["run", str(path), f"output.dir={folder}", "train.epochs=2", "--resume"]) == 0
        assert [r["epoch"] for r in read_metrics(folder)] == [1, 2]
        assert pointer(folder, "latest") == "epoch_0002" and json.loads((folder / "summary.json").read_text())
    a, b = (read_state(pointed(f / "checkpoints", "latest"))["history"] for f in (moved, copied))
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]  # both continued the same run
    assert not first.exists()
    # where a run is written stays part of the recipe digest: finished runs keep being found by it
    assert load_recipe(find_recipe("fashion_mnist/teacher")).digest() == "20a478720121"
