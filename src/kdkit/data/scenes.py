"""Fashion-MNIST scenes: canvases holding several real Fashion-MNIST objects, with dense targets.

:func:`compose_scenes` pastes 1-4 Fashion-MNIST images ("objects") at random positions and scales onto
a black ``size x size`` canvas and records, per canvas, a multi-hot label, a semantic mask, an instance
mask, tight boxes and the dominant class. The ``fashion_mnist_scenes`` reader builds train scenes from
the train images and test scenes from the test images only, and caches them in one ``.npz`` file.

Composition rules:

* **Foreground.** An object's foreground is its resized pixels ``> FOREGROUND_THRESHOLD`` (20 of 255).
  Only foreground pixels are pasted, so the faint halo around a garment is never part of an object and
  every canvas pixel outside all instance masks is 0. (Dark pixels inside a garment are not foreground
  either: what lies below shows through them.)
* **Scale.** A scale ``s`` is drawn uniformly from ``scale``; the object is resized to
  ``round(28 * s)`` pixels a side (half up) with bilinear, antialiased interpolation
  (:func:`resize_object`), and placed fully inside the canvas at a uniformly random position.
* **Occlusion.** Objects are pasted in order; a later object covers earlier ones where its foreground is.
* **Visibility.** A placement is rejected if, after it, any earlier object would keep fewer than
  ``MIN_VISIBLE`` (50 %) of its own foreground pixels visible. A rejected placement is redrawn: up to
  10 positions for one (object, scale) draw, and up to 10 such draws. If an object still does not fit,
  the canvas keeps the objects it has, or, when that is fewer than ``min_objects``, is recomposed from
  scratch. So every listed object shows at least half of its foreground.

Cache: one compressed ``.npz`` per parameter set, ``fashion_mnist_scenes-<hash>.npz`` in ``cache_dir``
(default ``$KDKIT_DATA_CACHE``, else ``~/.cache/kdkit/scenes``), holding every :class:`Scenes` field of
both splits and the full key. It is written to a temporary file in the same folder and renamed into place;
a file that cannot be read completely, or whose stored key differs, is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.data.base import ImageData, channel_stats
from kdkit.data.dense import atomic_write
from kdkit.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, fashion_mnist
from kdkit.data.registry import register_dataset
from kdkit.errors import KdkitError

FOREGROUND_THRESHOLD = 20
"""A resized object pixel is foreground when its value is strictly above this (of 255)."""
MIN_VISIBLE = 0.5
"""Smallest fraction of an object's foreground pixels that must stay visible under later objects."""
NUM_CLASSES = 10
"""Object labels are in ``[0, NUM_CLASSES)`` (the Fashion-MNIST classes)."""
PLACEMENT_COLUMNS = ("object", "x0", "y0", "height", "width")
"""Columns of :attr:`Scenes.placements`: object index into ``objects``, top-left corner, resized size."""
TARGET_KEYS = ("multilabel", "semantic", "instances", "boxes", "box_labels")
"""The dense targets the reader puts in :attr:`ImageData.train_targets` / ``test_targets``."""
FORMAT_VERSION = 1
"""Bump when composition or the cache layout changes, so old cache files are not reused."""

_POSITION_TRIES = 10  # positions tried per (object, scale) draw
_DRAW_TRIES = 10  # (object, scale) draws per object slot
_SCENE_TRIES = 10  # recompositions of a canvas that ended with fewer than min_objects objects


