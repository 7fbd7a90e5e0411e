"""safetensors export: the deployed network's weights, with the metadata in the file's header.

A plain student's file holds its own ``state_dict`` (no prefix: ``build_model(arch, ...)`` loads it as it is);
a student that deploys bridges holds the :class:`~kdkit.distill.Student`'s keys, ``model.*`` and
``bridges.TERM.*`` for those bridges only. The metadata carries the recipe, so kdkit rebuilds the network to run
it back (:func:`kdkit.export.source.trained_student`): a weights file is code-free, the network comes from kdkit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from kdkit.checkpoint import read_weights
from kdkit.deployment import Deployment
from kdkit.export.formats import (
    METADATA_KEY,
    Exported,
    ExportFormat,
    Written,
    metadata_json,
    parse_metadata,
    register_format,
)
from kdkit.export.source import load_weights, trained_student
from kdkit.profile import Deployed
from kdkit.recipe import recipe_from_dict

MODEL_PREFIX = "model."


def deployed_weights(student: nn.Module) -> dict[str, Tensor]:
    """The weights a safetensors export holds (see the module docstring)."""
    state = student.state_dict()
    if not len(student.bridges):
        state = {key.removeprefix(MODEL_PREFIX): value for key, value in state.items()}
    return {key: value.detach().contiguous().clone() for key, value in state.items()}


@register_format
class SafetensorsFormat(ExportFormat):
    """The deployed network's weights (safetensors) with the metadata and recipe in its header."""

    name = "safetensors"
    suffix = ".safetensors"

    def write(self, network: nn.Module, path: Path, metadata: dict[str, Any], *, example: Tensor,
              opset: int | None, dynamic_batch: bool) -> Written:
        save_file(deployed_weights(network.student), str(path), metadata={METADATA_KEY: metadata_json(metadata)})
        return Written()

    def load(self, path: Path) -> Exported:
        tensors, header = read_weights(path)
        metadata = parse_metadata(header.get(METADATA_KEY), path)
        recipe = recipe_from_dict(metadata["recipe"], source=f"{path} (metadata)")
        deployment = Deployment.from_dict(metadata["deployment"], f"{path} (metadata)")
        student = trained_student(recipe, deployment).deployment()
        if not len(student.bridges):
            tensors = {MODEL_PREFIX + key: value for key, value in tensors.items()}
        load_weights(student, tensors, str(path))
        network = Deployed(student).eval()

        def run(x: Tensor) -> Tensor:
            with torch.inference_mode():
                return network(x)

        return Exported(metadata, run)
