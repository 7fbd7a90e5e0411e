"""The dataset registry and the one function that loads any dataset by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdkit.data.base import ImageData
from kdkit.errors import KdkitError
from kdkit.registry import Registry

DatasetFactory = Callable[..., ImageData]

DATASETS: Registry[DatasetFactory] = Registry("dataset", fix="run `kdkit ls datasets`, or use dataset: digits "
                                              "for a zero-setup run")


def register_dataset(name: str, help: str | None = None) -> Callable[[DatasetFactory], DatasetFactory]:
    """Register a dataset reader.

    The reader is called as ``factory(root=root, **params)`` and must return an :class:`ImageData`.
    ``root`` is ``None`` when the recipe gives none; a reader with a standard install location uses it
    as the default, and one without raises :class:`KdkitError` asking for ``data.root``.

    Args:
        name: The short name used in recipes (``dataset: NAME``).
        help: One-line description for ``kdkit ls datasets``.
    """
    return DATASETS.register(name, help)


def load_dataset(name: str, root: str | Path | None = None, **params: Any) -> ImageData:
    """Load a registered dataset into memory.

    Args:
        name: Registered dataset name, e.g. ``"fashion_mnist"`` or ``"digits"``.
        root: Folder holding the dataset files; ``None`` uses the reader's default, if it has one.
        **params: Reader-specific options (e.g. ``image_size`` for ``digits`` and ``image_folder``).

    Returns:
        The dataset.

    Raises:
        KdkitError: On an unknown name, an unknown parameter, or missing/corrupt files.
    """
    factory = DATASETS.get(name, where="data.dataset")
    try:
        inspect.signature(factory).bind(root=root, **params)
    except TypeError:
        sig = inspect.signature(factory)
        accepted = [p for p in sig.parameters if p != "root"]
        has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
        unknown = [] if has_var_kw else sorted(set(params) - set(accepted))
        if not unknown:
            raise
        raise KdkitError(f"dataset {name!r} does not take parameter(s) {', '.join(unknown)}", choices=accepted,
                         bad=unknown[0], fix=f"remove it, or use one of the parameters of dataset {name!r}",
                         where="data") from None
    return factory(root=root, **params)