@dataclass(frozen=True, eq=False, repr=False)
class Scenes:
    """Composed canvases and their targets; ``M`` canvases of ``S x S``, at most ``K`` objects each.

    Object ``j`` of a canvas is the ``j``-th pasted (later ones lie on top). Rows past a canvas's object
    count are padding.

    Attributes:
        images: ``uint8`` ``(M, 1, S, S)`` canvases.
        multilabel: ``uint8`` ``(M, 10)``, 1 for each class with at least one object in the canvas.
        semantic: ``uint8`` ``(M, S, S)``, 0 for background and ``k + 1`` where an object of class ``k`` shows.
        instances: ``uint8`` ``(M, S, S)``, 0 for background and ``j + 1`` where object ``j`` shows.
        boxes: ``float32`` ``(M, K, 4)`` tight ``x0, y0, x1, y1`` pixel boxes of each object's visible pixels,
            ``x1``/``y1`` exclusive (``x1 = max column + 1``); padding rows are 0.
        box_labels: ``int64`` ``(M, K)`` class of each object, -1 for padding.
        dominant: ``int64`` ``(M,)`` class of the object with the most visible pixels (ties: the earliest).
        placements: ``int64`` ``(M, K, 5)`` with columns :data:`PLACEMENT_COLUMNS`; -1 for padding.
        scales: ``float32`` ``(M, K)`` drawn scale of each object; 0 for padding.
    """

    images: Tensor
    multilabel: Tensor
    semantic: Tensor
    instances: Tensor
    boxes: Tensor
    box_labels: Tensor
    dominant: Tensor
    placements: Tensor
    scales: Tensor

    def __post_init__(self) -> None:
        """Check dtypes and shapes agree with each other (also guards arrays read back from a cache)."""
        m = self.images.shape[0] if self.images.ndim == 4 else -1
        s = self.images.shape[-1] if self.images.ndim == 4 else -1
        k = self.box_labels.shape[1] if self.box_labels.ndim == 2 else -1
        expected = {
            "images": (torch.uint8, (m, 1, s, s)), "multilabel": (torch.uint8, (m, NUM_CLASSES)),
            "semantic": (torch.uint8, (m, s, s)), "instances": (torch.uint8, (m, s, s)),
            "boxes": (torch.float32, (m, k, 4)), "box_labels": (torch.int64, (m, k)),
            "dominant": (torch.int64, (m,)), "placements": (torch.int64, (m, k, len(PLACEMENT_COLUMNS))),
            "scales": (torch.float32, (m, k)),
        }
        for name, (dtype, shape) in expected.items():
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.dtype != dtype or tuple(value.shape) != shape or -1 in shape:
                got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                raise KdkitError(f"Scenes.{name} must be {dtype} {shape}, got {got}",
                                 fix="build Scenes with compose_scenes", where="data")

    def __len__(self) -> int:
        """Number of canvases ``M``."""
        return int(self.images.shape[0])

    def targets(self) -> dict[str, Tensor]:
        """The dense targets, keyed by :data:`TARGET_KEYS` (the form :class:`ImageData` carries)."""
        return {key: getattr(self, key) for key in TARGET_KEYS}


def resize_object(image: Tensor, height: int, width: int) -> Tensor:
    """Resize one ``uint8`` object image with bilinear, antialiased interpolation.

    Args:
        image: ``uint8`` tensor ``(H, W)``.
        height: Output height.
        width: Output width.

    Returns:
        ``uint8`` tensor ``(height, width)``, rounded and clamped to ``[0, 255]``.
    """
    out = F.interpolate(image[None, None].float(), size=(height, width), mode="bilinear", align_corners=False,
                        antialias=True)
    return out[0, 0].round_().clamp_(0, 255).to(torch.uint8)


