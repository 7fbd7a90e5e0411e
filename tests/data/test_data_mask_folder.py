"""The mask_folder reader on a tiny images/ + masks/ tree the tests write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kdkit.data import load_dataset
from kdkit.data.dense import IGNORE, MAX_OBJECTS
from kdkit.errors import KdkitError

S = 12


def mask_a() -> np.ndarray:
    """Two separate class-1 regions (one of them two diagonal pixels: 8-connected, one object), one class-2 region,
    an ignore strip."""
    m = np.zeros((S, S), np.uint8)
    m[6:9, 1:4] = 1  # first pixel (6, 1)
    m[1, 5], m[2, 6] = 1, 1  # diagonal neighbours, first pixel (1, 5): numbered before the other class-1 region
    m[3:5, 8:12] = 2
    m[11, :] = IGNORE
    return m


def write_pair(root: Path, split: str, name: str, image: np.ndarray, mask: np.ndarray, mode: str = "L") -> None:
    for sub in ("images", "masks"):
        (root / split / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / split / "images" / f"{name}.png")
    Image.fromarray(mask, mode=mode).save(root / split / "masks" / f"{name}.png")


def pixels(seed: int, h: int = S, w: int = S) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def folder_fixture(root: Path) -> None:
    write_pair(root, "train", "a", pixels(0), mask_a())
    b = np.zeros((S, S), np.uint8)
    b[2:10, 2:10] = 2
    write_pair(root, "train", "b", pixels(1), b)
    c = np.zeros((S, S), np.uint8)
    c[0:3, 0:2] = 1
    write_pair(root, "val", "c", pixels(2), c)


def load(root: Path, **params: Any) -> Any:
    return load_dataset("mask_folder", root=root, **{"image_size": S, **params})


def test_mask_folder_targets_equal_what_was_written(tmp_path: Path) -> None:
    folder_fixture(tmp_path)
    data = load(tmp_path, classes=["road", "car"])
    assert data.classes == ("road", "car") and data.warnings == ()
    assert torch.equal(data.train_images[1], torch.from_numpy(pixels(1)).permute(2, 0, 1))
    t = data.train_targets
    assert np.array_equal(t["semantic"][0].numpy(), mask_a())
    # objects by class, then first pixel: the diagonal pair, the 3x3 block, then the class-2 block
    assert t["boxes"].tolist() == [[[5, 1, 7, 3], [1, 6, 4, 9], [8, 3, 12, 5]],
                                   [[2, 2, 10, 10], [0, 0, 0, 0], [0, 0, 0, 0]]]
    assert t["box_labels"].tolist() == [[0, 0, 1], [1, -1, -1]]
    expected = np.zeros((S, S), np.uint8)
    expected[1, 5], expected[2, 6] = 1, 1
    expected[6:9, 1:4] = 2
    expected[3:5, 8:12] = 3
    expected[11, :] = IGNORE
    assert np.array_equal(t["instances"][0].numpy(), expected)
    assert t["multilabel"].tolist() == [[1, 1], [0, 1]]
    assert data.train_labels.tolist() == [0, 1]  # a: the 3x3 road block (9 pixels) beats the 2x4 car (8)
    assert data.test_targets["boxes"].tolist() == [[[0, 0, 2, 3], [0, 0, 0, 0], [0, 0, 0, 0]]]


def test_mask_folder_default_class_names_and_palette_masks(tmp_path: Path) -> None:
    folder_fixture(tmp_path)
    (tmp_path / "val" / "masks" / "c.png").unlink()
    c = np.zeros((S, S), np.uint8)
    c[0:3, 0:2] = 3
    im = Image.fromarray(c, mode="P")
    im.putpalette([255 - v for v in range(256) for _ in range(3)])  # index 3 is colour (252, 252, 252)
    im.save(tmp_path / "val" / "masks" / "c.png")  # a palette PNG: its indices are read, never its colours
    data = load(tmp_path)
    assert data.classes == ("1", "2", "3") and data.test_labels.tolist() == [2]


def test_mask_folder_skips_regions_past_254(tmp_path: Path) -> None:
    folder_fixture(tmp_path)
    many = np.zeros((32, 32), np.uint8)
    many[::2, ::2] = 1  # 256 isolated pixels: 256 regions
    write_pair(tmp_path, "train", "many", pixels(4, 32, 32), many)
    data = load(tmp_path, image_size=32)
    (message,) = data.warnings
    assert "skipped 2 regions: 2 regions past the 254th of an image" in message
    i = 2  # images sort a, b, many
    assert int((data.train_targets["box_labels"][i] >= 0).sum()) == MAX_OBJECTS
    assert int((data.train_targets["instances"][i] == IGNORE).sum()) == 2


def test_mask_folder_mask_of_another_size(tmp_path: Path) -> None:
    folder_fixture(tmp_path)
    Image.fromarray(np.zeros((S, S + 2), np.uint8), mode="L").save(tmp_path / "train" / "masks" / "b.png")
    with pytest.raises(KdkitError, match=r"mask is 14x12 \(width x height\) but its image") as info:
        load(tmp_path)
    assert info.value.where == str(tmp_path / "train" / "masks" / "b.png")


def test_mask_folder_missing_partners_and_bad_masks(tmp_path: Path) -> None:
    folder_fixture(tmp_path)
    (tmp_path / "train" / "masks" / "b.png").unlink()
    with pytest.raises(KdkitError, match="has no mask"):
        load(tmp_path)
    folder_fixture(tmp_path)
    (tmp_path / "train" / "images" / "b.png").unlink()
    with pytest.raises(KdkitError, match="has no image"):
        load(tmp_path)
    folder_fixture(tmp_path)
    Image.fromarray(pixels(9)).save(tmp_path / "train" / "masks" / "b.png")
    with pytest.raises(KdkitError, match="mask has mode 'RGB'; it must hold one index per pixel"):
        load(tmp_path)
    folder_fixture(tmp_path)
    with pytest.raises(KdkitError, match="holds index 2, but there are 1 classes"):
        load(tmp_path, classes=["road"])


def test_mask_folder_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(KdkitError, match=r"needs data\.root"):
        load_dataset("mask_folder")
    write_pair(tmp_path, "train", "a", pixels(0), mask_a())
    with pytest.raises(KdkitError, match="missing folder"):
        load(tmp_path)
    (tmp_path / "val" / "images").mkdir(parents=True)
    with pytest.raises(KdkitError, match="masks does not exist"):
        load(tmp_path)
