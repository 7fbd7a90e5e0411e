"""``kdkit export``: a finished run's deployed network written in a format, verified, timed and described.

Order: check the options (format, opset, batch) before anything is built; load the run; write the file under a
temporary name; load it back with its own runtime and compare it with PyTorch on the run's first test images (stored
in the run folder); only then give it its name (a file that fails is kept as ``NAME.unverified`` and the command
exits with code 1); time it; write ``model_card.md`` beside it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdkit._version import __version__
from kdkit.checkpoint import atomic_write_text, reported_write
from kdkit.data import normalize
from kdkit.deployment import read_samples
from kdkit.errors import ExportMismatch, KdkitError
from kdkit.export.card import model_card
from kdkit.export.formats import FORMATS, ExportFormat
from kdkit.export.source import DeployedRun, describe, open_run
from kdkit.export.timing import latency_table
from kdkit.export.verify import TOLERANCE, Verification, verify

#: Name of the card written beside an export.
CARD = "model_card.md"
#: Timed runs per latency figure of a model card (a quick figure; `kdkit bench export` measures more).
CARD_REPEATS, CARD_WARMUP = 20, 5


@dataclass
class ExportResult:
    """What ``kdkit export`` wrote and found.

    Attributes:
        path: The exported file.
        card: Its model card.
        format: The format's name.
        verification: The file against PyTorch.
        latency: ``{batch: {"eager": ms, "export": ms}}`` per image.
        notes: What writing it found worth saying.
        metadata: What the file embeds.
    """

    path: Path
    card: Path
    format: str
    verification: Verification
    latency: dict[int, dict[str, float]]
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


def checked_options(fmt_name: str, opset: int | None, dynamic_batch: bool) -> ExportFormat:
    """The format, once it and the options given for it are known to work here.

    Raises:
        KdkitError: An unknown format (closest names first), an option the format does not take, an opset it
            cannot write, or a missing optional dependency (naming the extra that installs it).
    """
    fmt = FORMATS.get(fmt_name, where="--format")
    if opset is not None and not fmt.takes_opset:
        takes = [name for name, f in FORMATS.items() if f.takes_opset]
        raise KdkitError(f"--opset applies to {', '.join(takes)} exports, not {fmt.name}", choices=takes,
                         fix="drop --opset, or export to a format that has opsets", where="--opset")
    if dynamic_batch and not fmt.takes_dynamic_batch:
        takes = [name for name, f in FORMATS.items() if f.takes_dynamic_batch]
        raise KdkitError(f"--dynamic-batch applies to {', '.join(takes)} exports; a {fmt.name} file holds weights, "
                         "which take any batch", choices=takes, fix="drop --dynamic-batch", where="--dynamic-batch")
    if opset is not None:
        fmt.check_opset(opset)
    fmt.check_installed()
    return fmt


def output_path(run: DeployedRun, fmt: ExportFormat, out: str | Path | None) -> Path:
    """Where the export goes: ``--out`` (a file with the format's suffix, or a folder: one that exists or a path
    without a suffix), else ``RUN/export/``.

    Raises:
        KdkitError: ``--out`` names a file with another suffix (``kdkit predict`` tells formats by it).
    """
    if out is None:
        return run.folder / "export" / f"model{fmt.suffix}"
    path = Path(out)
    if path.is_dir() or not path.suffix:
        return path / f"model{fmt.suffix}"
    if path.suffix != fmt.suffix:
        raise KdkitError(f"--out {str(out)!r} does not end with {fmt.suffix!r}, the suffix of {fmt.name} exports",
                         bad=path.suffix, fix=f"name the file ...{fmt.suffix} (kdkit predict recognises exports by "
                         "it), or give a folder", where="--out")
    return path


def export_metadata(run: DeployedRun, fmt: ExportFormat, *, opset: int | None, batch: int | None) -> dict[str, Any]:
    """What an export embeds: the run's deployment record, the export's details, the run and its recipe."""
    summary = run.summary
    metric = summary.get("metric", "top1")
    return {
        "kdkit": __version__,
        "deployment": run.deployment.to_dict(),
        "input": {"name": "images", "preprocessing": run.deployment.preprocessing()},
        "output": {"name": "logits", "meaning": run.deployment.output},
        "export": {"format": fmt.name, "batch": batch, "opset": (opset or fmt.default_opset) if fmt.takes_opset
                   else None, "checkpoint": run.checkpoint.name},
        "run": {"name": summary.get("name"), "folder": str(run.folder), "network": describe(run.student, run.recipe),
                "recipe_digest": summary.get("recipe_digest"), "metric": metric,
                f"best_{metric}": summary.get(f"best_{metric}"), "best_epoch": summary.get("best_epoch")},
        "recipe": run.recipe.to_dict(),
    }


def export_run(run_dir: str | Path, fmt_name: str = "onnx", *, out: str | Path | None = None, opset: int | None = None,
               dynamic_batch: bool = False, checkpoint: str = "best", tolerance: float = TOLERANCE,
               timing_batches: tuple[int, ...] = (1,),
               repeats: int = CARD_REPEATS) -> ExportResult:
    """Export a finished run's deployed network (module docstring).

    Args:
        run_dir: The run folder.
        fmt_name: A registered format (``onnx``, ``torchscript``, ``safetensors``).
        out: The file (or folder) to write; default ``RUN/export/model.SUFFIX``.
        opset: ONNX opset (default: the format's).
        dynamic_batch: Let the file take any batch size (else it takes one image at a time).
        checkpoint: ``best`` or ``latest``.
        tolerance: Relative tolerance of the verification.
        timing_batches: Batch sizes the latency is measured at (the model card's figures; a file that takes one
            image at a time is fed the batch image by image).
        repeats: Timed runs per latency figure (the median is reported).

    Raises:
        KdkitError: Bad input (exit code 2), before anything is written.
        ExportMismatch: The written file's outputs differ from PyTorch's beyond the tolerance (exit code 1).
    """
    fmt = checked_options(fmt_name, opset, dynamic_batch)
    run = open_run(run_dir, checkpoint)
    pixels, _ = read_samples(run.folder)
    path = output_path(run, fmt, out)
    batch = None if dynamic_batch or not fmt.takes_dynamic_batch else 1
    example = normalize(pixels[: 2 if batch is None else 1], run.deployment.mean, run.deployment.std)
    metadata = export_metadata(run, fmt, opset=opset, batch=batch)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")  # the suffix tells the loaders the format
    try:
        with reported_write(f"{fmt.name} export", path, fix="free space on that disk, or pass --out elsewhere"):
            path.parent.mkdir(parents=True, exist_ok=True)
            written = fmt.write(run.network, tmp, metadata, example=example, opset=opset, dynamic_batch=dynamic_batch)
        exported = fmt.load(tmp)
        verification = verify(exported, run.network, pixels, run.deployment, tolerance)
        if not verification.ok:
            kept = path.with_name(path.name + ".unverified")
            os.replace(tmp, kept)
            raise ExportMismatch(mismatch_message(verification, fmt, run, kept))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    latency = latency_table(run.network, exported, run.deployment.input_shape, timing_batches, repeats=repeats,
                            warmup=CARD_WARMUP)
    card = path.parent / CARD
    atomic_write_text(card, model_card(run, fmt, path, metadata, verification, latency, sha256(path)))
    return ExportResult(path, card, fmt.name, verification, latency, written.notes, metadata)


def mismatch_message(v: Verification, fmt: ExportFormat, run: DeployedRun, kept: Path) -> str:
    """What differs, where and by how much."""
    if v.problem:
        where = v.problem
    else:
        classes = run.deployment.classes
        name = f" ({classes[v.worst[1]]!r})" if v.worst[1] < len(classes) else ""
        where = (f"largest difference at test image #{v.worst[0]}, output {v.worst[1]}{name}: PyTorch "
                 f"{v.reference:.6g}, {fmt.name} {v.exported:.6g}; {v.line()}")
    return (f"the {fmt.name} export of {str(run.folder)!r} does not compute what PyTorch does: {where}; the "
            f"unverified file is kept at {str(kept)!r} for inspection; fix: report it with that file, or try another "
            "format" + (" or --opset" if fmt.takes_opset else ""))


def sha256(path: Path) -> str:
    """The file's SHA-256 (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
