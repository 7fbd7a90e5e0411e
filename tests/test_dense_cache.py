"""The teacher-output cache on dense tasks: stored feature and logit maps give the live teacher's losses, the
cache's identity covers them, what it cannot serve is refused before training, and its disk cost is stated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import built_cache, edit_recipe, tiny_det, tiny_seg, write_recipe
from kdkit.assemble import prepare_training
from kdkit.build import cache_problems
from kdkit.cache.views import apply_views
from kdkit.cli import main
from kdkit.data.augment import normalize
from kdkit.errors import KdkitError
from kdkit.recipe import CacheSpec, recipe_from_dict
from kdkit.task import TASKS

TINY = {"scenes_seg/cwd": tiny_seg, "scenes_det/fitnets": tiny_det, "scenes_det/ld": tiny_det}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder of tiny scenes for the module (drawn once, not per test)."""
    return tmp_path_factory.mktemp("scenes")


def cached_recipe(tmp_path: Path, name: str, scenes: Path, **cache: Any) -> dict[str, Any]:
    """Shipped dense recipe ``name`` on tiny scenes reading a cache in ``tmp_path/tc`` (amp off: the live step
    compared with runs in float32)."""
    return edit_recipe(TINY[name](tmp_path, name), {"teacher.cache": {"dir": str(tmp_path / "tc"), **cache},
                                                    "train.amp": "off", "data.params.cache_dir": str(scenes)})


def step_losses(built: Any, teacher_out: dict[str, torch.Tensor], batch: tuple,
                view: torch.Tensor | None = None) -> dict[str, float]:
    """The loss components of one step on ``batch`` reading ``teacher_out``, its targets moved by ``view`` as the
    engine moves them (the student's forward is deterministic: no dropout in the scene students)."""
    x, y, index = batch
    logits, per_term = built.student(x)
    targets = built.task.targets(y, index, "train")
    targets = targets if view is None else built.task.follow(targets, view)
    comps = built.objective(logits, targets, per_term, teacher_out, 0.0, index)
    return {k: float(v.detach()) for k, v in comps.items()}


# -- exactness -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "taps"), [("scenes_seg/cwd", ["logits"]), ("scenes_det/fitnets", ["p2", "p3", "p4"]),
                                            ("scenes_det/ld", ["logits"])])
