"""The dense readers' shared conventions: the scenes -> COCO files -> coco reader round trip, fitting, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_scenes import make_fashion_dir

from kdkit.data import ImageData, load_dataset
from kdkit.data.coco import write_coco
from kdkit.data.dense import IGNORE, DenseImage, atomic_write_bytes, fit
from kdkit.data.scenes import TARGET_KEYS
from kdkit.errors import KdkitError

pytest.importorskip("pycocotools")


def test_scenes_round_trip_through_coco_files(tmp_path: Path) -> None:
    fm = make_fashion_dir(tmp_path / "fm", n_train=41, n_test=41)
    scenes = load_dataset("fashion_mnist_scenes", root=fm, size=48, train_scenes=16, test_scenes=6, max_objects=3,
                          seed=1, cache_dir=tmp_path / "cache")
    root = write_coco(scenes, tmp_path / "coco")
    doc = json.loads((root / "annotations" / "instances_train.json").read_text())
    assert len(doc["images"]) == 16 and {a["category_id"] for a in doc["annotations"]} <= set(range(1, 11))
    back = load_dataset("coco", root=root, train="train", test="val", image_size=48, grayscale=True, max_objects=3)
    assert back.classes == scenes.classes and back.warnings == ()
    for split in ("train", "test"):
        assert torch.equal(getattr(back, f"{split}_images"), getattr(scenes, f"{split}_images"))
        assert torch.equal(getattr(back, f"{split}_labels"), getattr(scenes, f"{split}_labels"))
        ours, theirs = getattr(back, f"{split}_targets"), getattr(scenes, f"{split}_targets")
        assert set(ours) == set(theirs) == set(TARGET_KEYS)
        for key in TARGET_KEYS:
            assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), (split, key)
    assert back.mean == scenes.mean and back.std == scenes.std


def test_write_coco_needs_dense_targets(tmp_path: Path) -> None:
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    labels = torch.zeros(2, dtype=torch.int64)
    plain = ImageData("plain", images, labels, images, labels, ("a",), (0.0,), (1.0,), "test")
    with pytest.raises(KdkitError, match="has no boxes, box_labels, instances targets"):
        write_coco(plain, tmp_path)
    assert not any(tmp_path.iterdir())


def item(h: int, w: int) -> DenseImage:
    image = np.arange(h * w * 1, dtype=np.uint8).reshape(h, w, 1)
    semantic = np.zeros((h, w), np.uint8)
    semantic[: h // 2, : w // 2] = 3
    instances = np.where(semantic > 0, 1, 0).astype(np.uint8)
    instances[-1, -1] = IGNORE
    return DenseImage("x", image, np.array([[0, 0, w / 2, h / 2]], np.float32), np.array([2]), semantic, instances)


def test_fit_scales_the_longer_side_and_pads_right_and_bottom() -> None:
    tall = fit(item(8, 4), 4)  # 4 wide x 8 high -> 2 x 4, padded at the right
    assert tall.image.shape == (4, 4, 1) and not tall.image[:, 2:].any()
    assert tall.boxes.tolist() == [[0, 0, 1, 2]]  # scaled by 2/4 and 4/8
    assert tall.semantic.tolist() == [[3, 0, 0, 0], [3, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert tall.instances[:, :2].tolist() == [[1, 0], [1, 0], [0, 0], [0, IGNORE]]
    same = item(6, 6)
    assert fit(same, 6).image is same.image  # already the size: untouched
    up = fit(item(2, 2), 4)  # enlarged: nearest keeps the label values
    assert up.semantic.tolist() == [[3, 3, 0, 0], [3, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert up.boxes.tolist() == [[0, 0, 2, 2]]


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out" / "instances_train.json"
    atomic_write_bytes(target, b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(KdkitError, match="No space left on device"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and os.listdir(target.parent) == ["instances_train.json"]


def same_data(a: ImageData, b: ImageData) -> bool:
    fields = ("name", "classes", "mean", "std", "source", "warnings")
    tensors = ("train_images", "train_labels", "test_images", "test_labels")
    return (all(getattr(a, f) == getattr(b, f) for f in fields)
            and all(torch.equal(getattr(a, t), getattr(b, t)) for t in tensors)
            and all(set(getattr(a, s)) == set(getattr(b, s)) and all(
                torch.equal(v, getattr(b, s)[k]) and v.dtype == getattr(b, s)[k].dtype
                for k, v in getattr(a, s).items()) for s in ("train_targets", "test_targets")))


def test_cache_is_reused_rebuilt_when_a_file_changes_and_when_damaged(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from test_data_coco import coco_fixture, pixels, write_docs, write_image

    from kdkit.data import coco as coco_mod

    root, cache = tmp_path / "coco", tmp_path / "cache"
    docs = coco_fixture(root)
    docs["train"]["annotations"].append({"id": 30, "image_id": 10, "category_id": 99, "bbox": [1, 1, 2, 2]})
    write_docs(root, docs)
    params = {"root": root, "train": "train", "test": "val", "image_size": 16}
    fresh = load_dataset("coco", **params)
    first = load_dataset("coco", **params, cache_dir=cache)
    (file,) = cache.iterdir()
    assert same_data(first, fresh) and first.warnings  # the skipped annotation is still reported from the cache

    def no_reading(*args: object) -> None:
        raise AssertionError("the files were read again")

    monkeypatch.setattr(coco_mod, "_read_coco", no_reading)
    assert same_data(load_dataset("coco", **params, cache_dir=cache), fresh)
    monkeypatch.undo()
    write_image(root / "train" / "b.png", pixels(7))  # an image changes: a new key
    changed = load_dataset("coco", **params, cache_dir=cache)
    assert len(list(cache.iterdir())) == 2 and not torch.equal(changed.train_images[1], fresh.train_images[1])
    assert same_data(changed, load_dataset("coco", **params))
    newest = max(cache.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    newest.write_bytes(newest.read_bytes()[:100])  # damaged: rebuilt, never half-read
    assert same_data(load_dataset("coco", **params, cache_dir=cache), changed)
    assert file.exists() and len(list(cache.iterdir())) == 2


def test_cache_write_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_data_coco import coco_fixture

    coco_fixture(tmp_path / "coco")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(KdkitError, match="No space left on device"):
        load_dataset("coco", root=tmp_path / "coco", train="train", test="val", image_size=16,
                     cache_dir=tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == []
