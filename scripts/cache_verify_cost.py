"""What checking a teacher cache at open costs (the figures in docs/faults.md, "Corruption").

    python scripts/cache_verify_cost.py runs/cache/KEY [--cold]

Prints, in seconds, ``open`` (``TeacherCache(folder)``: sizes, headers and the SHA-256 of every array file)
and ``map_only`` (what an open cost before: memory-mapping the arrays), plus the SHA-256 time the build
spent (``checksum_seconds`` of the manifest). ``--cold`` first drops the cache's files from the page cache
(``posix_fadvise DONTNEED``, these files only), as after a reboot or for a cache larger than RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kdkit.cache import TeacherCache


def drop_from_page_cache(folder: Path) -> None:
    """Evict the files of ``folder`` from the page cache (written pages are synced first)."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn: Callable[[], Any], folder: Path, cold: bool) -> float:
    """Seconds ``fn`` takes (after evicting ``folder`` from the page cache when ``cold``)."""
    if cold:
        drop_from_page_cache(folder)
    started = time.perf_counter()
    fn()
    return round(time.perf_counter() - started, 3)


def measure(folder: Path, cold: bool) -> dict[str, Any]:
    """The figures of the module docstring for the cache at ``folder``."""
    manifest = json.loads((folder / "manifest.json").read_text())
    files = [folder / name for name in manifest["arrays"]]
    return {"cache": str(folder), "cold": cold, "mib": round(sum(f.stat().st_size for f in files) / 2**20, 1),
            "build_teacher_seconds": manifest["teacher_seconds"],
            "build_checksum_seconds": manifest["checksum_seconds"],
            "map_only": timed(lambda: [np.load(f, mmap_mode="c") for f in files], folder, cold),
            "open": timed(lambda: TeacherCache(folder), folder, cold)}


def main() -> None:
    """Print the figures of one cache as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--cold", action="store_true")
    args = parser.parse_args()
    print(json.dumps(measure(args.folder, args.cold)))


if __name__ == "__main__":
    main()