def _check_compose_args(objects: Tensor, labels: Tensor, count: int, size: int, min_objects: int,
                        max_objects: int, scale: tuple[float, float], seed: int) -> None:
    def bad(message: str, fix: str) -> KdkitError:
        return KdkitError(message, fix=fix, where="data")

    if not isinstance(objects, Tensor) or objects.dtype != torch.uint8 or objects.ndim != 3 or objects.shape[0] == 0:
        got = f"{objects.dtype} {tuple(objects.shape)}" if isinstance(objects, Tensor) else type(objects).__name__
        raise bad(f"objects must be a non-empty uint8 tensor (N, H, W), got {got}", "pass e.g. the Fashion-MNIST "
                  "train images with the channel dimension squeezed")
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or tuple(labels.shape) != (objects.shape[0],):
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
        raise bad(f"labels must be int64 ({objects.shape[0]},), one per object, got {got}",
                  "pass the objects' class labels as an int64 tensor")
    if int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES:
        raise bad(f"labels span [{int(labels.min())}, {int(labels.max())}], outside [0, {NUM_CLASSES})",
                  f"use class labels 0..{NUM_CLASSES - 1}")
    for name, value, low in (("count", count, 0), ("size", size, 1), ("min_objects", min_objects, 1),
                             ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise bad(f"{name} must be an integer >= {low}, got {value!r}", f"give {name} as an integer >= {low}")
    # uint8 instance ids: 0 is background, so at most 255 objects per canvas.
    if isinstance(max_objects, bool) or not isinstance(max_objects, int) or not min_objects <= max_objects <= 255:
        raise bad(f"max_objects must be an integer in [{min_objects}, 255], got {max_objects!r}",
                  f"use e.g. max_objects: 4 (at least min_objects={min_objects})")
    if (len(scale) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale)
            or not 0 < scale[0] <= scale[1]):
        raise bad(f"scale must be (low, high) with 0 < low <= high, got {scale!r}", "use e.g. scale: (0.75, 1.5)")
    biggest = max(_scaled(int(objects.shape[1]), scale[1]), _scaled(int(objects.shape[2]), scale[1]))
    if biggest > size:
        raise bad(f"size {size} is smaller than the largest scaled object ({biggest} pixels)",
                  f"use size >= {biggest}, or a smaller top scale")


def _scaled(side: int, s: float) -> int:
    # Half-up rounding (Python's round() is half-even); at least one pixel.
    return max(1, int(np.floor(side * s + 0.5)))


def _place_one(rng: np.random.Generator, objects: Tensor, scale: tuple[float, float], canvas: np.ndarray,
               inst: np.ndarray, total: list[int], visible: list[int]) -> tuple[int, int, int, int, int, float] | None:
    """Paste one more object on ``canvas``/``inst`` (in place) under the visibility rule.

    ``total``/``visible`` hold the foreground and still-visible pixel counts of the objects already
    placed; they are updated on success. Returns ``(object, x0, y0, height, width, scale)``, or ``None``
    if no draw fitted.
    """
    size = canvas.shape[0]
    placed = len(total)
    for _ in range(_DRAW_TRIES):
        obj = int(rng.integers(objects.shape[0]))
        s = float(rng.uniform(scale[0], scale[1]))
        h, w = _scaled(int(objects.shape[1]), s), _scaled(int(objects.shape[2]), s)
        patch = resize_object(objects[obj], h, w).numpy()
        fg = patch > FOREGROUND_THRESHOLD
        area = int(fg.sum())
        if area == 0:  # nothing of it would show, so it could never be a listed object
            continue
        for _ in range(_POSITION_TRIES):
            y0, x0 = int(rng.integers(size - h + 1)), int(rng.integers(size - w + 1))
            region = inst[y0:y0 + h, x0:x0 + w]
            # Pixels of each earlier object that this placement would hide (bin 0 is background).
            covered = np.bincount(region[fg], minlength=placed + 1)[1:]
            left = np.asarray(visible, dtype=np.int64) - covered
            if (left >= MIN_VISIBLE * np.asarray(total, dtype=np.int64)).all():
                canvas[y0:y0 + h, x0:x0 + w][fg] = patch[fg]
                region[fg] = placed + 1
                visible[:] = [*left.tolist(), area]
                total.append(area)
                return obj, x0, y0, h, w, s
    return None


