"""Progress of a long loop: a live bar on an interactive terminal, plain lines at a bounded rate elsewhere.

A live bar redraws itself in place, which only a terminal shows; written to a file or a pipe (a log, a
batch job, CI) it prints nothing until the loop ends. There :class:`PlainProgress` prints one line now and
then instead -- at most one every :data:`PLAIN_EVERY_SECONDS`, and none while other lines keep coming.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

#: Seconds between two plain progress lines (a log stays readable; a stalled run shows within this time).
PLAIN_EVERY_SECONDS = 15.0


class ProgressBar(Protocol):
    """What a loop reports to: how far it is, and lines to print (above a live bar)."""

    def update(self, completed: int, status: str) -> None:
        """``completed`` of the total steps are done; ``status`` describes the current state."""

    def print(self, line: str) -> None:
        """Print ``line`` (e.g. an epoch's results)."""


class RichProgress:
    """A live rich bar (step counts, elapsed time, eta and the status), removed when the loop ends."""

    def __init__(self, progress: Any, task: Any) -> None:
        self.progress, self.task = progress, task

    def update(self, completed: int, status: str) -> None:
        self.progress.update(self.task, completed=completed, status=status)

    def print(self, line: str) -> None:
        self.progress.console.print(line, highlight=False, soft_wrap=True)


class PlainProgress:
    """Plain progress lines on standard output, at most one per ``every`` seconds without other output.

    Args:
        label: What runs (starts each line).
        total: Steps in all.
        completed: Steps already done (a resumed run), not counted in the rate.
        every: Seconds between lines (default :data:`PLAIN_EVERY_SECONDS`).
        clock: Seconds (monotonic); a parameter so tests control time.
    """

    def __init__(self, label: str, total: int, completed: int = 0, every: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.clock = label, total, clock
        self.every = PLAIN_EVERY_SECONDS if every is None else every
        self.started, self.start_step = clock(), completed
        self.last_line = self.started

    def update(self, completed: int, status: str) -> None:
        now = self.clock()
        if now - self.last_line < self.every:
            return
        elapsed = now - self.started
        done = completed - self.start_step
        eta = f"eta {_duration(elapsed * (self.total - completed) / done)}" if done > 0 else "eta ?"
        percent = 100.0 * completed / max(self.total, 1)
        self.print(f"{self.label} step {completed}/{self.total} ({percent:.0f}%)  {status}  "
                   f"{_duration(elapsed)} elapsed, {eta}")

    def print(self, line: str) -> None:
        print(line, flush=True)
        self.last_line = self.clock()


def _duration(seconds: float) -> str:
    """``seconds`` as ``1h02m``, ``3m05s`` or ``42s``."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def interactive() -> bool:
    """Whether a live bar would show: standard output is an interactive terminal (or a Jupyter notebook)."""
    from rich.console import Console

    console = Console(file=sys.stdout)
    return console.is_interactive or console.is_jupyter


@contextlib.contextmanager
def progress_bar(label: str, total: int, completed: int = 0) -> Iterator[ProgressBar]:
    """A live bar on an interactive terminal (:func:`interactive`), else :class:`PlainProgress` lines.

    Args:
        label: What runs (the bar's description, each plain line's start).
        total: Steps in all.
        completed: Steps already done (a resumed run).
    """
    if not interactive():
        yield PlainProgress(label, total, completed)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
    with Progress(*columns, transient=True) as progress:
        yield RichProgress(progress, progress.add_task(label, total=total, completed=completed, status=""))
