"""Name -> factory registries (models, losses, bridges, datasets, methods, tasks).

A miss raises :class:`~kdkit.errors.KdkitError` listing the closest names, so a typo in a
recipe is caught before training with a suggestion.

Plugins -- the built-in methods of :mod:`kdkit.methods` and any installed package that declares an
entry point in the ``kdkit.plugins`` group -- are imported the first time any registry is read, so
their losses, bridges and methods are registered wherever a name is looked up. They are found by name
(like entry points), never imported by the layers below them: a method's folder is the only place
that names it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from kdkit.errors import KdkitError

T = TypeVar("T")

#: Packages whose import registers kdkit's own plugins (one module per task, one folder per method).
BUILTIN_PLUGINS = ("kdkit.tasks", "kdkit.methods")
#: Entry-point group through which installed packages register theirs (``module`` or ``module:object``).
PLUGIN_GROUP = "kdkit.plugins"
_discovery = {"state": "pending"}


def load_plugins() -> None:
    """Import the built-in plugin packages and every ``kdkit.plugins`` entry point, once.

    Re-entrant calls (a plugin reading a registry while it is being imported) return at once: the
    plugin registers what it defines itself, and the rest follows when the first call finishes.
    """
    if _discovery["state"] != "pending":
        return
    _discovery["state"] = "loading"
    try:
        import importlib
        from importlib.metadata import entry_points

        for name in BUILTIN_PLUGINS:
            importlib.import_module(name)
        for point in entry_points(group=PLUGIN_GROUP):
            point.load()
    except BaseException:
        _discovery["state"] = "pending"  # a failed import is retried (and fails loudly) at the next lookup
        raise
    _discovery["state"] = "done"


class Registry(Generic[T]):
    """A mapping from short names to factories, with helpful misses.

    Args:
        kind: What the registry holds ("model", "loss", ...), used in error messages.
        fix: Hint appended to a miss, e.g. "run `kdkit ls models`".
    """

    def __init__(self, kind: str, fix: str | None = None) -> None:
        self.kind = kind
        self._fix = fix or f"use one of the registered {kind} names (`kdkit ls {kind}s`)"
        self._entries: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str | None = None) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``.

        Args:
            name: The short name used in recipes.
            help: One-line description for ``kdkit ls``; defaults to the docstring's first line.
        """

        def deco(obj: T) -> T:
            self.add(name, obj, help)
            return obj

        return deco

    def add(self, name: str, obj: T, help: str | None = None) -> None:
        """Register ``obj`` under ``name`` (a duplicate replaces the old entry with a warning)."""
        if name in self._entries and self._entries[name] is not obj:
            warnings.warn(f"{self.kind} {name!r} registered twice; the later one wins", stacklevel=3)
        self._entries[name] = obj
        doc = help or (getattr(obj, "__doc__", None) or "").strip().splitlines()
        self._help[name] = doc if isinstance(doc, str) else (doc[0] if doc else "")

    def get(self, name: str, where: str | None = None) -> T:
        """Return the entry for ``name`` or raise a :class:`KdkitError` with the closest names."""
        load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            raise KdkitError(
                f"unknown {self.kind} {name!r}", choices=self._entries, bad=name, fix=self._fix, where=where
            ) from None

    def describe(self, name: str) -> str:
        """One-line help for ``name``."""
        load_plugins()
        return self._help.get(name, "")

    def names(self) -> list[str]:
        """All registered names, sorted."""
        load_plugins()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` for every registered name, sorted by name."""
        load_plugins()
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        load_plugins()
        return len(self._entries)
