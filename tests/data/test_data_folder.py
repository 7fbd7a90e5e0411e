"""The image_folder reader on tiny PIL-written PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdkit.data import load_dataset
from kdkit.errors import KdkitError


def make_tree(root: Path, splits: dict[str, tuple[str, ...]], per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for k, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                arr = np.full((10, 14, 3), 40 * k + i, dtype=np.uint8) + rng.integers(0, 5, (10, 14, 3), dtype=np.uint8)
                ext = ".PNG" if i == 0 else ".png"
                Image.fromarray(arr).save(root / split / cls / f"img{i}{ext}", format="PNG")
    return root


def test_image_folder_loads(tmp_path: Path) -> None:
    make_tree(tmp_path, {"train": ("cat", "ant"), "val": ("cat", "ant")})
    (tmp_path / "train" / "ant" / "notes.txt").write_text("ignored")
    data = load_dataset("image_folder", root=tmp_path, image_size=8)
    assert data.classes == ("ant", "cat")
    assert data.train_images.shape == (6, 3, 8, 8) and data.test_images.shape == (6, 3, 8, 8)
    assert data.train_images.dtype == torch.uint8
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    # 'ant' was written with brighter pixels than 'cat': labels follow the sorted names, not creation order.
    assert data.train_images[:3].float().mean() > data.train_images[3:].float().mean() + 20
    assert len(data.mean) == 3 and all(s > 0 for s in data.std)


def test_image_folder_grayscale_and_test_split(tmp_path: Path) -> None:
    make_tree(tmp_path, {"train": ("a", "b"), "test": ("a", "b")}, per_class=1)
    data = load_dataset("image_folder", root=tmp_path, image_size=5, grayscale=True)
    assert data.train_images.shape == (2, 1, 5, 5) and data.in_channels == 1


def test_image_folder_mismatched_classes(tmp_path: Path) -> None:
    make_tree(tmp_path, {"train": ("a", "b"), "val": ("a", "c")}, per_class=1)
    with pytest.raises(KdkitError, match="differ"):
        load_dataset("image_folder", root=tmp_path)


def test_image_folder_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(KdkitError, match=r"needs data\.root"):
        load_dataset("image_folder")
    make_tree(tmp_path, {"train": ("a",)}, per_class=1)
    with pytest.raises(KdkitError, match="val"):
        load_dataset("image_folder", root=tmp_path)
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(KdkitError, match="no images"):
        load_dataset("image_folder", root=tmp_path)
    (tmp_path / "val" / "a").rmdir()
    with pytest.raises(KdkitError, match="no class sub-folders"):
        load_dataset("image_folder", root=tmp_path)


def test_corrupt_image_named(tmp_path: Path) -> None:
    make_tree(tmp_path, {"train": ("a",), "val": ("a",)}, per_class=1)
    bad = tmp_path / "val" / "a" / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(KdkitError, match=r"broken\.jpg"):
        load_dataset("image_folder", root=tmp_path)
