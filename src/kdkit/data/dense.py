"""What the dense-data readers (``coco``, ``voc``, ``mask_folder``) share: one image's targets, resizing, stacking.

Every reader produces the targets of :mod:`kdkit.data.scenes`, under the same keys
(:data:`~kdkit.data.scenes.TARGET_KEYS`) with the same layout, so the detection and segmentation tasks read them
unchanged (``S`` the image size, ``K`` the most objects of an image, ``C`` the classes):

* ``boxes``: ``float32 (N, K, 4)`` pixel boxes ``x0, y0, x1, y1`` on the stored (resized) image, ``x1``/``y1``
  exclusive (a box covering columns 3..5 is ``x0 = 3, x1 = 6``); padding rows are 0.
* ``box_labels``: ``int64 (N, K)``, the class ``k`` of each object, -1 for padding.
* ``semantic``: ``uint8 (N, S, S)``, 0 background, ``k + 1`` where an object of class ``k`` shows.
* ``instances``: ``uint8 (N, S, S)``, 0 background, ``j + 1`` where object ``j`` (row ``j`` of ``boxes``) shows.
* ``multilabel``: ``uint8 (N, C)``, 1 for each class with an object in the image.

Two conventions the scenes never need:

* **Ignore.** :data:`IGNORE` (255) in ``semantic`` or ``instances`` marks a pixel whose truth the files do not give:
  Pascal VOC's void border, a COCO crowd region in ``instances``, the whole object map of an image that has none.
  A loss or metric skips those pixels (the segmentation task maps 255 to its ignore index). So at most 254 classes
  and 254 objects per image fit the ``uint8`` maps.
* **Size.** Images of any size are fitted to ``image_size x image_size`` by :func:`fit`: scaled so the longer side
  is ``image_size`` (aspect ratio kept), then padded at the right and bottom with zeros (image 0, background 0 in
  both maps). Boxes are scaled by the same factors, ``nw / w`` and ``nh / h``; padding at the right and bottom
  moves no coordinate.

The class label of an image (``train_labels``) is, as for the scenes, its dominant object's class: the object with
the most visible pixels in ``instances`` (ties: the earliest); in an image without an object map, the largest box.
An image without any object has no label, so it is left out (and counted in :attr:`ImageData.warnings`).

Object order is the files' order (annotation order, XML order); where masks overlap, a later object covers an
earlier one, as a later-pasted scene object does.

Cache: with ``cache_dir``, a reader keeps what it loaded in one compressed ``.npz`` (:func:`cached`), keyed by its
parameters and the size and modification time of every input file, written atomically, and rebuilt when damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from kdkit.data.base import ImageData, channel_stats
from kdkit.errors import KdkitError

IGNORE = 255
"""Value of a ``semantic`` / ``instances`` pixel whose truth is unknown (see the module docstring)."""
MAX_OBJECTS = IGNORE - 1
"""Most objects an image can hold: instance ids ``1..254`` (0 is background, 255 :data:`IGNORE`)."""
BOX_TOLERANCE = 1.0
"""A box may overhang its image by this many pixels (rounding in annotation tools) and is then clipped to it."""


@dataclass
class DenseImage:
    """One image and its targets at its own resolution (or at the stored size, after :func:`fit`).

    Attributes:
        name: Where the image came from (shown in messages), e.g. its file path.
        image: ``uint8 (H, W, C)``.
        boxes: ``float32 (n, 4)`` pixel boxes ``x0, y0, x1, y1`` (exclusive ends), one row per object.
        labels: ``int64 (n,)`` class of each object.
        semantic: ``uint8 (H, W)`` class map (0 background, ``k + 1`` class ``k``, :data:`IGNORE` unknown).
        instances: ``uint8 (H, W)`` object map (0 background, ``j + 1`` object ``j``, :data:`IGNORE` unknown).
    """

    name: str
    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    semantic: np.ndarray
    instances: np.ndarray


class SkipLog:
    """Counts of the annotations a reader skipped, per file and reason, with the first example of each.

    Args:
        kind: What is counted, e.g. ``"annotations"`` or ``"objects"``.
    """

    def __init__(self, kind: str = "annotations") -> None:
        self.kind = kind
        self.counts: dict[str, dict[str, int]] = defaultdict(dict)
        self.examples: dict[tuple[str, str], str] = {}

    def add(self, file: str | Path, reason: str, example: str) -> None:
        """Count one skipped item of ``file`` for ``reason``; ``example`` says which (kept for the first only)."""
        per_file = self.counts[str(file)]
        per_file[reason] = per_file.get(reason, 0) + 1
        self.examples.setdefault((str(file), reason), example)

    def messages(self) -> list[str]:
        """One sentence per file: how many were skipped, and why (with an example of each reason)."""
        out = []
        for file, reasons in self.counts.items():
            total = sum(reasons.values())
            parts = [f"{n} {reason} (first: {self.examples[(file, reason)]})" for reason, n in reasons.items()]
            out.append(f"{file}: skipped {total} {self.kind}: " + "; ".join(parts))
        return out


def read_image(path: Path, grayscale: bool) -> np.ndarray:
    """Read an image file as ``uint8 (H, W, C)``, RGB or (``grayscale``) one channel.

    Raises:
        KdkitError: If the file is missing or cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise KdkitError("image file not found", fix="put the image there, or remove its entry from the "
                         "annotations", where=str(path))
    try:
        with Image.open(path) as im:
            arr = np.array(im.convert("L" if grayscale else "RGB"), dtype=np.uint8)  # a writable copy
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise KdkitError(f"cannot read the image ({e})", fix="remove or replace the corrupt file",
                         where=str(path)) from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def read_index_png(path: Path, what: str) -> np.ndarray:
    """Read a PNG of per-pixel indices (palette ``P`` or grey ``L``) as ``uint8 (H, W)``, the raw indices.

    A palette PNG's pixel values are its palette indices (Pascal VOC's class maps are such files), never colours.

    Raises:
        KdkitError: If the file is missing, undecodable, or not an 8-bit palette or grey image.
    """
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise KdkitError(f"{what} not found", fix=f"add the {what}, or leave its image out of the split",
                         where=str(path))
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise KdkitError(f"{what} has mode {im.mode!r}; it must hold one index per pixel",
                                 choices=["P", "L"], fix="save it as an 8-bit palette (P) or grey (L) PNG of indices",
                                 where=str(path))
            return np.array(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        if isinstance(e, KdkitError):
            raise
        raise KdkitError(f"cannot read the {what} ({e})", fix="remove or replace the corrupt file",
                         where=str(path)) from None


def check_same_size(image: np.ndarray, mask: np.ndarray, image_path: Path, mask_path: Path, what: str) -> None:
    """Refuse a mask whose size differs from its image's (a whole-file problem: nothing of it can be placed).

    Raises:
        KdkitError: Naming both files and both sizes.
    """
    if mask.shape[:2] != image.shape[:2]:
        (h, w), (mh, mw) = image.shape[:2], mask.shape[:2]
        raise KdkitError(f"{what} is {mw}x{mh} (width x height) but its image {image_path} is {w}x{h}",
                         fix=f"give the {what} its image's size (re-export it, or resize it with nearest-neighbour)",
                         where=str(mask_path))


def box_problem(box: tuple[float, float, float, float], width: int, height: int) -> tuple[str | None, bool]:
    """Why ``box`` (``x0, y0, x1, y1``, exclusive ends) cannot be an object of a ``width x height`` image.

    Returns:
        ``(reason, clipped)``: the reason to skip it (``None`` if it is fine) and whether it overhangs the image by
        at most :data:`BOX_TOLERANCE` and is to be clipped.
    """
    x0, y0, x1, y1 = box
    if not all(np.isfinite(v) for v in box):
        return "boxes with a non-finite coordinate", False
    if x1 < x0 or y1 < y0:
        return "boxes with x2 < x1 or y2 < y1", False
    if x1 == x0 or y1 == y0:
        return "boxes of zero width or height", False
    tol = BOX_TOLERANCE
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        return f"boxes outside the {width}x{height} image (by more than {tol:g} px)", False
    return None, bool(x0 < 0 or y0 < 0 or x1 > width or y1 > height)


def clip_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[float, float, float, float]:
    """``box`` clipped to the image ``[0, width] x [0, height]``."""
    x0, y0, x1, y1 = box
    return max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))