def test_a_float32_dense_cache_gives_the_live_teachers_step(tmp_path: Path, scenes: Path, name: str,
                                                            taps: list[str]) -> None:
    _recipe, built, cache, replay, teacher = built_cache(cached_recipe(tmp_path, name, scenes, dtype="float32"))
    assert cache.specs == taps and cache.num_views == 1
    loader, _ = prepare_training(built, replay=replay)
    batch = next(loader.epoch(0))
    x, _, index = batch
    live, stored = built.teacher(x), teacher(x, index, 0)
    for spec in taps:  # feature maps (B, C, H, W), logit maps (B, K, H, W), per-location logits (B, L, K+5)
        assert stored[spec].shape == live[spec].shape and stored[spec].ndim >= 3
        torch.testing.assert_close(stored[spec], live[spec], rtol=0, atol=1e-6)
    with_live, with_cache = step_losses(built, live, batch), step_losses(built, stored, batch)
    assert with_live.keys() == with_cache.keys() and len(with_live) >= 3  # task loss, a term, the total
    for key, value in with_live.items():
        assert with_cache[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_a_float16_dense_cache_is_the_live_outputs_rounded_to_float16(tmp_path: Path, scenes: Path) -> None:
    recipe = cached_recipe(tmp_path, "scenes_seg/cwd", scenes, dtype="float16")
    _recipe, built, _cache, replay, teacher = built_cache(recipe)
    loader, _ = prepare_training(built, replay=replay)
    batch = next(loader.epoch(0))
    x, _, index = batch
    live, stored = built.teacher(x)["logits"], teacher(x, index, 0)["logits"]
    assert stored.dtype == torch.float32 and torch.equal(stored, live.half().float())  # its rounding, nothing more
    assert not torch.equal(stored, live)  # (so the equality above says something)
    rounded = step_losses(built, {"logits": live.half().float()}, batch)
    assert step_losses(built, {"logits": stored}, batch) == pytest.approx(rounded, rel=1e-6)


@pytest.mark.parametrize("name", ["scenes_det/ld", "scenes_seg/cwd"])
def test_an_augmented_dense_cache_replays_views_the_targets_follow(tmp_path: Path, scenes: Path, name: str) -> None:
    recipe = edit_recipe(cached_recipe(tmp_path, name, scenes, dtype="float32", views=3),
                         {"data.augment": {"crop_padding": 4, "hflip": True}})
    _recipe, built, cache, replay, teacher = built_cache(recipe)
    assert cache.num_views == 3 and cache.views[..., 2].any() and cache.views[..., :2].max() == 8
    loader, _ = prepare_training(built, replay=replay)
    x, y, index, view = next(loader.epoch_views(1))
    # the loader's view is the stored one, in the drawn views' convention: the same pixels through apply_view
    augment = replay.augment
    assert view is not None and torch.equal(augment.apply_view(built.data.train_images[index], view),
                                            apply_views(built.data.train_images[index],
                                                        cache.views[index, replay.views(index, 1)], augment))
    torch.testing.assert_close(x, normalize(augment.apply_view(built.data.train_images[index], view),
                                            built.data.mean, built.data.std))
    live, stored = built.teacher(x), teacher(x, index, 1)
    for spec in cache.specs:
        torch.testing.assert_close(stored[spec], live[spec], rtol=0, atol=1e-6)
    # the step's targets move with the view, and its losses are the live teacher's
    assert not torch.equal(built.task.follow(built.task.targets(y, index, "train"), view),
                           built.task.targets(y, index, "train"))
    batch = (x, y, index)
    with_live, with_cache = step_losses(built, live, batch, view), step_losses(built, stored, batch, view)
    assert with_cache == pytest.approx(with_live, rel=1e-6, abs=1e-7)


# -- identity and integrity ----------------------------------------------------------------------


def test_a_dense_cache_is_not_reused_for_other_taps_or_another_teacher(tmp_path: Path, scenes: Path) -> None:
    ld = cached_recipe(tmp_path, "scenes_det/ld", scenes)
    _recipe, _built, cache, _replay, _teacher = built_cache(ld)
    assert cache.specs == ["logits"]
    fitnets = cached_recipe(tmp_path, "scenes_det/fitnets", scenes)  # the same folder
    with pytest.raises(KdkitError, match=r"does not match this recipe: taps: cache has \['logits'\], recipe needs "
                                         r"\['p2', 'p3', 'p4'\]"):
        built_cache(fitnets)
    # (the default folder is the hash of that identity: the two recipes get two folders)
    # another teacher's weights behind the same checkpoint path: refused by the weights' SHA-256
    weights = load_file(str(tmp_path / "t.safetensors"))
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, str(tmp_path / "t.safetensors"))
    with pytest.raises(KdkitError, match=r"teacher\.weights_sha256: cache has"):
        built_cache(ld)


