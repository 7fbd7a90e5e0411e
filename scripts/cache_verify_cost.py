"""What verifying a teacher cache costs: the figures behind kdkit.cache.integrity's two constants.

    python scripts/cache_verify_cost.py runs/cache/KEY [--batch 128] [--cold]

For one built cache it times, in seconds:

* ``whole_file_sha256``: one SHA-256 per array file (the "full check at open" alternative);
* ``open_default``: ``TeacherCache(folder)``, i.e. sizes, headers, the view table and up to
  ``OPEN_VERIFY_BYTES`` of blocks (the whole of a smaller cache);
* ``open_sizes_only``: the same with no block budget (first and last block of each array);
* ``verify_all``: every block (``kdkit cache verify``);
* ``epoch_lookups_first`` / ``epoch_lookups_verified``: one epoch of ``lookup`` calls (random batches, the
  training view schedule) on a cache opened with the default budget, then again once every block is
  verified: the difference is what first-read verification adds to the first epoch.

``--cold`` drops the cache's files from the page cache (``posix_fadvise DONTNEED``, these files only)
before each measurement, as after a reboot or on a cache larger than RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdkit.cache import TeacherCache, integrity
from kdkit.cache.store import file_sha256
from kdkit.cache.views import view_phase, view_schedule


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


def epoch_of_lookups(cache: TeacherCache, batch: int) -> None:
    """One epoch of training reads: random batches, each sample through its epoch-0 view."""
    phase = view_phase(cache.num_samples, cache.num_views, 0)
    order = torch.randperm(cache.num_samples, generator=torch.Generator().manual_seed(0))
    for start in range(0, cache.num_samples, batch):
        index = order[start:start + batch]
        cache.lookup(index, view_schedule(phase, index, 0, cache.num_views))


def measure(folder: Path, batch: int, cold: bool) -> dict[str, Any]:
    """Every figure of the module docstring for the cache at ``folder``."""
    files = [folder / name for name in json.loads((folder / "manifest.json").read_text())["arrays"]]
    out: dict[str, Any] = {"cache": str(folder), "cold": cold, "mib": round(sum(f.stat().st_size for f in files)
                                                                            / 2**20, 1),
                           "block_bytes": integrity.BLOCK_BYTES, "open_verify_mib": integrity.OPEN_VERIFY_BYTES >> 20}
    out["whole_file_sha256"] = timed(lambda: [file_sha256(f) for f in files], folder, cold)
    out["open_default"] = timed(lambda: TeacherCache(folder), folder, cold)
    out["open_sizes_only"] = timed(lambda: TeacherCache(folder, verify_bytes=0), folder, cold)
    out["verify_all"] = timed(lambda: TeacherCache(folder).verify_all(), folder, cold)
    cache = TeacherCache(folder)
    out["epoch_lookups_first"] = timed(lambda: epoch_of_lookups(cache, batch), folder, cold)
    cache.verify_all()
    out["epoch_lookups_verified"] = timed(lambda: epoch_of_lookups(cache, batch), folder, cold)
    return out


def main() -> None:
    """Print the figures of one cache as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--cold", action="store_true")
    args = parser.parse_args()
    print(json.dumps(measure(args.folder, args.batch, args.cold)))


if __name__ == "__main__":
    main()