def _resize(array: np.ndarray, width: int, height: int, method: str) -> np.ndarray:
    """``array`` (``(H, W)`` or ``(H, W, C)`` uint8) resized by Pillow (in C, several times faster than torch here)."""
    from PIL import Image

    resample = getattr(Image, "Resampling", Image)  # Resampling: Pillow >= 9.1
    planes = array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array
    out = np.asarray(Image.fromarray(planes).resize((width, height), getattr(resample, method)))
    return out.reshape(height, width, *array.shape[2:])


def fit(item: DenseImage, size: int) -> DenseImage:
    """Scale ``item`` so its longer side is ``size``, then pad it at the right and bottom to ``size x size``.

    The image is resized bilinearly (Pillow's, antialiased when shrinking), the two maps by nearest neighbour
    (each output pixel takes the input pixel under its centre), boxes by ``nw / w`` and ``nh / h``. Padding is 0 in
    the image and both maps. An image already ``size x size`` is returned unchanged.

    Args:
        item: The image at its own resolution.
        size: Output height and width.

    Returns:
        The fitted image.
    """
    h, w = item.image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    image, semantic, instances, boxes = item.image, item.semantic, item.instances, item.boxes
    if (nh, nw) != (h, w):
        image = _resize(image, nw, nh, "BILINEAR")
        semantic, instances = _resize(semantic, nw, nh, "NEAREST"), _resize(instances, nw, nh, "NEAREST")
        boxes = (boxes * np.array([nw / w, nh / h, nw / w, nh / h], dtype=np.float64)).astype(np.float32)
    if (nh, nw) != (size, size):
        pad = ((0, size - nh), (0, size - nw))
        image = np.pad(image, (*pad, (0, 0)))
        semantic, instances = np.pad(semantic, pad), np.pad(instances, pad)
    return DenseImage(item.name, image, boxes, item.labels, semantic, instances)


