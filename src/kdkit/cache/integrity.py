"""Integrity of a teacher cache's array files: size, dtype and shape against the manifest, content against
the SHA-256 written at build.

A build records in the manifest, for every array file, its dtype, shape, size and SHA-256 (:func:`seal`).
Opening a cache checks every file in full (:func:`open_checked`) before anything reads it, so a damaged
cache fails before training. In full, not a sample: each epoch reads one view of every image, and the K
views of an image lie side by side, so the first epoch reads nearly all of the file anyway (90% of the
64 KiB blocks of a 3.6 GB feature cache, measured); one sequential pass at open costs less than checking
blocks as they are first read, and fails before training, not during it
(figures: ``docs/faults.md``, "Corruption").
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from kdkit.errors import KdkitError


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def seal(path: Path) -> dict[str, Any]:
    """The manifest entry of the array file at ``path``: dtype, shape, size and SHA-256."""
    array = np.load(path, mmap_mode="r")
    return {"dtype": str(array.dtype), "shape": list(array.shape), "bytes": path.stat().st_size,
            "sha256": file_sha256(path)}


def corrupt(path: Path, problem: str) -> KdkitError:
    """The error for cache file ``path`` with ``problem``: rebuild the cache, or delete its folder."""
    return KdkitError(f"teacher cache file {str(path)!r} {problem}", where="teacher.cache.dir",
                      fix=f"rebuild the cache with `kdkit cache build RECIPE --overwrite`, or delete the folder "
                          f"{str(path.parent)!r} (the next run builds it again)")


def open_checked(path: Path, entry: dict[str, Any]) -> np.memmap:
    """Check the array file at ``path`` against its manifest entry, then map it (copy-on-write).

    Args:
        path: An array file of a cache.
        entry: Its manifest entry (written by :func:`seal`).

    Returns:
        The array, memory-mapped copy-on-write: writable as far as torch is concerned, the file never changes.

    Raises:
        KdkitError: The file is missing, truncated, holds another dtype or shape, or its content differs
            from the SHA-256 written at build.
    """
    if not path.is_file():
        raise corrupt(path, "is missing")
    _check_header_and_size(path, entry)
    if file_sha256(path) != entry["sha256"]:
        zeros = np.load(path, mmap_mode="r").any()  # only on failure: the most common damage gets named
        raise corrupt(path, "differs from the SHA-256 written when the cache was built"
                      + ("" if zeros else " (its values are all zeros: overwritten, or copied with holes)"))
    return np.load(path, mmap_mode="c")


def _check_header_and_size(path: Path, entry: dict[str, Any]) -> None:
    """Header, then size: another array put in its place is named as such, a cut one as truncated."""
    size = os.path.getsize(path)
    try:
        shape, dtype, fortran = _header(path)
    except KdkitError:
        if size == entry["bytes"]:
            raise
        shape, dtype, fortran = tuple(entry["shape"]), np.dtype(entry["dtype"]), False  # cut inside the header
    if (list(shape), str(dtype), fortran) != (entry["shape"], entry["dtype"], False):
        raise corrupt(path, f"holds {dtype} {shape}{' (Fortran order)' if fortran else ''}, the manifest "
                            f"records {entry['dtype']} {tuple(entry['shape'])}")
    if size != entry["bytes"]:
        what = "truncated" if size < entry["bytes"] else "longer than it was written"
        raise corrupt(path, f"is {what}: {size} bytes, the manifest records {entry['bytes']}")


def _header(path: Path) -> tuple[tuple[int, ...], np.dtype, bool]:
    """Shape, dtype and Fortran order from the header of the ``.npy`` file at ``path``."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = readers[version](f)
        except (ValueError, KeyError, EOFError, SyntaxError) as exc:
            raise corrupt(path, f"is not a numpy array file (its header is unreadable: {exc})") from None
        return tuple(shape), dtype, fortran