def test_a_damaged_dense_array_is_refused(tmp_path: Path, scenes: Path) -> None:
    recipe = cached_recipe(tmp_path, "scenes_seg/cwd", scenes)
    built_cache(recipe)
    path = tmp_path / "tc" / "tap0.npy"
    array = np.load(path, mmap_mode="r+")
    array[3, 0, 5, 20, 20] += 1  # one logit of one pixel of one image
    array.flush()
    with pytest.raises(KdkitError, match=r"tap0\.npy' differs from the SHA-256 written when the cache was built"):
        built_cache(recipe)


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "change", "said"), [
    ("scenes_seg/cwd", {"teacher.cache.logits": "topk"},
     ["- teacher.cache.logits: topk keeps the top classes of one logit vector per view; task 'segmentation' has "
      "per-position outputs", "fix: set teacher.cache.logits: full"]),
])
def test_what_a_dense_cache_cannot_serve_exits_2_before_training(
        tmp_path: Path, scenes: Path, capsys: pytest.CaptureFixture[str], name: str, change: dict,
        said: list[str]) -> None:
    path = write_recipe(tmp_path / "r.yaml", edit_recipe(cached_recipe(tmp_path, name, scenes), change))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "1 problem(s)" in err and all(s in err for s in said), err
    assert not (tmp_path / "tc").exists() and not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize(("task", "augment", "refused"), [
    ("segmentation", {}, []),
    ("detection", {}, []),
    ("seg_boundary", {}, []),
    ("classification", {"crop_padding": 2, "hflip": True}, []),  # views are stored and replayed
    ("segmentation", {"hflip": True}, []),  # ... and the targets follow them
    ("detection", {"crop_padding": 2}, []),
    ("detection", {"views": 2}, ["data.views: 2 needs the teacher on the strong view too"]),
])
def test_one_rule_says_which_recipes_a_cache_serves(task: str, augment: dict, refused: list[str]) -> None:
    from conftest import TINY

    views = augment.pop("views", 1)
    recipe = recipe_from_dict({**TINY, "teacher": {"arch": "cnn_teacher", "checkpoint": "t.safetensors"},
                               "distill": [{"loss": "kd"}], "data": {**TINY["data"], "augment": augment,
                                                                      "views": views}})
    messages = [str(p) for p in cache_problems(recipe, TASKS.get(task), CacheSpec())]
    assert len(messages) == len(refused) and all(want in got for want, got in zip(refused, messages, strict=True))
    topk = [str(p) for p in cache_problems(recipe, TASKS.get(task), CacheSpec(logits="topk"))]
    assert any("topk" in m for m in topk) == TASKS.get(task).pixel_targets


def test_bench_speed_asks_the_planners_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    # bench speed times a cached step exactly when the planner would accept a cache: it calls the same function
    import kdkit.bench.speed as speed
    import kdkit.build as build

    assert speed.cache_problems is build.cache_problems


# -- disk cost and end to end --------------------------------------------------------------------


def test_cache_info_states_bytes_per_image(tmp_path: Path, scenes: Path, capsys: pytest.CaptureFixture[str]) -> None:
    built_cache(cached_recipe(tmp_path, "scenes_det/fitnets", scenes))
    assert main(["cache", "info", str(tmp_path / "tc")]) == 0
    out = capsys.readouterr().out
    per_tap = {"p2": 32 * 12 * 12 * 2, "p3": 32 * 6 * 6 * 2, "p4": 32 * 3 * 3 * 2}  # float16 FPN levels of 48 px
    total = sum(per_tap.values())
    assert f"1 views x 48 images, 0.55 MiB: {total:,} bytes per image (float16, its 1 view(s); " in out, out
    assert "p2 9,216, p3 2,304, p4 576)" in out


@pytest.mark.slow
@pytest.mark.parametrize(("name", "change", "views"), [
    ("scenes_seg/cwd", {}, 1),
    ("scenes_det/fitnets", {"data.augment": {"crop_padding": 4, "hflip": True}, "teacher.cache.views": 2}, 2),
])
def test_a_dense_recipe_trains_from_its_cache_without_running_the_teacher(
        tmp_path: Path, scenes: Path, monkeypatch: pytest.MonkeyPatch, name: str, change: dict, views: int) -> None:
    from kdkit.distill import FrozenTeacher
    from kdkit.runner import run_recipe

    recipe = edit_recipe(cached_recipe(tmp_path, name, scenes), change)
    built_cache(recipe)  # the teacher runs once, here

    def no_teacher(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the teacher ran during training")

    monkeypatch.setattr(FrozenTeacher, "forward", no_teacher)
    summary = run_recipe(recipe_from_dict(recipe))
    assert summary["teacher_cache"]["views"] == views and summary["teacher_cache"]["dir"] == str(tmp_path / "tc")
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(rows) == 1 and np.isfinite(rows[0]["train_loss"])