def dominant_label(item: DenseImage) -> int:
    """The class of ``item``'s dominant object: most visible pixels, else (no object map) the largest box."""
    n = len(item.labels)
    areas = np.bincount(item.instances.ravel(), minlength=IGNORE + 1)[1:n + 1]
    if not areas.any():
        b = item.boxes
        areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return int(item.labels[int(np.argmax(areas))])  # argmax takes the first of tied maxima


def cap_objects(item: DenseImage, limit: int) -> DenseImage:
    """``item`` with its first ``limit`` objects only; the pixels of the others become :data:`IGNORE` in
    ``instances`` (they are still objects, of an unknown id)."""
    instances = item.instances.copy()
    instances[(instances > limit) & (instances != IGNORE)] = IGNORE
    return DenseImage(item.name, item.image, item.boxes[:limit], item.labels[:limit], item.semantic, instances)


def _stack(items: list[DenseImage], k: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    n = len(items)
    size, channels = items[0].image.shape[0], items[0].image.shape[2]
    images = np.empty((n, size, size, channels), dtype=np.uint8)
    semantic = np.empty((n, size, size), dtype=np.uint8)
    instances = np.empty((n, size, size), dtype=np.uint8)
    boxes = np.zeros((n, k, 4), dtype=np.float32)
    box_labels = np.full((n, k), -1, dtype=np.int64)
    multilabel = np.zeros((n, num_classes), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    for i, item in enumerate(items):
        images[i], semantic[i], instances[i] = item.image, item.semantic, item.instances
        m = len(item.labels)
        boxes[i, :m], box_labels[i, :m] = item.boxes, item.labels
        multilabel[i, item.labels] = 1
        labels[i] = dominant_label(item)
    targets = {"multilabel": torch.from_numpy(multilabel), "semantic": torch.from_numpy(semantic),
               "instances": torch.from_numpy(instances), "boxes": torch.from_numpy(boxes),
               "box_labels": torch.from_numpy(box_labels)}
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels), targets


def dense_image_data(name: str, splits: dict[str, list[DenseImage]], classes: tuple[str, ...], source: str,
                     warnings: list[str], max_objects: int | None = None) -> ImageData:
    """Stack fitted train and test images into an :class:`ImageData` with the scenes' dense targets.

    Images without objects are left out, and images with more than ``K`` objects keep their first ``K``; both are
    counted in the returned dataset's warnings, per split.

    Args:
        name: Dataset name.
        splits: ``{"train": [...], "test": [...]}``, every image already :func:`fit` to one size.
        classes: Class names, index ``k`` naming class ``k``.
        source: Human-readable origin.
        warnings: What the reader skipped (one sentence per file); extended here.
        max_objects: ``K``, the object rows per image (images with fewer are padded, with more keep their first
            ``K``); ``None``: the most objects of any image.

    Returns:
        The dataset; ``warnings`` lists everything left out.

    Raises:
        KdkitError: If a split has no image with an object, or ``max_objects`` is not in ``[1, 254]``.
    """
    if max_objects is not None and (isinstance(max_objects, bool) or not isinstance(max_objects, int)
                                    or not 1 <= max_objects <= MAX_OBJECTS):
        raise KdkitError(f"{name} max_objects must be an integer in [1, {MAX_OBJECTS}] or null, got {max_objects!r}",
                         fix="use e.g. max_objects: 20, or leave it out to keep every object", where="data.params")
    if len(classes) > MAX_OBJECTS:
        raise KdkitError(f"{name} has {len(classes)} classes; the uint8 class maps hold at most {MAX_OBJECTS}",
                         fix=f"merge classes, or keep at most {MAX_OBJECTS}", where="data.root")
    warnings = list(warnings)
    most = max(len(item.labels) for items in splits.values() for item in items) if any(splits.values()) else 0
    k = most if max_objects is None else max_objects  # the readers keep at most MAX_OBJECTS per image
    kept: dict[str, list[DenseImage]] = {}
    for split, items in splits.items():
        empty = [item.name for item in items if len(item.labels) == 0]
        if empty:
            warnings.append(f"{name} {split} split: left out {len(empty)} image(s) without an object (an image's "
                            f"label is its dominant object's class; first: {empty[0]})")
        over = [item.name for item in items if len(item.labels) > k]
        if over:
            warnings.append(f"{name} {split} split: {len(over)} image(s) hold more than {k} objects; kept their first "
                            f"{k} (the others' pixels are {IGNORE}, ignore, in 'instances'; first: {over[0]})")
        kept[split] = [cap_objects(item, k) if len(item.labels) > k else item for item in items if len(item.labels)]
        if not kept[split]:
            skipped = f"; {' '.join(warnings)}" if warnings else ""
            raise KdkitError(f"{name} {split} split has no image with an object ({len(items)} image(s) read)"
                             f"{skipped}", fix="correct the annotations, or point data.root at other files",
                             where="data.root")
    train_images, train_labels, train_targets = _stack(kept["train"], k, len(classes))
    test_images, test_labels, test_targets = _stack(kept["test"], k, len(classes))
    mean, std = channel_stats(train_images)
    std = tuple(s if s > 0 else 1.0 for s in std)  # constant images: never divide by zero when normalising
    return ImageData(name=name, train_images=train_images, train_labels=train_labels, test_images=test_images,
                     test_labels=test_labels, classes=classes, mean=mean, std=std, source=source,
                     train_targets=train_targets, test_targets=test_targets, warnings=tuple(warnings))


def check_image_size(value: object, name: str) -> int:
    """``value`` as a positive ``image_size``.

    Raises:
        KdkitError: If it is not a positive integer.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KdkitError(f"{name} image_size must be a positive integer, got {value!r}", bad=str(value),
                         fix="use e.g. image_size: 64 (every image is fitted to image_size x image_size)",
                         where="data.params.image_size")
    return value


def atomic_write(path: Path, write: Callable[[BinaryIO], object], *,
                 fix: str = "free space on that disk or choose a writable folder", where: str | None = None) -> None:
    """Write ``path`` with ``write(file)`` via a temporary file in the same folder and an atomic rename: a reader
    never sees a half-written file, and an interrupted write leaves none (the temporary is removed).

    Args:
        path: The file to write.
        write: Writes the content to the open binary file.
        fix: The error's fix (how the user gets a writable place, e.g. the reader's ``cache_dir``).
        where: The error's location (default: ``path``).

    Raises:
        KdkitError: If the folder cannot be created or the write fails.
    """
    where = where or str(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise KdkitError(f"cannot write in {path.parent} ({e})", fix=fix, where=where) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise KdkitError(f"cannot write {path} ({e})", fix=fix, where=where) from None
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


# -- the cache --------------------------------------------------------------------------------------------------

CACHE_VERSION = 1
"""Bump when a reader's conversion or the cache layout changes, so old cache files are not reused."""


