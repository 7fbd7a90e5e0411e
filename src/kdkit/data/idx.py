"""IDX files (the MNIST / Fashion-MNIST format) and the ``fashion_mnist`` and ``mnist`` readers.

An IDX file is a 4-byte magic number ``0x00 0x00 TYPE NDIM``, then ``NDIM`` big-endian ``uint32``
dimension sizes, then the data in C order, big-endian. ``TYPE`` is 0x08 ubyte, 0x09 byte, 0x0B short,
0x0C int, 0x0D float, 0x0E double. Files may be gzip-compressed (detected from the content, not the name).
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdkit.data.base import ImageData
from kdkit.data.registry import register_dataset
from kdkit.errors import KdkitError

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_DTYPE_CODES: dict[np.dtype, int] = {d.newbyteorder("="): code for code, d in _IDX_DTYPES.items()}

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_SPLIT_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _corrupt(path: Path, what: str) -> KdkitError:
    return KdkitError(f"not a valid IDX file: {what}",
                      fix="re-download or re-install the file (it looks truncated or corrupt)", where=str(path))


def read_idx(path: str | Path) -> Tensor:
    """Read an IDX file (optionally gzip-compressed) into a tensor.

    Args:
        path: The file; gzip compression is detected from its first bytes.

    Returns:
        A tensor of the file's shape and native-endian dtype (``uint8`` for ubyte data), owning its memory.

    Raises:
        KdkitError: If the file is missing, truncated, has trailing bytes, or has a bad magic number.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KdkitError("IDX file does not exist", fix="check the path", where=str(path)) from None
    except OSError as e:
        raise KdkitError(f"cannot read the IDX file ({e})", fix="check the path and its permissions",
                         where=str(path)) from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise _corrupt(path, f"gzip stream is damaged ({e})") from None
    if len(raw) < 4:
        raise _corrupt(path, f"only {len(raw)} bytes, shorter than the 4-byte magic number")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise _corrupt(path, f"bad magic number 0x{raw[:4].hex()} (expected 0x0000TTNN with type TT in "
                             f"{', '.join(f'{c:02x}' for c in _IDX_DTYPES)})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _corrupt(path, f"header declares {ndim} dimensions but the file has only {len(raw)} bytes")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = math.prod(dims)
    expected = header + count * dtype.itemsize
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "has trailing bytes"
        raise _corrupt(path, f"{state}: shape {dims} of {dtype.itemsize}-byte values needs {expected} bytes, "
                             f"found {len(raw)}")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return torch.from_numpy(arr.astype(dtype.newbyteorder("="), copy=True))


def write_idx(path: str | Path, array: np.ndarray | Tensor) -> Path:
    """Write an array as an IDX file, gzip-compressed if ``path`` ends in ``.gz``.

    Useful to make small test files in the MNIST layout.

    Args:
        path: Destination file; parent folders are created.
        array: A numpy array or CPU tensor of dtype uint8, int8, int16, int32, float32 or float64.

    Returns:
        The path written.

    Raises:
        KdkitError: If the dtype has no IDX type code or the array has more than 255 dimensions.
    """
    path = Path(path)
    arr = array.detach().cpu().numpy() if isinstance(array, Tensor) else np.asarray(array)
    native = arr.dtype.newbyteorder("=")
    if native not in _DTYPE_CODES:
        raise KdkitError(f"cannot write dtype {arr.dtype} to IDX", choices=[str(d) for d in _DTYPE_CODES],
                         fix="convert the array to one of the IDX dtypes first", where=str(path))
    if arr.ndim > 255:
        raise KdkitError(f"IDX supports at most 255 dimensions, got {arr.ndim}", where=str(path))
    code = _DTYPE_CODES[native]
    payload = (bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
               + np.ascontiguousarray(arr, dtype=_IDX_DTYPES[code]).tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    path.write_bytes(payload)
    return path


def _find_idx_files(root: Path, dataset: str, fix: str) -> dict[str, Path]:
    """Locate the four MNIST-layout files in ``root`` (or torchvision's ``root/<Name>/raw``)."""
    if not root.is_dir():
        raise KdkitError(f"{dataset} folder {root} does not exist", fix=fix, where="data.root")
    def lookup(folder: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for key, stem in _SPLIT_FILES.items():
            for name in (stem + ".gz", stem):
                if (folder / name).is_file():
                    found[key] = folder / name
                    break
        return found

    found = lookup(root)
    if len(found) < len(_SPLIT_FILES):
        for raw in sorted(p for p in root.glob("*/raw") if p.is_dir()):  # torchvision's <Name>/raw layout
            if len(in_raw := lookup(raw)) == len(_SPLIT_FILES):
                return in_raw
        missing = [stem + "[.gz]" for key, stem in _SPLIT_FILES.items() if key not in found]
        raise KdkitError(f"{dataset} files missing in {root}: {', '.join(missing)}", fix=fix, where="data.root")
    return found

def _load_idx_dataset(name: str, root: Path, classes: tuple[str, ...], mean: float, std: float,
                      fix: str) -> ImageData:
    files = _find_idx_files(root, name, fix)
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dtype != torch.uint8 or images.ndim != 3 or labels.ndim != 1:
            raise KdkitError(f"{files[f'{split}_images'].name} / {files[f'{split}_labels'].name} should hold "
                             f"uint8 images (N, H, W) and labels (N,), got {images.dtype} {tuple(images.shape)} "
                             f"and {tuple(labels.shape)}", fix=fix, where=str(files[f"{split}_images"].parent))
        if images.shape[0] != labels.shape[0]:
            raise KdkitError(f"{files[f'{split}_images'].name} has {images.shape[0]} images but "
                             f"{files[f'{split}_labels'].name} has {labels.shape[0]} labels", fix=fix,
                             where=str(files[f"{split}_images"].parent))
    folder = files["train_images"].parent
    return ImageData(
        name=name,
        train_images=arrays["train_images"].unsqueeze(1),
        train_labels=arrays["train_labels"].to(torch.int64),
        test_images=arrays["test_images"].unsqueeze(1),
        test_labels=arrays["test_labels"].to(torch.int64),
        classes=classes,
        mean=(mean,),
        std=(std,),
        source=f"{folder} (idx)",
    )


@register_dataset("fashion_mnist", help="Fashion-MNIST 28x28 grayscale, 10 classes (apt-get install "
                                        "dataset-fashion-mnist)")
def fashion_mnist(root: str | Path | None = None) -> ImageData:
    """Fashion-MNIST: 60000 train / 10000 test 28x28 grayscale images of 10 clothing classes.

    Args:
        root: Folder with the four IDX files (``.gz`` or uncompressed); defaults to
            ``/usr/share/datasets/fashion-mnist``, where ``apt-get install dataset-fashion-mnist`` puts them.
            A torchvision download folder (``root/FashionMNIST/raw``) works too.

    Returns:
        The dataset, with the published mean/std (0.2860, 0.3530).

    Raises:
        KdkitError: If the folder or any file is missing or corrupt.
    """
    fix = ("apt-get install dataset-fashion-mnist, or set data.root to a folder with the idx files, "
           "or use dataset: digits for a zero-setup run")
    return _load_idx_dataset("fashion_mnist", Path(root) if root is not None else FASHION_MNIST_ROOT,
                             FASHION_MNIST_CLASSES, 0.2860, 0.3530, fix)


@register_dataset("mnist", help="MNIST handwritten digits 28x28 grayscale, 10 classes (needs data.root)")
def mnist(root: str | Path | None = None) -> ImageData:
    """MNIST: 60000 train / 10000 test 28x28 grayscale handwritten digits.

    Args:
        root: Folder with the four IDX files (``.gz`` or uncompressed), or a torchvision download folder
            (``root/MNIST/raw``). Required: there is no standard install location.

    Returns:
        The dataset, with the published mean/std (0.1307, 0.3081).

    Raises:
        KdkitError: If ``root`` is not given, or a file is missing or corrupt.
    """
    fix = ("set data.root to a folder with the MNIST idx files (train-images-idx3-ubyte.gz, ...), "
           "or use dataset: digits for a zero-setup run")
    if root is None:
        raise KdkitError("dataset 'mnist' needs data.root (it has no standard install location)", fix=fix,
                         where="data.root")
    return _load_idx_dataset("mnist", Path(root), tuple(str(i) for i in range(10)), 0.1307, 0.3081, fix)
