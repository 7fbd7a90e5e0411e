"""The on-disk teacher-output cache: numpy memory maps plus a manifest, finalised atomically.

Layout of a cache folder::

    manifest.json        identity (teacher weights hash, data hash, augmentation, views, storage)
                         + "complete": true + build statistics + "arrays": each array file's dtype,
                         shape, size and SHA-256; written last
    views.npy            int16 (N, K, 3): crop offsets and flip flag of view k of image i
    tap0.npy, ...        per stored teacher tap, (N, K, *shape) float16/float32
    tap0.topk_p.npy      with ``logits: topk``: (N, K, k) top-k probabilities ...
    tap0.topk_i.npy      ... and their class indices (int32)

A cache is built in a sibling folder ``<dir>.partial-<pid>`` and renamed into place only after every
array is flushed and the manifest written, so a folder at ``<dir>`` is always complete. Every array's
space is reserved when the build starts, so a full disk fails at once with a message (not later with
SIGBUS from a write through a memory map). Arrays are opened as copy-on-write memory maps: a batch reads
only its rows, and a cache larger than RAM works. Opening checks every file against the manifest and its
SHA-256 (:mod:`kdkit.cache.integrity`), so a damaged cache is refused, never read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdkit._version import __version__
from kdkit.cache.integrity import corrupt, open_checked, seal
from kdkit.checkpoint import atomic_write_text, reported_write
from kdkit.errors import KdkitError

#: 2: the manifest records each array file's dtype, shape, size and SHA-256 ("arrays").
FORMAT = 2
VIEWS = "views.npy"
MANIFEST = "manifest.json"
_DTYPES = {"float16": np.float16, "float32": np.float32}
_SPACE_FIX = ("free space on that disk, or build the cache on another one (teacher.cache.dir), or make it smaller "
              "(fewer teacher.cache.views, teacher.cache.logits: topk, teacher.cache.dtype: float16)")


def identity_key(identity: dict[str, Any]) -> str:
    """Short content hash of a cache identity (the default folder name)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def tensor_sha256(*tensors: Tensor) -> str:
    """SHA-256 of the raw bytes of CPU tensors (dataset fingerprints)."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(str((tuple(t.shape), str(t.dtype))).encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def remove_partials(folder: Path) -> list[Path]:
    """Delete what interrupted builds of ``folder`` left beside it (``NAME.partial-PID``, ``NAME.old-PID``).

    Only safe while holding the folder's build lock (:func:`kdkit.locks.exclusive`): a running build's
    partial folder looks the same.

    Returns:
        What was deleted.
    """
    folder = Path(folder)
    removed = sorted([*folder.parent.glob(f"{folder.name}.partial-*"), *folder.parent.glob(f"{folder.name}.old-*")])
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _reserve(path: Path) -> None:
    """Allocate the disk blocks of the file at ``path`` now: a memory-mapped write to a full disk kills the
    process with SIGBUS, a reservation fails here with ENOSPC."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows: no reservation, the writes find out
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.path.getsize(path))
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve: as above
            raise
    finally:
        os.close(fd)


def _differences(expected: Any, found: Any, prefix: str = "") -> list[str]:
    if isinstance(expected, dict) and isinstance(found, dict):
        out: list[str] = []
        for key in sorted(set(expected) | set(found)):
            out += _differences(expected.get(key), found.get(key), f"{prefix}{key}.")
        return out
    return [] if expected == found else [f"{prefix[:-1]}: cache has {found!r}, recipe needs {expected!r}"]


@dataclass(frozen=True)
class TapLayout:
    """How one teacher tap is stored: its per-sample shape and ``full`` or ``topk`` storage."""

    spec: str
    shape: tuple[int, ...]
    storage: str = "full"
    k: int = 0

    def files(self, i: int) -> list[str]:
        """File names of the arrays of the ``i``-th tap."""
        return [f"tap{i}.topk_p.npy", f"tap{i}.topk_i.npy"] if self.storage == "topk" else [f"tap{i}.npy"]


