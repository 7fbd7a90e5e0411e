"""IDX reading/writing and the fashion_mnist / mnist readers."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from kdkit.data import load_dataset, read_idx, write_idx
from kdkit.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT
from kdkit.errors import KdkitError

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def make_mnist_dir(root: Path, gz: bool, n_train: int = 20, n_test: int = 10) -> Path:
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    write_idx(root / (FILES[0] + suffix), rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8))
    write_idx(root / (FILES[1] + suffix), (np.arange(n_train) % 10).astype(np.uint8))
    write_idx(root / (FILES[2] + suffix), rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8))
    write_idx(root / (FILES[3] + suffix), (np.arange(n_test) % 10).astype(np.uint8))
    return root


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path: Path, name: str, dtype: type) -> None:
    arr = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    if dtype is np.uint8:
        arr = np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    path = write_idx(tmp_path / name, arr)
    if name.endswith(".gz"):
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    out = read_idx(path)
    assert out.shape == (2, 3, 5)
    assert out.dtype == torch.from_numpy(arr).dtype
    np.testing.assert_array_equal(out.numpy(), arr)


def test_idx_header_is_big_endian(tmp_path: Path) -> None:
    raw = write_idx(tmp_path / "x.idx", np.zeros((300, 2), dtype=np.int32)).read_bytes()
    assert raw[:4] == bytes([0, 0, 0x0C, 2])
    assert raw[4:12] == (300).to_bytes(4, "big") + (2).to_bytes(4, "big")


def test_idx_accepts_tensor_and_1d(tmp_path: Path) -> None:
    out = read_idx(write_idx(tmp_path / "l.idx", torch.tensor([3, 1, 4], dtype=torch.uint8)))
    assert out.tolist() == [3, 1, 4] and out.dtype == torch.uint8


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_names_file(tmp_path: Path, gz: bool) -> None:
    path = write_idx(tmp_path / "imgs.idx", np.zeros((4, 28, 28), dtype=np.uint8))
    raw = path.read_bytes()[:-10]
    bad = tmp_path / ("bad.idx.gz" if gz else "bad.idx")
    bad.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(KdkitError, match="truncated") as info:
        read_idx(bad)
    assert str(bad) in str(info.value)


def test_cut_gzip_stream_and_bad_magic(tmp_path: Path) -> None:
    gz = write_idx(tmp_path / "a.idx.gz", np.zeros((50, 28, 28), dtype=np.uint8))
    cut = tmp_path / "cut.idx.gz"
    cut.write_bytes(gz.read_bytes()[:40])
    with pytest.raises(KdkitError, match=r"cut\.idx\.gz"):
        read_idx(cut)
    junk = tmp_path / "junk.idx"
    junk.write_bytes(b"\x12\x34\x56\x78" + bytes(20))
    with pytest.raises(KdkitError, match="magic"):
        read_idx(junk)
    with pytest.raises(KdkitError, match=r"junk\.idx"):
        read_idx(junk)


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_tmp_root(tmp_path: Path, gz: bool) -> None:
    data = load_dataset("fashion_mnist", root=make_mnist_dir(tmp_path, gz))
    assert data.train_images.shape == (20, 1, 28, 28) and data.test_images.shape == (10, 1, 28, 28)
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    assert data.classes == FASHION_MNIST_CLASSES and data.num_classes == 10
    assert data.mean == (0.2860,) and data.std == (0.3530,)
    assert str(tmp_path) in data.source


def test_mnist_needs_root_and_loads(tmp_path: Path) -> None:
    with pytest.raises(KdkitError, match=r"data\.root"):
        load_dataset("mnist")
    data = load_dataset("mnist", root=make_mnist_dir(tmp_path, gz=True))
    assert data.classes == tuple(str(i) for i in range(10)) and data.mean == (0.1307,)


def test_missing_files_are_named(tmp_path: Path) -> None:
    write_idx(tmp_path / (FILES[0] + ".gz"), np.zeros((2, 28, 28), dtype=np.uint8))
    with pytest.raises(KdkitError) as info:
        load_dataset("fashion_mnist", root=tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg and "apt-get install dataset-fashion-mnist" in msg
    for name in FILES[1:]:
        assert name in msg
    assert "train-images-idx3-ubyte" not in msg.split("missing", 1)[1].split("fix:")[0]


def test_missing_root_folder(tmp_path: Path) -> None:
    with pytest.raises(KdkitError, match="does not exist"):
        load_dataset("fashion_mnist", root=tmp_path / "nope")


def test_label_count_mismatch(tmp_path: Path) -> None:
    make_mnist_dir(tmp_path, gz=False)
    write_idx(tmp_path / FILES[1], np.zeros(7, dtype=np.uint8))
    with pytest.raises(KdkitError, match=r"20 images but .* 7 labels"):
        load_dataset("fashion_mnist", root=tmp_path)


@pytest.mark.skipif(not (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").exists()
                    and not (FASHION_MNIST_ROOT / "train-images-idx3-ubyte").exists(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist() -> None:
    data = load_dataset("fashion_mnist")
    assert data.train_images.shape == (60000, 1, 28, 28) and data.test_images.shape == (10000, 1, 28, 28)
    assert data.num_classes == 10 and data.image_size == 28 and data.in_channels == 1
    assert torch.bincount(data.train_labels).tolist() == [6000] * 10