def fingerprint(inputs: list[Path]) -> str:
    """sha256 of the path, size and modification time of every file under ``inputs`` (files or folders).

    Any file added, removed, replaced or edited changes it, so a cache keyed by it is never stale; nothing is read.
    """
    digest = hashlib.sha256()
    for root in inputs:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root] if root.is_file() else []
        digest.update(f"{root}\0{len(files)}\n".encode())
        for file in files:
            st = file.stat()
            digest.update(f"{file}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cached(reader: str, params: dict[str, object], inputs: list[Path], cache_dir: str | Path | None,
           build: Callable[[], ImageData]) -> ImageData:
    """``build()``, or, with a ``cache_dir``, the dataset it built before with the same params and input files.

    The cache is one compressed ``.npz``, ``<reader>-<hash>.npz`` in ``cache_dir``, holding every field of the
    dataset (its warnings too, so a run still records what was skipped) and its full key: the reader, ``params``,
    :data:`CACHE_VERSION` and the :func:`fingerprint` of ``inputs``. It is written atomically; a file that cannot
    be read completely, or whose key differs, is rebuilt.

    Args:
        reader: The reader's registered name.
        params: Every parameter that changes the result (``root`` resolved).
        inputs: The files and folders the reader reads.
        cache_dir: Cache folder; ``None`` builds without a cache.
        build: Builds the dataset from the files.

    Returns:
        The dataset.

    Raises:
        KdkitError: What ``build`` raises, or an unwritable cache folder.
    """
    if cache_dir is None:
        return build()
    key = hashlib.sha256(json.dumps({"reader": reader, "params": params, "version": CACHE_VERSION,
                                     "files": fingerprint(inputs)}, sort_keys=True, default=str).encode()).hexdigest()
    path = Path(cache_dir).expanduser() / f"{reader}-{key[:20]}.npz"
    data = _read_cache(path, key)
    if data is None:
        data = build()
        _write_cache(path, key, data)
    return data


