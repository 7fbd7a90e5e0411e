"""``kdkit search``: find a distiller in a space of the distiller grammar (Auto-KD's MCTS, KD-Zero's evolution,
random search), each candidate scored by a short proxy run on a validation split (docs/search.md)."""

from kdkit.search.run import run_search

__all__ = ["run_search"]
