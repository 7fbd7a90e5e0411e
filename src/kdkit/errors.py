"""One error type for every bad input, so the CLI can print it and exit with code 2.

Each message names the bad value, the valid choices (closest first) and the fix, as the
project's standards ask. Use :func:`closest` to order the choices.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


class KdkitError(ValueError):
    """A user-facing error: bad recipe value, unknown name, missing file, bad shape.

    Args:
        message: What was wrong, naming the bad value.
        choices: Valid alternatives; shown closest-first to ``bad`` when ``bad`` is given.
        bad: The offending value, used to rank ``choices``.
        fix: One sentence telling the user how to fix it.
        where: Location in the recipe (e.g. ``distill[0].loss``) or file path.
    """

    def __init__(
        self,
        message: str,
        *,
        choices: Iterable[str] | None = None,
        bad: str | None = None,
        fix: str | None = None,
        where: str | None = None,
    ) -> None:
        self.message = message
        self.choices = closest(bad, choices) if (choices is not None and bad is not None) else list(choices or [])
        self.fix = fix
        self.where = where
        super().__init__(self.render())

    def render(self) -> str:
        """The full one-paragraph message shown to the user."""
        parts = [f"{self.where}: {self.message}" if self.where else self.message]
        if self.choices:
            shown = self.choices[:12]
            more = f" (+{len(self.choices) - len(shown)} more)" if len(self.choices) > len(shown) else ""
            parts.append("valid choices: " + ", ".join(shown) + more)
        if self.fix:
            parts.append("fix: " + self.fix)
        return "; ".join(parts)


class RecipeErrors(KdkitError):
    """Several problems found at once (``kdkit validate`` reports all of them)."""

    def __init__(self, errors: list[KdkitError], source: str | None = None, *, partial: Any = None,
                 left_out: Any = None, warnings: Sequence[str] = ()) -> None:
        self.errors = errors
        self.source = source
        self.warnings = list(warnings)  # what the checks found that is not an error (e.g. a file missing here)
        # the recipe with every value the schema refused left out (defaults in their place), when that is valid:
        # what later checks (taps, shapes, files) can still run on, so one report holds every problem
        self.partial = partial
        self.left_out = left_out  # a kdkit.recipe.LeftOut: the keys and list items left out
        head = f"{len(errors)} problem(s) in {source}" if source else f"{len(errors)} problem(s)"
        KdkitError.__init__(self, head + ":\n" + "\n".join(
            [*(f"  - {e.render()}" for e in errors), *(f"  warning: {w}" for w in self.warnings)]))

    def render(self) -> str:
        return self.message


class TrainingDiverged(RuntimeError):
    """Training diverged: a loss term, or a parameter, buffer or optimiser state, became NaN or infinite.

    Not a :class:`KdkitError` (the input was valid; the CLI exits with code 3), but rendered the same way:
    what diverged and where, the last good checkpoint (every tensor in it finite) and the fix.

    Args:
        message: What diverged (the term or tensor) and when (epoch and steps).
        checkpoint: The last good checkpoint folder, kept as it was; ``None`` when none was written yet.
        fix: One sentence telling the user how to fix it.
    """

    def __init__(self, message: str, *, checkpoint: Path | None, fix: str) -> None:
        self.message = message
        self.checkpoint = checkpoint
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        """The full one-paragraph message shown to the user."""
        return f"{self.message}; last good checkpoint kept: {self.checkpoint or 'none yet'}; fix: {self.fix}"


class ExportMismatch(RuntimeError):
    """An exported file's outputs differ from PyTorch's beyond the tolerance (the CLI exits with code 1).

    Not a :class:`KdkitError`: the input was valid, the exporter or runtime produced something else.

    Args:
        message: What differs, where (image, output) and by how much, and where the unverified file was kept.
    """


def closest(bad: str | None, choices: Iterable[str] | None) -> list[str]:
    """Order ``choices`` so the ones most similar to ``bad`` come first.

    Args:
        bad: The value the user gave.
        choices: All valid values.

    Returns:
        The choices, closest first (by difflib ratio, ties alphabetical).
    """
    pool = sorted(set(choices or []))
    if bad is None:
        return pool
    low = bad.lower()

    def score(choice: str) -> float:
        ratio = difflib.SequenceMatcher(None, low, choice.lower()).ratio()
        # Prefix and substring matches are what a user means most often ("resnet3" -> "resnet32").
        if choice.lower().startswith(low) or low.startswith(choice.lower()):
            ratio += 0.5
        elif low in choice.lower():
            ratio += 0.25
        return ratio

    return sorted(pool, key=lambda c: (-score(c), c))