def compose_scenes(objects: Tensor, labels: Tensor, count: int, *, size: int = 64, min_objects: int = 1,
                   max_objects: int = 4, scale: tuple[float, float] = (0.75, 1.5), seed: int) -> Scenes:
    """Compose ``count`` canvases of several objects each; pure and deterministic from ``seed``.

    Each canvas draws its object count uniformly from ``[min_objects, max_objects]``, then for each object
    an index into ``objects`` (uniformly, with replacement), a scale uniformly from ``scale`` and a position
    fully inside the canvas. See the module docstring for the foreground, occlusion and visibility rules.

    Args:
        objects: ``uint8`` tensor ``(N, H, W)`` of object images on a dark background (e.g. Fashion-MNIST).
        labels: ``int64`` tensor ``(N,)``, the class in ``[0, 10)`` of each object.
        count: Number of canvases ``M``.
        size: Canvas height and width ``S``; must hold the largest scaled object.
        min_objects: Fewest objects in a canvas.
        max_objects: Most objects in a canvas ``K``, at most 255.
        scale: ``(low, high)`` range of the resize factor.
        seed: Seed of a private numpy Generator (the global RNGs are neither used nor changed).

    Returns:
        The canvases and their targets.

    Raises:
        KdkitError: On bad arguments, or if ``min_objects`` objects cannot be placed visibly on a canvas.
    """
    _check_compose_args(objects, labels, count, size, min_objects, max_objects, scale, seed)
    rng = np.random.default_rng(seed)
    images = np.zeros((count, size, size), dtype=np.uint8)
    instances = np.zeros((count, size, size), dtype=np.uint8)
    placements = np.full((count, max_objects, len(PLACEMENT_COLUMNS)), -1, dtype=np.int64)
    scales = np.zeros((count, max_objects), dtype=np.float32)
    for i in range(count):
        for _ in range(_SCENE_TRIES):
            images[i].fill(0)
            instances[i].fill(0)
            placed: list[tuple[int, int, int, int, int, float]] = []
            total: list[int] = []  # foreground pixels of each placed object
            visible: list[int] = []  # of those, how many still show
            for _ in range(int(rng.integers(min_objects, max_objects + 1))):
                placement = _place_one(rng, objects, scale, images[i], instances[i], total, visible)
                if placement is None:
                    break  # the canvas keeps what it has (if that is enough)
                placed.append(placement)
            if len(placed) >= min_objects:
                break
        else:
            raise KdkitError(f"could not place {min_objects} visible objects on a {size}x{size} canvas in "
                             f"{_SCENE_TRIES} attempts", fix="use a larger size, a smaller scale or fewer "
                             "min_objects", where="data")
        for j, (obj, x0, y0, h, w, s) in enumerate(placed):
            placements[i, j] = (obj, x0, y0, h, w)
            scales[i, j] = s
    return _targets(images, instances, placements, scales, labels.numpy().astype(np.int64))


def _targets(images: np.ndarray, instances: np.ndarray, placements: np.ndarray, scales: np.ndarray,
             labels: np.ndarray) -> Scenes:
    """Derive every target from the instance masks and the placed objects' labels."""
    count = images.shape[0]
    max_objects = placements.shape[1]
    present = placements[:, :, 0] >= 0
    box_labels = np.where(present, labels[np.where(present, placements[:, :, 0], 0)], -1)
    # Semantic mask by lookup: instance id j + 1 -> class + 1, background 0 -> 0.
    lut = np.zeros((count, max_objects + 1), dtype=np.uint8)
    lut[:, 1:] = np.where(present, box_labels + 1, 0)
    semantic = np.take_along_axis(lut, instances.reshape(count, -1).astype(np.int64), axis=1).reshape(instances.shape)
    boxes = np.zeros((count, max_objects, 4), dtype=np.float32)
    multilabel = np.zeros((count, NUM_CLASSES), dtype=np.uint8)
    dominant = np.zeros(count, dtype=np.int64)
    for i in range(count):
        areas = np.bincount(instances[i].ravel(), minlength=max_objects + 1)[1:]
        for j in np.flatnonzero(present[i]):
            rows = np.flatnonzero((instances[i] == j + 1).any(axis=1))
            cols = np.flatnonzero((instances[i] == j + 1).any(axis=0))
            boxes[i, j] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
            multilabel[i, box_labels[i, j]] = 1
        dominant[i] = box_labels[i, int(np.argmax(areas))]  # argmax takes the first of tied maxima
    return Scenes(
        images=torch.from_numpy(images).unsqueeze(1), multilabel=torch.from_numpy(multilabel),
        semantic=torch.from_numpy(semantic), instances=torch.from_numpy(instances), boxes=torch.from_numpy(boxes),
        box_labels=torch.from_numpy(box_labels), dominant=torch.from_numpy(dominant),
        placements=torch.from_numpy(placements), scales=torch.from_numpy(scales),
    )


