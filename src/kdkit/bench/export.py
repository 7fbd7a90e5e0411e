"""``kdkit bench export RUN``: ms per image of a run's exported network under its runtime vs PyTorch eager.

The run is exported (``--format``, default ONNX) with a dynamic batch, verified as every export is, into a
temporary folder (or ``--out``); both runtimes then run the same blank batches of 1 and 64 images on the CPU,
with as many threads as torch uses, and the median of the timed runs is reported per image.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from kdkit.export import FORMATS, export_run
from kdkit.export.timing import REPEATS
from kdkit.profile import machine_info

#: Batch sizes timed: one request at a time, and a batch.
BATCHES = (1, 64)
RUNTIMES = {"onnx": "ONNX Runtime", "torchscript": "TorchScript", "safetensors": "PyTorch eager (rebuilt)"}


def run_export_bench(run_dir: Path, fmt_name: str = "onnx", *, out: Path | None = None,
                     batches: tuple[int, ...] | None = None, repeats: int | None = None) -> dict[str, Any]:
    """Export ``run_dir``'s deployed network and time it against PyTorch eager; print and return the table.

    Args:
        run_dir: A finished run folder.
        fmt_name: The export format timed.
        out: Where the export is kept (default: a temporary folder, deleted).
        batches: Batch sizes timed (default :data:`BATCHES`).
        repeats: Timed runs per figure (default :data:`kdkit.export.timing.REPEATS`).

    Raises:
        KdkitError: Bad input (as ``kdkit export``).
        ExportMismatch: The export does not compute what PyTorch does.
    """
    fmt = FORMATS.get(fmt_name, where="--format")
    batches, repeats = batches or BATCHES, repeats or REPEATS
    with tempfile.TemporaryDirectory(prefix="kdkit-bench-export-") as tmp:
        result = export_run(run_dir, fmt.name, out=out or Path(tmp), dynamic_batch=fmt.takes_dynamic_batch,
                            timing_batches=batches, repeats=repeats)
    machine = machine_info()
    table = format_table(result.latency, RUNTIMES.get(fmt.name, fmt.name))
    print(f"export latency of {run_dir} ({result.metadata['run']['network']}), ms per image, median of {repeats} "
          f"timed runs; torch threads {torch.get_num_threads()}, {fmt.name} runtime threads the same")
    print(table)
    print(f"verified: {result.verification.line()}")
    print(f"machine: {machine['cpu']} ({machine['cores']} cores), torch {machine['torch']}; command: kdkit "
          f"{shlex.join(sys.argv[1:])}")
    return {"run": str(run_dir), "format": fmt.name, "latency_ms": result.latency, "repeats": repeats,
            "verification": result.verification.line(), "machine": machine}


def format_table(latency: dict[int, dict[str, float]], runtime: str) -> str:
    """A Markdown table: one row per runtime, one column per batch size."""
    batches = list(latency)
    head = "| runtime | " + " | ".join(f"batch {b}" for b in batches) + " |"
    rule = "|---|" + "---:|" * len(batches)
    eager = "| PyTorch eager | " + " | ".join(f"{latency[b]['eager']:.4f}" for b in batches) + " |"
    other = f"| {runtime} | " + " | ".join(f"{latency[b]['export']:.4f}" for b in batches) + " |"
    ratio = "| speed-up | " + " | ".join(f"{latency[b]['eager'] / latency[b]['export']:.2f}x" for b in batches) + " |"
    return "\n".join([head, rule, eager, other, ratio])
