"""Integrity of a teacher cache's array files: size and header against the manifest, content against
checksums written at build.

A build seals every array file ``NAME.npy`` with a checksum file ``NAME.sha256.npy``: uint8
``(blocks, 32)``, the SHA-256 of each :data:`BLOCK_BYTES` bytes of the file (the last block shorter). The
manifest records each array file's dtype, shape, size, block size and the SHA-256 of its checksum file, so
the checksums are checked too.

Opening a cache (:class:`CheckedArray`) checks every file's size and header against the manifest (cheap,
and what turns a truncated, missing or replaced file into a message instead of numpy's ``mmap length is
greater than file size`` or an ``IndexError`` in the first step), then verifies the content of up to
:data:`OPEN_VERIFY_BYTES` (all of a cache that small, else blocks evenly spread over every array); a block
not verified at open is verified the first time a lookup reads it. Per-block checksums are what make that
second half possible: a lookup reads a few rows, and verifies only the blocks holding them. Figures behind
the two constants are in ``docs/faults.md`` ("Corruption").
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from kdkit.errors import KdkitError

#: Bytes per checksum block: a few feature rows (a cnn_teacher ``stage2`` view is 6 KiB), so a lookup that
#: verifies the blocks it reads hashes little more than it reads.
BLOCK_BYTES = 1 << 16
#: Bytes verified when a cache is opened: every byte of a cache up to this size (0.2 s at the measured
#: 1.4 GiB/s), a sample of this many bytes of a larger one.
OPEN_VERIFY_BYTES = 1 << 28


def checksum_name(name: str) -> str:
    """The checksum file of array file ``name`` (``tap0.npy`` -> ``tap0.sha256.npy``)."""
    return f"{name.removesuffix('.npy')}.sha256.npy"


def block_digests(path: Path, block_bytes: int) -> np.ndarray:
    """SHA-256 of every ``block_bytes`` bytes of the file at ``path``, as uint8 ``(blocks, 32)``."""
    digests = []
    with open(path, "rb") as f:
        while block := f.read(block_bytes):
            digests.append(np.frombuffer(hashlib.sha256(block).digest(), np.uint8))
    return np.stack(digests)


def seal(folder: Path, name: str) -> dict[str, Any]:
    """Write the checksum file of array file ``folder/name`` (blocks of :data:`BLOCK_BYTES`) and return its
    manifest entry."""
    block_bytes = BLOCK_BYTES  # read at each call: tests make blocks small
    path = Path(folder) / name
    array = np.load(path, mmap_mode="r")
    sums = Path(folder) / checksum_name(name)
    np.save(sums, block_digests(path, block_bytes))
    return {"dtype": str(array.dtype), "shape": list(array.shape), "bytes": path.stat().st_size,
            "block_bytes": block_bytes, "checksums": sums.name, "checksums_sha256": _file_sha256(sums)}


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def corrupt(path: Path, problem: str) -> KdkitError:
    """The error for cache file ``path`` with ``problem``: rebuild the cache, or delete its folder."""
    return KdkitError(f"teacher cache file {str(path)!r} {problem}", where="teacher.cache.dir",
                      fix=f"rebuild the cache with `kdkit cache build RECIPE --overwrite`, or delete the folder "
                          f"{str(path.parent)!r} (the next run builds it again); a run stopped by this resumes "
                          "with --resume once the cache is rebuilt")


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


class CheckedArray:
    """One array file of a cache, checked against its manifest entry, its content verified block by block.

    Opening checks the file's size and header and its checksum file; content is verified by
    :meth:`verify_all`, :meth:`verify_sample` or, for what a lookup reads, :meth:`verify_items`.

    Args:
        folder: The cache folder.
        name: The array file's name.
        entry: Its manifest entry (written by :func:`seal`).

    Raises:
        KdkitError: The file or its checksum file is missing, of another size, shape or dtype, or the
            checksum file differs from the SHA-256 in the manifest.
    """

    def __init__(self, folder: Path, name: str, entry: dict[str, Any]) -> None:
        self.path = Path(folder) / name
        self.block_bytes = int(entry["block_bytes"])
        self._check_file(entry)
        self.digests = self._checksums(Path(folder) / entry["checksums"], entry["checksums_sha256"])
        self.data = np.load(self.path, mmap_mode="c")  # copy-on-write: writable for torch, the file never changes
        self.raw = np.memmap(self.path, np.uint8, "r")
        self.offset = int(self.data.offset)
        self.item_bytes = int(np.prod(self.data.shape[2:], dtype=np.int64)) * self.data.itemsize
        self.verified = np.zeros(len(self.digests), bool)
        self.unverified = len(self.digests)

    def _checksums(self, path: Path, sha256: str) -> np.ndarray:
        if not path.is_file():
            raise corrupt(path, f"is missing (the checksums of {self.path.name})")
        if _file_sha256(path) != sha256:
            raise corrupt(path, f"differs from the SHA-256 the manifest records for it (the checksums of "
                                     f"{self.path.name})")
        return np.load(path)

    def _check_file(self, entry: dict[str, Any]) -> None:
        """Header, then size: another array put in its place is named as such, a cut one as truncated."""
        if not self.path.is_file():
            raise corrupt(self.path, "is missing")
        size = os.path.getsize(self.path)
        try:
            shape, dtype, fortran = _header(self.path)
        except KdkitError:
            if size == entry["bytes"]:
                raise
            shape, dtype, fortran = tuple(entry["shape"]), np.dtype(entry["dtype"]), False  # cut inside the header
        if (list(shape), str(dtype), fortran) != (entry["shape"], entry["dtype"], False):
            raise corrupt(self.path, f"holds {dtype} {shape}{' (Fortran order)' if fortran else ''}, the "
                                     f"manifest records {entry['dtype']} {tuple(entry['shape'])}")
        if size != entry["bytes"]:
            what = "truncated" if size < entry["bytes"] else "longer than it was written"
            raise corrupt(self.path, f"is {what}: {size} bytes, the manifest records {entry['bytes']}")

    @property
    def nbytes(self) -> int:
        """Size of the file."""
        return len(self.raw)

    def verify(self, blocks: np.ndarray, when: str) -> None:
        """Verify the not yet verified ones of ``blocks`` (block numbers) against their checksums.

        Args:
            blocks: Block numbers.
            when: When this happens, for the message (``"when the cache was opened"``).

        Raises:
            KdkitError: A block differs from its checksum.
        """
        blocks = np.unique(blocks)
        for b in blocks[~self.verified[blocks]].tolist():
            chunk = self.raw[b * self.block_bytes:(b + 1) * self.block_bytes]
            if hashlib.sha256(chunk).digest() != self.digests[b].tobytes():
                raise self._mismatch(b, chunk, when)
            self.verified[b] = True
            self.unverified -= 1

    def verify_all(self, when: str) -> None:
        """Verify every block."""
        if self.unverified:
            self.verify(np.arange(len(self.digests)), when)

    def verify_sample(self, share: float, when: str) -> None:
        """Verify ``share`` of the blocks, evenly spread from the first to the last (at least those two)."""
        n = len(self.digests)
        count = min(n, max(2, math.ceil(share * n)))
        self.verify(np.linspace(0, n - 1, count).round().astype(np.int64), when)

    def verify_items(self, flat: np.ndarray) -> None:
        """Verify the blocks holding items ``flat`` (row-major indices over the array's first two axes)."""
        if not self.unverified:
            return
        start = self.offset + flat.astype(np.int64) * self.item_bytes
        first, last = start // self.block_bytes, (start + self.item_bytes - 1) // self.block_bytes
        span = np.arange(int((last - first).max()) + 1)
        self.verify(np.minimum(first[:, None] + span, last[:, None]).ravel(), "when training first read it")

    def _mismatch(self, block: int, chunk: np.ndarray, when: str) -> KdkitError:
        start = block * self.block_bytes
        data = chunk[max(0, self.offset - start):]  # the array's bytes in the block, past the header
        zeros = " (their array bytes are all zeros: overwritten, or copied with holes)" if not data.any() else ""
        return corrupt(self.path, f"is corrupt: bytes {start}-{start + len(chunk) - 1} (block {block} of "
                                       f"{len(self.digests)}) differ from the checksum written when the cache was "
                                       f"built{zeros}; found {when}")
