"""CIFAR-10 / CIFAR-100 readers on tiny fake pickles with the real key names."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from kdkit.data import load_dataset
from kdkit.errors import KdkitError


def _batch(n: int, seed: int, label_key: str = "labels", n_classes: int = 10) -> dict[bytes, object]:
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key.encode(): [int(v) for v in rng.integers(0, n_classes, n)],
            b"batch_label": b"fake batch"}


def _dump(path: Path, obj: object, protocol: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def make_cifar10(parent: Path) -> Path:
    folder = parent / "cifar-10-batches-py"
    for i in range(1, 6):
        _dump(folder / f"data_batch_{i}", _batch(3, i))
    _dump(folder / "test_batch", _batch(4, 9), protocol=5)
    _dump(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": 3})
    return folder


def make_cifar100(parent: Path) -> Path:
    folder = parent / "cifar-100-python"
    for name, n, seed in (("train", 6, 1), ("test", 4, 2)):
        b = _batch(n, seed, "fine_labels", 100)
        b[b"coarse_labels"] = [v % 20 for v in b[b"fine_labels"]]
        _dump(folder / name, b, protocol=4)
    _dump(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                            b"coarse_label_names": [f"s{i}".encode() for i in range(20)]})
    return folder


@pytest.mark.parametrize("use_parent", [False, True])
def test_cifar10(tmp_path: Path, use_parent: bool) -> None:
    folder = make_cifar10(tmp_path)
    data = load_dataset("cifar10", root=tmp_path if use_parent else folder)
    assert data.train_images.shape == (15, 3, 32, 32) and data.test_images.shape == (4, 3, 32, 32)
    assert data.classes == tuple(f"c{i}" for i in range(10))
    first = pickle.load((folder / "data_batch_1").open("rb"), encoding="bytes")
    assert torch.equal(data.train_images[:3], torch.from_numpy(first[b"data"].reshape(3, 3, 32, 32)))
    assert data.train_labels[:3].tolist() == first[b"labels"] and data.train_labels.dtype == torch.int64
    assert data.mean == (0.4914, 0.4822, 0.4465) and data.in_channels == 3 and data.image_size == 32


@pytest.mark.parametrize("use_parent", [False, True])
def test_cifar100(tmp_path: Path, use_parent: bool) -> None:
    folder = make_cifar100(tmp_path)
    data = load_dataset("cifar100", root=tmp_path if use_parent else folder)
    assert data.train_images.shape == (6, 3, 32, 32) and data.test_images.shape == (4, 3, 32, 32)
    assert data.num_classes == 100 and data.classes[:2] == ("f0", "f1")
    train = pickle.load((folder / "train").open("rb"), encoding="bytes")
    assert data.train_labels.tolist() == train[b"fine_labels"]
    coarse = load_dataset("cifar100", root=folder, coarse=True)
    assert coarse.num_classes == 20 and coarse.train_labels.tolist() == train[b"coarse_labels"]


def test_cifar_missing_files(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(KdkitError) as info:
        load_dataset("cifar10", root=tmp_path)
    assert str(folder / "data_batch_3") in str(info.value) and "cifar-10-python.tar.gz" in str(info.value)
    with pytest.raises(KdkitError, match="cifar-100-python"):
        load_dataset("cifar100", root=tmp_path)
    with pytest.raises(KdkitError, match=r"needs data\.root"):
        load_dataset("cifar10")


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.getenv, ("HOME",))


def test_cifar_refuses_arbitrary_globals(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    _dump(folder / "test_batch", {b"data": _Evil(), b"labels": []})
    with pytest.raises(KdkitError, match="refusing to load global"):
        load_dataset("cifar10", root=folder)
