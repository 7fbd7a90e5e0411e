"""ONNX export, run back with onnxruntime (the ``export`` extra: ``pip install 'kdkit[export]'``).

The network is written by PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): it
traces the forward, so the deployed network's hooks (a bridge that rewrites a tap, a forward stopped at a
deploying bridge's tap) become plain graph nodes, and it needs only the ``onnx`` package. The newer
``torch.export``-based exporter needs ``onnxscript`` besides and cannot follow a forward that a hook stops.

The metadata is one ``metadata_props`` entry (``kdkit``: JSON). onnxruntime runs on the CPU with as many
threads as torch uses, and without spinning idle threads, so that its latency compares with PyTorch's on equal
terms in one process.
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

#: Opsets the TorchScript-based exporter writes (torch's own bounds for it).
MIN_OPSET, MAX_OPSET = 7, 20
INPUT, OUTPUT = "images", "logits"


@register_format
class OnnxFormat(ExportFormat):
    """ONNX graph with the metadata in metadata_props; verified and run with onnxruntime."""

    name = "onnx"
    suffix = ".onnx"
    requires = ("onnx", "onnxruntime")
    extra = "export"
    takes_opset = True
    takes_dynamic_batch = True
    default_opset = 17

    def check_opset(self, opset: int) -> None:
        if not MIN_OPSET <= opset <= MAX_OPSET:
            raise KdkitError(f"--opset {opset} is outside what torch's ONNX exporter writes ({MIN_OPSET}..{MAX_OPSET})",
                             fix=f"use --opset between {MIN_OPSET} and {MAX_OPSET} (default {self.default_opset})",
                             where="--opset")

    def write(self, network: nn.Module, path: Path, metadata: dict[str, Any], *, example: Tensor,
              opset: int | None, dynamic_batch: bool) -> Written:
        import onnx

        opset = opset or self.default_opset
        written = Written()
        axes = {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}} if dynamic_batch else None
        try:
            # Not under no_grad: there PyTorch's attention takes its fused inference path, an operator no opset has
            with exporter_warnings(written):
                torch.onnx.export(network, (example,), str(path), dynamo=False, opset_version=opset,
                                  input_names=[INPUT], output_names=[OUTPUT], dynamic_axes=axes)
        except torch.onnx.errors.UnsupportedOperatorError as exc:
            first = str(exc).strip().splitlines()[0]
            raise KdkitError(f"--opset {opset}: the exporter cannot write this network at that opset ({first})",
                             fix="use the newer opset the error names (--opset N)", where="--opset") from None
        model = onnx.load(str(path))
        del model.metadata_props[:]
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, metadata_json(metadata)
        onnx.save(model, str(path))
        return written

    def load(self, path: Path) -> Exported:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # Idle onnxruntime threads otherwise spin for a while after each run, taking the cores torch's threads
        # need when both run in one process (measured: PyTorch eager 0.6 ms -> 280 ms per image on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own (pybind) types: an invalid or unsupported graph
            first = str(exc).strip().splitlines()[0]
            raise KdkitError(f"onnxruntime {ort.__version__} cannot load {str(path)!r}: {first}",
                             fix=f"export with another --opset (the default {self.default_opset} runs on onnxruntime "
                                 ">= 1.13)", where=str(path)) from None
        metadata = parse_metadata(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY), path)
        batch = session.get_inputs()[0].shape[0]
        name = session.get_inputs()[0].name

        def run(x: Tensor) -> Tensor:
            return torch.from_numpy(session.run(None, {name: x.detach().cpu().float().numpy()})[0])

        return Exported(metadata, run, batch if isinstance(batch, int) else None)
