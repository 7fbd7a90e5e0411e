"""The teacher-output cache: exact replay, manifest checks, atomic finalize, training from it."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import built_cache, straight_and_resumed, write_recipe
from kdkit import teacher_cache
from kdkit.assemble import prepare_training
from kdkit.build import plan
from kdkit.cache import TeacherCache
from kdkit.cache.store import CacheWriter
from kdkit.cache.views import apply_views, draw_views, view_phase, view_schedule
from kdkit.cli import main
from kdkit.data.augment import AugmentConfig, normalize
from kdkit.errors import KdkitError, RecipeErrors
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe
from kdkit.teacher_cache import open_cache

# -- views ---------------------------------------------------------------------------------------


def test_stored_views_are_the_per_sample_pad_crop_flip() -> None:
    augment = AugmentConfig(crop_padding=2, hflip=True)
    table = draw_views(50, 4, augment, seed=3)
    assert table.shape == (50, 4, 3) and table.dtype == torch.int16
    assert int(table[..., :2].min()) == 0 and int(table[..., :2].max()) == 4
    assert set(table[..., 2].unique().tolist()) == {0, 1}
    assert torch.equal(table, draw_views(50, 4, augment, seed=3))
    images = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8)
    out = apply_views(images, table[:, 1], augment)
    for i in range(50):  # reference: pad, slice, maybe flip, one image at a time
        oy, ox, flip = table[i, 1].tolist()
        ref = F.pad(images[i], [2, 2, 2, 2])[:, oy:oy + 8, ox:ox + 8]
        ref = ref.flip(-1) if flip else ref
        assert torch.equal(out[i], ref)


def test_no_augmentation_means_identity_views() -> None:
    augment = AugmentConfig()
    table = draw_views(5, 2, augment, seed=0)
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    assert not table.any() and torch.equal(apply_views(images, table[:, 0], augment), images)


def test_each_view_is_read_once_every_k_epochs() -> None:
    phase = view_phase(20, 5, seed=1)
    index = torch.arange(20)
    seen = torch.stack([view_schedule(phase, index, epoch, 5) for epoch in range(5)], dim=1)
    assert all(sorted(row.tolist()) == [0, 1, 2, 3, 4] for row in seen)
    assert len(set(seen[:, 0].tolist())) > 1  # phases spread one batch over several views


# -- exactness -----------------------------------------------------------------------------------


def test_cached_outputs_equal_the_live_teacher_on_the_replayed_views(cached: dict) -> None:
    # a feature term as well, so a non-logit tap is stored and checked
    cached["distill"].append({"loss": "mse", "student": "stage2", "teacher": "stage2", "bridge": "conv1x1",
                              "weight": 0.1})
    _recipe, built, cache, replay, teacher = built_cache(cached)
    assert cache.specs == ["logits", "stage2"] and cache.num_views == 3
    train_loader, _ = prepare_training(built, replay=replay)
    for epoch in (0, 4):
        for step, (x, _, index) in enumerate(train_loader.epoch(epoch)):
            stored = teacher(x, index, epoch)
            live = built.teacher(x)
            for spec in ("logits", "stage2"):
                assert stored[spec].dtype == torch.float32 and stored[spec].shape == live[spec].shape
                torch.testing.assert_close(stored[spec], live[spec], rtol=2e-3, atol=2e-3)  # float16 storage
            if step == 1:
                break
    # and the loader really replays stored views: the raw images of a batch are the table's views
    x, _, index = next(train_loader.epoch(2))
    views = replay.views(index, 2)
    raw = built.data.train_images[index]
    expected = normalize(apply_views(raw, cache.views[index, views], replay.augment), built.data.mean,
                         built.data.std)
    torch.testing.assert_close(x, expected)


def test_topk_storage_keeps_the_top_probabilities_and_the_remaining_mass(cached: dict) -> None:
    cached["teacher"]["cache"].update({"logits": "topk", "topk": 3, "dtype": "float32"})
    _recipe, built, _cache, replay, teacher = built_cache(cached)
    train_loader, _ = prepare_training(built, replay=replay)
    x, _, index = next(train_loader.epoch(0))
    p_live = built.teacher(x)["logits"].softmax(1)
    p_cached = teacher(x, index, 0)["logits"].softmax(1)
    top = p_live.topk(3, dim=1)
    torch.testing.assert_close(p_cached.gather(1, top.indices), top.values, rtol=1e-5, atol=1e-6)
    rest = (1 - top.values.sum(1, keepdim=True)) / 7
    others = p_cached.scatter(1, top.indices, float("nan"))
    torch.testing.assert_close(others[~others.isnan()].view(-1, 7), rest.expand(-1, 7), rtol=1e-4, atol=1e-6)


# -- manifest, atomicity -------------------------------------------------------------------------


@pytest.mark.slow
def test_a_cache_of_another_setting_or_teacher_is_refused(cached: dict, tmp_path: Path) -> None:
    built_cache(cached)
    with pytest.raises(KdkitError, match=r"does not match.*augment\.crop_padding") as info:
        built_cache(cached, ["data.augment.crop_padding=2"])
    assert "--overwrite" in info.value.render()
    with pytest.raises(KdkitError, match=r"views: cache has 3, recipe needs 5"):
        built_cache(cached, ["teacher.cache.views=5"])
    torch.manual_seed(7)
    other = tmp_path / "other_teacher.safetensors"
    from safetensors.torch import save_file

    from kdkit.models import build_model
    model = build_model("cnn_teacher", num_classes=10, in_channels=1, image_size=8)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(other))
    with pytest.raises(KdkitError, match=r"teacher\.weights_sha256"):
        built_cache(cached, [f"teacher.checkpoint={other}"])
    # --overwrite rebuilds it for the new setting
    recipe = recipe_from_dict(cached, ["teacher.cache.views=5"])
    cache, _, _ = open_cache(recipe, plan(recipe, training=True), overwrite=True, progress=False)
    assert cache.num_views == 5


def test_the_default_folder_is_the_identity_hash(cached: dict, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.setattr(teacher_cache, "CACHE_ROOT", tmp_path / "cache_root")
    del cached["teacher"]["cache"]["dir"]
    _, _, a, _, _ = built_cache(cached)
    _, _, b, _, _ = built_cache(cached, ["train.seed=5", "distill.0.temperature=2"])  # same teacher outputs
    _, _, c, _, _ = built_cache(cached, ["teacher.cache.views=2"])
    assert a.folder == b.folder != c.folder and a.folder.parent == tmp_path / "cache_root"
    assert a.folder.name == a.manifest["key"]


def test_an_interrupted_build_leaves_nothing_usable(cached: dict, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    calls = {"n": 0}
    original = CacheWriter.write

    def failing(self, rows, view, outputs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        original(self, rows, view, outputs)

    monkeypatch.setattr(CacheWriter, "write", failing)
    with pytest.raises(KeyboardInterrupt):
        built_cache(cached)
    assert not (tmp_path / "cache").exists()
    assert not list(tmp_path.glob("cache.partial-*"))  # the partial folder is removed


def test_a_folder_without_manifest_is_never_read(cached: dict, tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    folder.mkdir()
    np.save(folder / "views.npy", np.zeros((2, 1, 3), np.int16))
    with pytest.raises(KdkitError, match="incomplete cache") as info:
        built_cache(cached)
    assert "kdkit cache build" in info.value.render()
    with pytest.raises(KdkitError, match="no cache at"):
        TeacherCache(tmp_path / "nowhere")


def test_a_cache_cannot_serve_a_strong_view() -> None:
    from conftest import TINY
    recipe = {**TINY, "teacher": {"arch": "cnn_teacher", "checkpoint": "t.safetensors", "cache": {}},
              "distill": [{"loss": "kd"}], "data": {**TINY["data"], "views": 2}}
    with pytest.raises(RecipeErrors, match="strong view"):
        recipe_from_dict(recipe)


# -- training ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_from_the_cache_never_runs_the_teacher(cached: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdkit.distill import FrozenTeacher

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran during training")

    recipe = recipe_from_dict(cached)
    built = plan(recipe, training=True)
    open_cache(recipe, built, progress=False)  # built here (the teacher runs once)
    monkeypatch.setattr(FrozenTeacher, "forward", no_teacher)
    summary = run_recipe(recipe)
    assert summary["teacher_cache"]["views"] == 3 and summary["best_top1"] > 0
    rows = json.loads((recipe.run_dir / "metrics.json").read_text())
    assert len(rows) == 2 and all(np.isfinite(r["train_kd"]) for r in rows)


@pytest.mark.slow
def test_cached_run_resumes_exactly(cached: dict, tmp_path: Path) -> None:
    cached["train"]["epochs"] = 3
    straight, broken = straight_and_resumed(cached, tmp_path, 8)
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((broken / "metrics.json").read_text())
    assert [(r["train_loss"], r["test_top1"]) for r in a] == [(r["train_loss"], r["test_top1"]) for r in b]


@pytest.mark.slow
def test_cli_cache_build_and_info(tiny_kd: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_recipe(tmp_path / "kd.yaml", tiny_kd)  # no cache section: built with the defaults
    folder = tmp_path / "c"
    assert main(["cache", "build", str(path), f"teacher.cache.dir={folder}", "--quiet"]) == 0
    assert "10 views x 200 images" in capsys.readouterr().out
    assert main(["cache", "info", str(folder)]) == 0
    assert '"views": 10' in capsys.readouterr().out
    assert main(["cache", "info", str(tmp_path / "missing")]) == 2
    assert "no cache at" in capsys.readouterr().err


# -- corruption ----------------------------------------------------------------------------------


def _truncate_to(size: int) -> Callable[[Path], None]:
    def truncate(folder: Path) -> None:
        path = folder / "tap0.npy"
        path.write_bytes(path.read_bytes()[:size])
    return truncate


def _first_rows(folder: Path) -> None:  # an array of another (smaller) cache put in its place
    np.save(folder / "tap0.npy", np.load(folder / "tap0.npy")[:100])


def _zero_the_values(folder: Path) -> None:  # what issue #10 saw used silently: a valid array of zeros
    np.save(folder / "tap0.npy", np.zeros_like(np.load(folder / "tap0.npy")))


def _zero_the_file(folder: Path) -> None:
    path = folder / "tap0.npy"
    path.write_bytes(bytes(path.stat().st_size))


def _same_size_other_array(folder: Path) -> None:
    path = folder / "tap0.npy"
    size = path.stat().st_size
    np.save(path, np.ones((200, 3, 5), np.float32))  # float16 (200, 3, 10) has as many bytes
    assert path.stat().st_size == size


def _flip_a_byte(name: str, at: float) -> Callable[[Path], None]:
    """Flip one bit of byte ``at`` (a fraction of the file's size) of file ``name``."""
    def flip(folder: Path) -> None:
        data = bytearray((folder / name).read_bytes())
        data[int(at * (len(data) - 1))] ^= 0x10
        (folder / name).write_bytes(bytes(data))
    return flip


def _edit_manifest(**changes: Any) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**manifest, **changes}))
    return edit


