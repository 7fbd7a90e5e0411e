"""The contract of an export format and its registry (``kdkit export --format NAME``).

A format lives in one module of this package and registers one :class:`ExportFormat` in :data:`FORMATS`: how
to write the deployed network with its metadata (the run's :class:`~kdkit.deployment.Deployment` and the export's
details, one JSON string), and how to load the written file back into something that runs it -- what the
verification compares with PyTorch and what ``kdkit predict`` runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.registry import Registry

#: Key of the metadata in every format (a JSON string).
METADATA_KEY = "kdkit"


@dataclass
class Exported:
    """An exported file loaded back.

    Attributes:
        metadata: What the export embedded (:func:`kdkit.export.run.export_metadata`).
        run: Normalised float32 images ``(B, C, H, W)`` on the CPU -> the network's outputs ``(B, K)``.
        batch: The batch size the file takes (``None``: any); :meth:`__call__` feeds it one batch at a time.
    """

    metadata: dict[str, Any]
    run: Callable[[Tensor], Tensor]
    batch: int | None = None

    def __call__(self, x: Tensor) -> Tensor:
        """The outputs for any number of images (split into the batch size the file takes)."""
        if self.batch is None or len(x) == self.batch:
            return self.run(x)
        return torch.cat([self.run(part) for part in x.split(self.batch)])


@dataclass
class Written:
    """What writing an export found worth saying.

    Attributes:
        notes: Lines for the user (e.g. what the tracer fixed as constants).
    """

    notes: list[str] = field(default_factory=list)


class ExportFormat:
    """Base class of a registered export format (one instance per format in :data:`FORMATS`).

    Attributes:
        name: Registry name (``--format NAME``).
        suffix: File suffix of its exports (``.onnx``); ``kdkit predict`` recognises files by it.
        requires: Modules it imports (optional dependencies).
        extra: The kdkit extra that installs them (``pip install 'kdkit[EXTRA]'``).
        takes_opset: Whether ``--opset`` applies.
        takes_dynamic_batch: Whether ``--dynamic-batch`` applies (otherwise the file takes any batch size, or
            batch size means nothing to it).
        default_opset: The opset used when ``--opset`` is not given (formats that take one).
    """

    name: ClassVar[str] = ""
    suffix: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str | None] = None
    takes_opset: ClassVar[bool] = False
    takes_dynamic_batch: ClassVar[bool] = False
    default_opset: ClassVar[int | None] = None

    def check_installed(self) -> None:
        """Raise when a package the format needs is missing, naming the extra that installs it.

        Raises:
            KdkitError: A module of :attr:`requires` cannot be imported.
        """
        missing = [module for module in self.requires if importlib.util.find_spec(module) is None]
        if missing:
            raise KdkitError(f"--format {self.name} needs the package(s) {', '.join(missing)}, which are not installed",
                             fix=f"pip install 'kdkit[{self.extra}]' (installs {', '.join(self.requires)})")

    def check_opset(self, opset: int) -> None:
        """Raise when this format cannot write ``opset`` (called before anything is built)."""

    def write(self, network: nn.Module, path: Path, metadata: dict[str, Any], *, example: Tensor,
              opset: int | None, dynamic_batch: bool) -> Written:
        """Write ``network`` (eval mode, normalised images -> outputs) to ``path`` with ``metadata`` embedded.

        Args:
            network: The deployed network.
            path: The file to write (a temporary name; the caller renames it once verified).
            metadata: JSON-serialisable metadata, stored under :data:`METADATA_KEY`.
            example: A normalised input batch of the batch size a fixed-batch file takes.
            opset: ONNX opset (formats with :attr:`takes_opset`).
            dynamic_batch: Let the file take any batch size (formats with :attr:`takes_dynamic_batch`).
        """
        raise NotImplementedError

    def load(self, path: Path) -> Exported:
        """Load an export of this format back (metadata and a runner)."""
        raise NotImplementedError


FORMATS: Registry[ExportFormat] = Registry("export format", fix="use one of these with --format NAME")


def register_format(cls: type[ExportFormat]) -> type[ExportFormat]:
    """Class decorator: register one instance of an :class:`ExportFormat` subclass under ``cls.name``."""
    if not cls.name or not cls.suffix.startswith("."):
        raise TypeError(f"{cls.__name__} needs a `name` and a `suffix` starting with '.'")
    FORMATS.add(cls.name, cls(), (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "")
    return cls


def format_of_file(path: Path) -> ExportFormat:
    """The registered format whose exports end like ``path``.

    Raises:
        KdkitError: No format writes such files.
    """
    by_suffix = {fmt.suffix: fmt for _, fmt in FORMATS.items()}
    if path.suffix in by_suffix:
        return by_suffix[path.suffix]
    raise KdkitError(f"{str(path)!r} is neither a run folder nor an export kdkit knows (suffix {path.suffix!r})",
                     choices=list(by_suffix), bad=path.suffix,
                     fix="pass a run folder (with checkpoints/) or a file written by `kdkit export`", where=str(path))


def metadata_json(metadata: dict[str, Any]) -> str:
    """The metadata as the one JSON string every format stores."""
    return json.dumps(metadata, sort_keys=True)


def parse_metadata(text: str | None, path: Path) -> dict[str, Any]:
    """The metadata of an export, from its stored JSON string.

    Raises:
        KdkitError: The file carries no kdkit metadata (not written by ``kdkit export``) or a damaged one.
    """
    if not text:
        raise KdkitError(f"{str(path)!r} carries no kdkit metadata (no {METADATA_KEY!r} entry)",
                         fix="use a file written by `kdkit export` (it embeds the preprocessing and class names)",
                         where=str(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KdkitError(f"the kdkit metadata of {str(path)!r} is not valid JSON ({exc})",
                         fix="export the run again", where=str(path)) from None
    if not isinstance(data, dict) or "deployment" not in data:
        raise KdkitError(f"the kdkit metadata of {str(path)!r} has no deployment record", fix="export the run again",
                         where=str(path))
    return data


#: Warnings the exporters print about their own deprecation: kdkit chose them knowingly (module docstrings).
_EXPORTER_NOTICES = (r".*legacy TorchScript-based ONNX export.*", r".*torch\.jit\..* is deprecated.*",
                     r".*feature will be removed.*")


@contextlib.contextmanager
def exporter_warnings(written: Written) -> Iterator[None]:
    """Export or load under this block: the exporters' deprecation notices are silenced (kdkit picked them
    knowingly), and what the tracer warns about (values it fixed as constants, e.g. shape checks) is gathered into
    one note of ``written`` rather than printed line by line -- the verification that follows checks the outputs.
    Other warnings are shown as they come."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for pattern in _EXPORTER_NOTICES:
            warnings.filterwarnings("ignore", message=pattern)
        yield
    traced = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    for w in caught:
        if w not in traced:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if traced:
        places = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in traced})
        written.notes.append(f"the tracer fixed {len(traced)} Python value(s) as constants (at {', '.join(places)}; "
                             "usually shape checks); the verification below checks the outputs")