# -- the cached reader ----------------------------------------------------------------------------------


class SceneSplits(NamedTuple):
    """Train and test scenes as read or built by :func:`load_scene_splits`."""

    train: Scenes
    test: Scenes
    cache_file: Path
    objects_source: str


def default_cache_dir() -> Path:
    """``$KDKIT_DATA_CACHE`` if set, else ``~/.cache/kdkit/scenes``."""
    env = os.environ.get("KDKIT_DATA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kdkit" / "scenes"


def _source_digest(data: ImageData) -> str:
    """sha256 of the source images and labels, so a changed install never reuses old scenes."""
    digest = hashlib.sha256()
    for tensor in (data.train_images, data.train_labels, data.test_images, data.test_labels):
        digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _read_cache(path: Path, key: str, counts: dict[str, int]) -> dict[str, Scenes] | None:
    """The cached splits, or ``None`` if the file is missing, for other parameters, or damaged in any way."""
    if not path.is_file():
        return None
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a lone .npy array is not ours
            return None
        with loaded as npz:
            if str(npz["key"]) != key:
                return None
            # Every member is read fully here (zip CRCs checked) before anything is used: never half-read.
            arrays = {name: npz[name] for name in npz.files}
        out = {}
        for split, count in counts.items():
            scenes = Scenes(**{f.name: torch.from_numpy(arrays[f"{split}_{f.name}"]) for f in fields(Scenes)})
            if len(scenes) != count:
                return None
            out[split] = scenes
        return out
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):  # KdkitError is a ValueError
        return None


def _write_cache(path: Path, key: str, splits: dict[str, Scenes]) -> None:
    """Write the splits to ``path`` atomically: a temporary file in the same folder, then ``os.replace``."""
    arrays = {f"{split}_{f.name}": getattr(scenes, f.name).numpy() for split, scenes in splits.items()
              for f in fields(Scenes)}
    fix = "set cache_dir (or the KDKIT_DATA_CACHE environment variable) to a writable folder"
    # Masks are mostly zeros: compression shrinks the file several-fold for little time.
    atomic_write(path, lambda f: np.savez_compressed(f, key=np.array(key), **arrays), fix=fix, where="data")


