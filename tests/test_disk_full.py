"""A full disk (or any refused write) says what failed, where, how much space is free there and the fix, and keeps
the last good checkpoint (docs/faults.md, "Disk")."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from conftest import built_cache, write_recipe
from kdkit.checkpoint import pointed
from kdkit.cli import main
from kdkit.engine import Engine
from kdkit.errors import KdkitError
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe

#: How each library reports a full disk, as measured on a full tmpfs.
TORCH_FULL = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
SAFETENSORS_FULL = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def raising(exc: BaseException) -> Any:
    def write(*_args: Any, **_kwargs: Any) -> None:
        raise exc

    return write


@pytest.mark.slow
@pytest.mark.parametrize(("library", "name", "exc"), [(torch, "save", TORCH_FULL),
                                                      (safetensors.torch, "save_file", SAFETENSORS_FULL)])
def test_a_full_disk_while_saving_a_checkpoint_exits_2_and_keeps_the_last_good_one(
        tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        library: Any, name: str, exc: BaseException) -> None:
    path = write_recipe(tmp_path / "r.yaml", {**tiny, "train": {**tiny["train"], "epochs": 1}})
    assert main(["run", str(path)]) == 0
    ckpts = Path(tiny["output"]["dir"]) / "checkpoints"
    good = pointed(ckpts, "latest")
    weights = load_file(str(good / "model.safetensors"))
    monkeypatch.setattr(library, name, raising(exc))
    if library is safetensors.torch:
        monkeypatch.setattr("kdkit.checkpoint.save_file", raising(exc))
    capsys.readouterr()
    assert main(["run", str(path), "train.epochs=2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"could not write checkpoint {str(ckpts / 'epoch_0002')!r}: the disk is full" in err
    assert str(exc) in err and " free on that disk" in err and "Traceback" not in err
    assert f"`kdkit run RECIPE --resume` continues from the last good checkpoint, {str(good)!r}, which is kept" in err
    assert pointed(ckpts, "latest") == good and not list(ckpts.glob(".*.tmp-*"))  # the partial one is gone
    assert all(torch.equal(weights[k], v) for k, v in load_file(str(good / "model.safetensors")).items())


@pytest.mark.slow
def test_a_full_disk_while_logging_metrics_names_the_file_and_keeps_the_last_checkpoint(
        tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = recipe_from_dict(tiny)
    real_fsync = os.fsync

    def fill_the_disk(engine: Engine, event: str) -> None:  # from epoch 2 on, every write finds the disk full
        if event == "epoch_start" and engine.epoch == 1:
            monkeypatch.setattr(os, "fsync", raising(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))

    with pytest.raises(KdkitError) as info:
        run_recipe(recipe, callbacks=[fill_the_disk])
    monkeypatch.setattr(os, "fsync", real_fsync)
    message = info.value.render()
    assert f"could not write file {str(recipe.run_dir / 'metrics.csv')!r}: the disk is full" in message
    assert "No space left on device" in message and " free on that disk" in message and "--resume" in message
    assert pointed(recipe.run_dir / "checkpoints", "latest").name == "epoch_0001"
    assert not list(recipe.run_dir.glob(".*.tmp-*"))


def test_a_full_disk_when_a_cache_build_starts_fails_at_once_and_leaves_nothing(
        cached: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # posix_fallocate reserves every array up front: without it a full disk kills the build with SIGBUS
    monkeypatch.setattr(os, "posix_fallocate", raising(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
                        raising=False)
    with pytest.raises(KdkitError) as info:
        built_cache(cached)
    message = info.value.render()
    assert "could not write teacher cache" in message and "cache.partial-" in message
    assert "the disk is full" in message and " free on that disk" in message and "teacher.cache.views" in message
    assert not list(tmp_path.glob("cache*"))
