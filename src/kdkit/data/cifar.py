"""CIFAR-10 and CIFAR-100 from the official "python version" pickles.

Security: the files are Python pickles (the dataset's own published format), and unpickling can
execute code. These readers use a restricted unpickler that only resolves the few numpy globals a
genuine CIFAR file needs and rejects anything else, but still: only point ``data.root`` at files from
a trusted source (https://www.cs.toronto.edu/~kriz/cifar.html).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit.data.base import ImageData
from kdkit.data.registry import register_dataset
from kdkit.errors import KdkitError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
_CIFAR100_DIR = "cifar-100-python"
_CIFAR100_FILES = ("train", "test", "meta")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for pkg in ("numpy.core", "numpy._core"):
        allowed[(f"{pkg}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{pkg}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{pkg}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("_codecs", "encode")] = __import__("codecs").encode  # bytes pickled by Python 3 at protocol 2
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that only resolves the numpy globals needed to rebuild arrays."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed global, or raise ``UnpicklingError`` for anything else."""
        if _CifarUnpickler._allowed is None:
            _CifarUnpickler._allowed = _numpy_globals()
        try:
            return _CifarUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def load_pickle(path: Path) -> dict[bytes, Any]:
    """Load one CIFAR pickle (``encoding="bytes"``, so keys are ``bytes``) with the restricted unpickler.

    Args:
        path: The pickle file. Only use trusted files: see the module docstring.

    Returns:
        The unpickled dict.

    Raises:
        KdkitError: If the file is unreadable, not a pickle, refers to disallowed globals, or is not a dict.
    """
    try:
        with path.open("rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, OSError) as e:
        raise KdkitError(f"not a valid CIFAR pickle ({e})",
                         fix="re-extract the official 'python version' archive from "
                             "https://www.cs.toronto.edu/~kriz/cifar.html", where=str(path)) from None
    if not isinstance(obj, dict):
        raise KdkitError(f"holds a {type(obj).__name__}, expected a dict", where=str(path))
    return obj


def _key(obj: dict[bytes, Any], key: str, path: Path) -> Any:
    for k in (key.encode(), key):
        if k in obj:
            return obj[k]
    raise KdkitError(f"no key {key!r} in the pickle", choices=[k.decode() if isinstance(k, bytes) else str(k)
                                                              for k in obj],
                     fix="the file does not look like a CIFAR pickle; re-extract the official archive",
                     where=str(path))


def _find_folder(root: str | Path | None, dataset: str, dirname: str, files: tuple[str, ...], url_name: str) -> Path:
    fix = (f"download {url_name} from https://www.cs.toronto.edu/~kriz/cifar.html, extract it, and set "
           f"data.root to the extracted {dirname} folder or its parent")
    if root is None:
        raise KdkitError(f"dataset {dataset!r} needs data.root", fix=fix, where="data.root")
    root = Path(root)
    if not root.is_dir():
        raise KdkitError(f"{dataset} folder {root} does not exist", fix=fix, where="data.root")
    candidates = [root, root / dirname]
    for folder in candidates:
        if all((folder / name).is_file() for name in files):
            return folder
    # Report against the candidate that holds the most files (the folder itself if neither holds any).
    best = max(candidates, key=lambda c: sum((c / n).is_file() for n in files))
    missing = [str(best / n) for n in files if not (best / n).is_file()]
    other = "" if best != root else f" (or the same names under {root / dirname})"
    raise KdkitError(f"{dataset} files missing: {', '.join(missing)}{other}", fix=fix, where="data.root")


def _images(batch: dict[bytes, Any], path: Path) -> torch.Tensor:
    data = np.asarray(_key(batch, "data", path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise KdkitError(f"'data' should be uint8 (N, 3072), got {data.dtype} {data.shape}",
                         fix="re-extract the official archive", where=str(path))
    return torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())


def _labels(batch: dict[bytes, Any], key: str, path: Path) -> torch.Tensor:
    return torch.as_tensor(np.asarray(_key(batch, key, path), dtype=np.int64))


def _names(meta: dict[bytes, Any], key: str, path: Path) -> tuple[str, ...]:
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in _key(meta, key, path))


@register_dataset("cifar10", help="CIFAR-10 32x32 RGB, 10 classes (python pickles; needs data.root)")
def cifar10(root: str | Path | None = None) -> ImageData:
    """CIFAR-10: 50000 train / 10000 test 32x32 RGB images of 10 classes.

    Reads ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``. These are pickles:
    loading a pickle can execute code, so only use trusted files (see the module docstring).

    Args:
        root: The extracted ``cifar-10-batches-py`` folder, or its parent.

    Returns:
        The dataset, with the published mean/std.

    Raises:
        KdkitError: If ``root`` is missing or any file is missing or malformed.
    """
    folder = _find_folder(root, "cifar10", _CIFAR10_DIR, _CIFAR10_FILES, "cifar-10-python.tar.gz")
    train = [load_pickle(folder / f"data_batch_{i}") for i in range(1, 6)]
    test = load_pickle(folder / "test_batch")
    meta = load_pickle(folder / "batches.meta")
    return ImageData(
        name="cifar10",
        train_images=torch.cat([_images(b, folder / f"data_batch_{i}") for i, b in enumerate(train, 1)]),
        train_labels=torch.cat([_labels(b, "labels", folder / f"data_batch_{i}") for i, b in enumerate(train, 1)]),
        test_images=_images(test, folder / "test_batch"),
        test_labels=_labels(test, "labels", folder / "test_batch"),
        classes=_names(meta, "label_names", folder / "batches.meta"),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        source=f"{folder} (python pickles)",
    )


@register_dataset("cifar100", help="CIFAR-100 32x32 RGB, 100 fine classes (python pickles; needs data.root)")
def cifar100(root: str | Path | None = None, coarse: bool = False) -> ImageData:
    """CIFAR-100: 50000 train / 10000 test 32x32 RGB images of 100 classes (or 20 superclasses).

    Reads ``cifar-100-python/{train, test, meta}``. These are pickles: loading a pickle can execute
    code, so only use trusted files (see the module docstring).

    Args:
        root: The extracted ``cifar-100-python`` folder, or its parent.
        coarse: Use the 20 coarse superclass labels instead of the 100 fine labels.

    Returns:
        The dataset, with the published mean/std.

    Raises:
        KdkitError: If ``root`` is missing or any file is missing or malformed.
    """
    folder = _find_folder(root, "cifar100", _CIFAR100_DIR, _CIFAR100_FILES, "cifar-100-python.tar.gz")
    kind = "coarse" if coarse else "fine"
    train, test, meta = (load_pickle(folder / n) for n in _CIFAR100_FILES)
    return ImageData(
        name="cifar100",
        train_images=_images(train, folder / "train"),
        train_labels=_labels(train, f"{kind}_labels", folder / "train"),
        test_images=_images(test, folder / "test"),
        test_labels=_labels(test, f"{kind}_labels", folder / "test"),
        classes=_names(meta, f"{kind}_label_names", folder / "meta"),
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        source=f"{folder} (python pickles{', coarse labels' if coarse else ''})",
    )