def _read_cache(path: Path, key: str) -> ImageData | None:
    """The cached dataset, or ``None`` if the file is missing, for another key, or damaged in any way."""
    if not path.is_file():
        return None
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            return None
        with loaded as npz:
            if str(npz["key"]) != key:
                return None
            # every member is read fully here (zip CRCs checked) before anything is used: never half-read
            arrays = {name: npz[name] for name in npz.files}
        meta = json.loads(str(arrays["meta"]))
        tensors = {name: torch.from_numpy(arrays[name]) for name in arrays if name not in ("key", "meta")}
        return ImageData(
            name=meta["name"], classes=tuple(meta["classes"]), mean=tuple(meta["mean"]), std=tuple(meta["std"]),
            source=meta["source"], warnings=tuple(meta["warnings"]),
            **{f"{split}_{part}": tensors[f"{split}_{part}"] for split in ("train", "test")
               for part in ("images", "labels")},
            train_targets={k: tensors[f"train_target_{k}"] for k in meta["targets"]},
            test_targets={k: tensors[f"test_target_{k}"] for k in meta["targets"]})
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error):  # KdkitError too
        return None


def _write_cache(path: Path, key: str, data: ImageData) -> None:
    meta = {"name": data.name, "classes": list(data.classes), "mean": list(data.mean), "std": list(data.std),
            "source": data.source, "warnings": list(data.warnings), "targets": sorted(data.train_targets)}
    arrays = {f"{split}_{part}": getattr(data, f"{split}_{part}").numpy() for split in ("train", "test")
              for part in ("images", "labels")}
    for split in ("train", "test"):
        arrays.update({f"{split}_target_{k}": v.numpy() for k, v in getattr(data, f"{split}_targets").items()})
    # masks are mostly runs of one value: compression shrinks the file several-fold for little time
    atomic_write(path, lambda f: np.savez_compressed(f, key=np.array(key), meta=np.array(json.dumps(meta)), **arrays))
