"""TorchScript export: the deployed network traced (``torch.jit.trace``), run back with ``torch.jit.load``.

Tracing records the operations one forward runs, so the deployed network's hooks (a rewriting bridge, a forward
stopped at a deploying bridge's tap) are part of the graph. The metadata is an extra file of the archive
(``kdkit.json``): ``torch.jit.load(path, _extra_files={"kdkit.json": ""})`` reads it.

A traced graph keeps the batch size where the network computes with it; ``--dynamic-batch`` traces with two
images and the verification runs a larger batch, so a graph that fixed its batch size fails there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.export.formats import (
    METADATA_KEY,
    Exported,
    ExportFormat,
    Written,
    exporter_warnings,
    metadata_json,
    parse_metadata,
    register_format,
)

#: The archive entry holding the metadata.
EXTRA_FILE = f"{METADATA_KEY}.json"


@register_format
class TorchScriptFormat(ExportFormat):
    """TorchScript archive (traced) with the metadata as an extra file; verified with torch.jit.load."""

    name = "torchscript"
    suffix = ".pt"
    takes_dynamic_batch = True

    def write(self, network: nn.Module, path: Path, metadata: dict[str, Any], *, example: Tensor,
              opset: int | None, dynamic_batch: bool) -> Written:
        written = Written()
        with exporter_warnings(written), torch.no_grad():
            traced = torch.jit.trace(network, example, check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: metadata_json(metadata)})
        return written

    def load(self, path: Path) -> Exported:
        extra = {EXTRA_FILE: ""}
        try:
            with exporter_warnings(Written()):
                module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise KdkitError(f"{str(path)!r} is not a TorchScript archive torch can load ({first})",
                             fix="export the run again", where=str(path)) from None
        module.eval()
        metadata = parse_metadata(extra[EXTRA_FILE], path)

        def run(x: Tensor) -> Tensor:
            with torch.inference_mode():
                return module(x)

        batch = metadata.get("export", {}).get("batch")
        return Exported(metadata, run, batch if isinstance(batch, int) else None)