class CacheWriter:
    """Fill a new cache folder batch by batch, then :meth:`finalize` it atomically.

    Args:
        folder: Final cache folder (must not exist unless ``overwrite``).
        identity: What the cache was built from (stored in the manifest, checked on open).
        views: The ``(N, K, 3)`` view table.
        taps: Layout of each stored tap.
        dtype: ``"float16"`` or ``"float32"`` for stored values.
    """

    def __init__(self, folder: Path, identity: dict[str, Any], views: Tensor, taps: list[TapLayout],
                 dtype: str) -> None:
        self.folder = Path(folder)
        self.identity = identity
        self.taps = taps
        self.partial = self.folder.with_name(f"{self.folder.name}.partial-{os.getpid()}")
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        self.arrays: list[list[np.memmap]] = []
        try:
            with reported_write("teacher cache", self.partial, _SPACE_FIX):
                self._create(views, dtype)
        except BaseException:
            self.abort()
            raise
        self.started = time.perf_counter()

    def _create(self, views: Tensor, dtype: str) -> None:
        """The view table and every tap's array, their space reserved."""
        n, k = views.shape[:2]
        np.save(self.partial / VIEWS, views.numpy())
        for i, tap in enumerate(self.taps):
            names = tap.files(i)
            if tap.storage == "topk":
                self.arrays.append([
                    np.lib.format.open_memmap(self.partial / names[0], "w+", _DTYPES[dtype], (n, k, tap.k)),
                    np.lib.format.open_memmap(self.partial / names[1], "w+", np.int32, (n, k, tap.k))])
            else:
                self.arrays.append([np.lib.format.open_memmap(self.partial / names[0], "w+", _DTYPES[dtype],
                                                              (n, k, *tap.shape))])
            for name in names:
                _reserve(self.partial / name)

    def write(self, rows: slice, view: int, outputs: dict[str, Tensor]) -> None:
        """Store the teacher's outputs for images ``rows`` seen through view ``view``."""
        for tap, arrays in zip(self.taps, self.arrays, strict=True):
            value = outputs[tap.spec].detach().float().cpu()
            if tap.storage == "topk":
                probs = value.softmax(dim=1)
                top = probs.topk(tap.k, dim=1)
                arrays[0][rows, view] = top.values.numpy()
                arrays[1][rows, view] = top.indices.to(torch.int32).numpy()
            else:
                arrays[0][rows, view] = value.numpy()

    def finalize(self, stats: dict[str, Any], overwrite: bool = False) -> Path:
        """Flush every array, write the manifest with their SHA-256, and move the folder into place."""
        with reported_write("teacher cache", self.partial, _SPACE_FIX):
            for arrays in self.arrays:
                for array in arrays:
                    array.flush()
            self.arrays = []
            sealing = time.perf_counter()
            sealed = {name: seal(self.partial / name)
                      for name in [VIEWS, *(name for i, t in enumerate(self.taps) for name in t.files(i))]}
            stats = {**stats, "checksum_seconds": round(time.perf_counter() - sealing, 2)}
        manifest = {**self.identity, "key": identity_key(self.identity), "complete": True,
                    "taps_layout": [{"spec": t.spec, "shape": list(t.shape), "storage": t.storage, "k": t.k,
                                     "files": t.files(i)} for i, t in enumerate(self.taps)],
                    "arrays": sealed,
                    "kdkit": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "build_seconds": round(time.perf_counter() - self.started, 2), **stats}
        atomic_write_text(self.partial / MANIFEST, json.dumps(manifest, indent=1))
        if self.folder.exists():
            if not overwrite:  # kdkit builds under a lock (kdkit.teacher_cache.open_cache): another tool wrote it
                raise KdkitError(f"cache folder {str(self.folder)!r} appeared while this process was building it, "
                                 "written by a process that did not hold its build lock",
                                 fix="run again to use that cache (its manifest is checked), or pass --overwrite "
                                     "to replace it with this build")
            old = self.folder.with_name(f"{self.folder.name}.old-{os.getpid()}")
            os.replace(self.folder, old)
            os.replace(self.partial, self.folder)
            shutil.rmtree(old)
        else:
            os.replace(self.partial, self.folder)
        return self.folder

    def abort(self) -> None:
        """Delete the partial folder (the final folder is never touched)."""
        self.arrays = []
        shutil.rmtree(self.partial, ignore_errors=True)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a complete cache folder.

    Raises:
        KdkitError: No cache there, an incomplete one (a partial folder is never used), an unreadable
            manifest, or a cache of another format (an older kdkit's has no SHA-256s: it is refused).
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        what = "an incomplete cache (no manifest)" if Path(folder).exists() else "no cache"
        raise KdkitError(f"{what} at {str(folder)!r}", bad=str(folder),
                         fix="build it with `kdkit cache build RECIPE` (add --overwrite to replace a folder)",
                         where="teacher.cache.dir")
    try:
        manifest = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise corrupt(path, f"is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        raise corrupt(path, 'does not say "complete": true (it was edited or damaged)')
    found = manifest.get("format")
    if found != FORMAT:
        by = "an older" if isinstance(found, int) and found < FORMAT else "another"
        raise KdkitError(f"the cache at {str(folder)!r} was built by {by} kdkit (cache format {found!r}; this "
                         f"kdkit reads format {FORMAT}, whose manifest holds the SHA-256 every open verifies)",
                         fix="rebuild it with `kdkit cache build RECIPE --overwrite`, or delete the folder",
                         where="teacher.cache.dir")
    return manifest


def check_identity(manifest: dict[str, Any], identity: dict[str, Any], folder: Path) -> None:
    """Refuse a cache that was built from another teacher, data, augmentation or storage setting."""
    found = {k: manifest.get(k) for k in identity}
    problems = _differences(identity, found)
    if problems:
        raise KdkitError(f"the teacher cache at {str(folder)!r} does not match this recipe: " + "; ".join(problems[:4])
                         + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else ""),
                         fix="rebuild it with `kdkit cache build RECIPE --overwrite`, or point teacher.cache.dir "
                             "at another folder", where="teacher.cache")


class TeacherCache:
    """An opened, checked cache: per-batch lookups of stored teacher outputs.

    Every array file is checked against the manifest (size, dtype, shape) and its SHA-256 before anything
    reads it.

    Args:
        folder: A complete cache folder.
        identity: The identity the recipe needs (checked against the manifest; ``None`` skips the check,
            for inspection tools only).

    Raises:
        KdkitError: No complete cache of this format there, a cache of another identity, or a file that is
            missing, truncated, replaced or differs from its SHA-256.
    """

    def __init__(self, folder: Path, identity: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if identity is not None:
            check_identity(self.manifest, identity, self.folder)
        self.views = self._open(VIEWS)
        self.layouts = [TapLayout(t["spec"], tuple(t["shape"]), t["storage"], t["k"])
                        for t in self.manifest["taps_layout"]]
        self.arrays = [[self._open(name) for name in t["files"]] for t in self.manifest["taps_layout"]]
        self.num_samples, self.num_views = int(self.views.shape[0]), int(self.views.shape[1])
        self.num_classes = int(self.manifest["data"]["num_classes"])

    def _open(self, name: str) -> Tensor:
        """Array file ``name``, checked against its manifest entry, memory-mapped."""
        entry = self.manifest.get("arrays", {}).get(name)
        if entry is None:
            raise corrupt(self.folder / MANIFEST, f"lists no SHA-256 for {name} (it was edited or damaged)")
        return torch.from_numpy(open_checked(self.folder / name, entry))

    @property
    def specs(self) -> list[str]:
        """Stored teacher tap specs."""
        return [t.spec for t in self.layouts]

    def nbytes(self) -> int:
        """Bytes of stored outputs."""
        return sum(a.numel() * a.element_size() for arrays in self.arrays for a in arrays)

    def bytes_per_image(self) -> dict[str, int]:
        """Disk bytes each training image costs, per stored tap (all its views), by spec."""
        return {layout.spec: sum(a[0].numel() * a.element_size() for a in arrays)
                for layout, arrays in zip(self.layouts, self.arrays, strict=True)}

    def describe(self) -> str:
        """One line: views x images, size, and what one image costs on disk (by tap when several are stored)."""
        per_tap = self.bytes_per_image()
        total = sum(per_tap.values())
        taps = ", ".join(f"{spec} {n:,}" for spec, n in per_tap.items())
        return (f"{self.num_views} views x {self.num_samples} images, {self.nbytes() / 2**20:.2f} MiB: "
                f"{total:,} bytes per image ({self.manifest['dtype']}, its {self.num_views} view(s); {taps})")

    def to(self, device: torch.device) -> TeacherCache:
        """Hold every array in memory on ``device`` (no per-batch host round-trip on a GPU)."""
        self.views = self.views.to(device)
        self.arrays = [[a.to(device) for a in arrays] for arrays in self.arrays]
        return self

    def lookup(self, index: Tensor, view: Tensor) -> dict[str, Tensor]:
        """Stored outputs of images ``index`` (``(B,)``) seen through views ``view`` (``(B,)``), as float32.

        ``topk`` logits come back as log-probabilities: the stored top-k ``log p`` and, for every other
        class, ``log(remaining mass / (C - k))``. Their softmax is the stored distribution exactly; at a
        temperature ``T != 1`` it is FKD's approximation of the teacher's softened distribution.
        """
        store = self.arrays[0][0].device
        index_s, view_s = index.to(store), view.to(store)
        out: dict[str, Tensor] = {}
        for layout, arrays in zip(self.layouts, self.arrays, strict=True):
            if layout.storage == "topk":
                probs = arrays[0][index_s, view_s].to(index.device, torch.float32)
                classes = arrays[1][index_s, view_s].to(index.device, torch.int64)
                rest = (1.0 - probs.sum(1, keepdim=True)).clamp_min(1e-8) / max(self.num_classes - layout.k, 1)
                logits = rest.log().expand(len(index), self.num_classes).clone()
                out[layout.spec] = logits.scatter_(1, classes, probs.clamp_min(1e-8).log())
            else:
                out[layout.spec] = arrays[0][index_s, view_s].to(index.device, torch.float32)
        return out
