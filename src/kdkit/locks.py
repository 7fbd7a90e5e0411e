"""Exclusive locks on the folders kdkit writes: run folders and teacher-cache builds.

Folder ``F`` is locked by an flock (the ``filelock`` package) on its hidden sibling ``.F.lock``. The
operating system drops an flock when its process ends, so a crashed or killed writer never leaves a stale
lock. While a lock is held, ``.F.lock.owner`` names its holder (pid, host, command, start time) so that a
second writer can say who holds the folder. The lock file sits beside the folder, not in it: a run folder
can then be deleted (``--overwrite``) or created (a cache is renamed into place) while it is held.

Locks are re-entrant within a process (a student that trains its teacher first holds the teacher's run
folder, and :func:`kdkit.runner.run_recipe` of the teacher takes it again); they are not meant to be shared
between threads.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from kdkit.checkpoint import atomic_write_text
from kdkit.errors import KdkitError

#: Locks this process holds, by lock file: how many nested holds each has.
_DEPTH: dict[Path, int] = {}


def lock_file(folder: Path) -> Path:
    """The lock file of ``folder``: ``.NAME.lock`` beside it (the path resolved, so every spelling agrees)."""
    folder = Path(folder).resolve()
    return folder.with_name(f".{folder.name}.lock")


def owner_file(folder: Path) -> Path:
    """Where the holder of ``folder``'s lock records itself: ``.NAME.lock.owner`` beside it."""
    return lock_file(folder).with_suffix(".lock.owner")


def holder(folder: Path) -> str:
    """Who holds ``folder``'s lock, as recorded by the holder, e.g. ``pid 12 on host gpu1 (kdkit run r.yaml,
    since 2024-05-01T10:00:00)``."""
    try:
        who = json.loads(owner_file(folder).read_text())
    except (OSError, ValueError):  # between the holder's lock and its record, or a kdkit that wrote none
        return "another process (it has not recorded its pid yet)"
    return f"pid {who['pid']} on host {who['host']} ({who['command']}, since {who['since']})"


@contextlib.contextmanager
def exclusive(folder: Path, *, what: str, fix: str = "", wait: bool = False,
              on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold ``folder``'s lock for the block.

    Args:
        folder: The folder written under the lock (it need not exist).
        what: What the folder is, for messages (e.g. ``"run folder"``).
        fix: What to do when another process holds it (``wait=False``).
        wait: Wait for the holder to finish instead of refusing.
        on_wait: Called once with :func:`holder`'s description before waiting.

    Raises:
        KdkitError: Another process holds the lock and ``wait`` is False; the message names it.
    """
    path = lock_file(folder)
    if path in _DEPTH:  # this process holds it already: nest
        _DEPTH[path] += 1
        try:
            yield
        finally:
            _DEPTH[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            raise KdkitError(f"{what} {str(folder)!r} is being written by {holder(folder)}", fix=fix) from None
        if on_wait is not None:
            on_wait(holder(folder))
        lock.acquire()
    owner = owner_file(folder)
    _DEPTH[path] = 1
    try:
        atomic_write_text(owner, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                             "command": _command(),
                                             "since": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        yield
    finally:
        del _DEPTH[path]
        owner.unlink(missing_ok=True)  # before the release: a record present always names the holder
        lock.release()


def _command() -> str:
    """This process's command line, ``python -m kdkit`` shown as ``kdkit``."""
    program = Path(sys.argv[0])
    name = "kdkit" if program.name == "__main__.py" and program.parent.name == "kdkit" else program.name
    return " ".join([name, *sys.argv[1:]])