def _older_format(folder: Path) -> None:  # what kdkit 0.x (format 1, no "arrays") wrote
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["arrays"]
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (_truncate_to(1000), r"tap0\.npy' is truncated: 1000 bytes, the manifest records 12128"),
    "cut_in_its_header": (_truncate_to(100), r"tap0\.npy' is truncated: 100 bytes, the manifest records 12128"),
    "fewer_rows": (_first_rows, r"tap0\.npy' holds float16 \(100, 3, 10\), the manifest records float16 "
                                r"\(200, 3, 10\)"),
    "another_array": (_same_size_other_array, r"tap0\.npy' holds float32 \(200, 3, 5\), the manifest records "
                                              r"float16 \(200, 3, 10\)"),
    "missing": (lambda folder: (folder / "tap0.npy").unlink(), r"tap0\.npy' is missing"),
    "zeroed_values": (_zero_the_values, r"tap0\.npy' differs from the SHA-256 written when the cache was built "
                                        r"\(its values are all zeros"),
    "zeroed_file": (_zero_the_file, r"tap0\.npy' is not a numpy array file"),
    "flipped_view_byte": (_flip_a_byte("views.npy", 0.5),
                          r"views\.npy' differs from the SHA-256 written when the cache was built; fix"),
    "flipped_feature_byte_at_its_end": (_flip_a_byte("tap1.npy", 1.0),
                                        r"tap1\.npy' differs from the SHA-256 written when the cache was built"),
    "manifest_not_json": (lambda folder: (folder / "manifest.json").write_text('{"format": 2, "comp'),
                          r"manifest\.json' is not valid JSON"),
    "manifest_not_complete": (_edit_manifest(complete=False), r"manifest\.json' does not say \"complete\": true"),
    "manifest_without_arrays": (_edit_manifest(arrays={}), r"manifest\.json' lists no SHA-256 for views\.npy"),
    "older_format": (_older_format, r"was built by an older kdkit \(cache format 1; this kdkit reads format 2"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupt_cache_exits_2_naming_the_file_the_fault_and_the_fix(
        case: str, cached: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the cache holds the logits (tap0.npy, float16 (200, 3, 10)) and a feature map (tap1.npy)
    cached["distill"].append({"loss": "mse", "student": "stage2", "teacher": "stage2", "bridge": "conv1x1",
                              "weight": 0.1})
    path = write_recipe(tmp_path / "kd.yaml", cached)
    built_cache(cached)
    damage, expected = CORRUPTIONS[case]
    damage(tmp_path / "cache")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(expected, err), err
    assert "kdkit cache build RECIPE --overwrite" in err and "delete the folder" in err
    assert not (tmp_path / "run" / "metrics.json").exists()  # refused before training


def test_the_fix_of_a_corrupt_cache_works(cached: dict, tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "kd.yaml", cached)
    built_cache(cached)
    _zero_the_values(tmp_path / "cache")
    assert main(["cache", "build", str(path), "--overwrite", "--quiet"]) == 0
    built_cache(cached)  # opens, checked
    _truncate_to(1000)(tmp_path / "cache")
    shutil.rmtree(tmp_path / "cache")  # or delete the folder: the next open builds it again
    _, _, cache, _, _ = built_cache(cached)
    assert cache.manifest["arrays"]["tap0.npy"]["bytes"] == 12128