def load_scene_splits(root: str | Path | None = None, *, size: int = 64, train_scenes: int = 10000,
                      test_scenes: int = 2000, max_objects: int = 4, seed: int = 0,
                      cache_dir: str | Path | None = None) -> SceneSplits:
    """Read Fashion-MNIST scenes from the cache, composing and caching them first if needed.

    Train scenes are composed only from train images, test scenes only from test images, with two
    different seeds derived from ``seed``. The cache file is ``fashion_mnist_scenes-<hash>.npz`` in
    ``cache_dir``, where the hash covers the source images' sha256, every parameter, the composition
    constants and :data:`FORMAT_VERSION`. A missing, stale or damaged file is (re)built.

    Args:
        root: Fashion-MNIST folder, as for the ``fashion_mnist`` reader (default: its install location).
        size: Canvas size.
        train_scenes: Number of train canvases (at least 1).
        test_scenes: Number of test canvases.
        max_objects: Most objects per canvas (at least 1).
        seed: Seed of the composition.
        cache_dir: Cache folder; default :func:`default_cache_dir`.

    Returns:
        The train and test scenes, the cache file and where the objects came from.

    Raises:
        KdkitError: On bad parameters, missing Fashion-MNIST files, or an unwritable cache folder.
    """
    for name, value, low in (("train_scenes", train_scenes, 1), ("test_scenes", test_scenes, 0),
                             ("seed", seed, 0), ("size", size, 1), ("max_objects", max_objects, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise KdkitError(f"fashion_mnist_scenes {name} must be an integer >= {low}, got {value!r}",
                             fix=f"set data.params.{name} to an integer >= {low}", where="data")
    source = fashion_mnist(root if root is not None else FASHION_MNIST_ROOT)
    params = {"size": size, "train_scenes": train_scenes, "test_scenes": test_scenes, "max_objects": max_objects,
              "seed": seed, "min_objects": 1, "scale": [0.75, 1.5], "threshold": FOREGROUND_THRESHOLD,
              "min_visible": MIN_VISIBLE, "format": FORMAT_VERSION, "source_sha256": _source_digest(source)}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = folder / f"fashion_mnist_scenes-{key[:20]}.npz"
    counts = {"train": train_scenes, "test": test_scenes}
    splits = _read_cache(path, key, counts)
    if splits is None:
        # Two independent streams from one seed, so train and test canvases never share a layout.
        train_seed, test_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
        splits = {}
        for split, split_seed in (("train", train_seed), ("test", test_seed)):
            images: Tensor = getattr(source, f"{split}_images")
            splits[split] = compose_scenes(images[:, 0], getattr(source, f"{split}_labels"), counts[split],
                                           size=size, min_objects=1, max_objects=max_objects, scale=(0.75, 1.5),
                                           seed=split_seed)
        _write_cache(path, key, splits)
    return SceneSplits(splits["train"], splits["test"], path, source.source)


@register_dataset("fashion_mnist_scenes", help="64x64 canvases of 1-4 real Fashion-MNIST objects with multi-label, "
                                               "mask and box targets (label = dominant object; cached .npz)")
def fashion_mnist_scenes(root: str | Path | None = None, *, size: int = 64, train_scenes: int = 10000,
                         test_scenes: int = 2000, max_objects: int = 4, seed: int = 0,
                         cache_dir: str | Path | None = None) -> ImageData:
    """Fashion-MNIST scenes: ``size x size`` canvases of 1 to ``max_objects`` real Fashion-MNIST objects.

    ``train_labels``/``test_labels`` are each canvas's dominant class (the object with the most visible
    pixels): a single-label view of the scenes, so the existing classification code runs on them as is.
    The dense targets are in ``train_targets``/``test_targets`` under :data:`TARGET_KEYS` (see
    :class:`Scenes` for their layout). The first load composes and caches the scenes (about 15 s for the
    defaults on two CPU cores); later loads read the cache (under 2 s). Mean/std are computed from the train canvases.

    Args:
        root: Fashion-MNIST folder; defaults to ``/usr/share/datasets/fashion-mnist``.
        size: Canvas height and width (at least 42, to hold a 1.5x object).
        train_scenes: Number of train canvases.
        test_scenes: Number of test canvases.
        max_objects: Most objects per canvas.
        seed: Composition seed.
        cache_dir: Cache folder; default ``$KDKIT_DATA_CACHE``, else ``~/.cache/kdkit/scenes``.

    Returns:
        The dataset, with the 10 Fashion-MNIST class names.

    Raises:
        KdkitError: On bad parameters, missing Fashion-MNIST files, or an unwritable cache folder.
    """
    splits = load_scene_splits(root, size=size, train_scenes=train_scenes, test_scenes=test_scenes,
                               max_objects=max_objects, seed=seed, cache_dir=cache_dir)
    mean, std = channel_stats(splits.train.images)
    return ImageData(
        name="fashion_mnist_scenes",
        train_images=splits.train.images,
        train_labels=splits.train.dominant,
        test_images=splits.test.images,
        test_labels=splits.test.dominant,
        classes=FASHION_MNIST_CLASSES,
        mean=mean,
        std=std,
        source=f"{size}x{size} scenes of 1-{max_objects} objects from {splits.objects_source} "
               f"(train scenes from train images, test from test; composition seed {seed}); cache {splits.cache_file}",
        train_targets=splits.train.targets(),
        test_targets=splits.test.targets(),
    )
