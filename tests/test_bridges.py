"""Bridges are sized from the probed taps and let otherwise incomparable taps be distilled."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from kdkit.bridges import BRIDGES
from kdkit.checkpoint import pointed
from kdkit.errors import KdkitError
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe


@pytest.mark.parametrize("name", ["conv1x1", "conv3x3", "linear"])
def test_bridge_maps_student_shape_to_teacher_shape(name: str) -> None:
    bridge = BRIDGES.get(name)((8, 7, 7), (32, 7, 7))
    assert bridge(torch.randn(2, 8, 7, 7)).shape == (2, 32, 7, 7)


def test_conv_bridge_refuses_different_spatial_size() -> None:
    with pytest.raises(KdkitError, match="keeps the spatial size"):
        BRIDGES.get("conv1x1")((8, 14, 14), (32, 7, 7))


def test_feature_term_with_bridge_trains_and_saves_the_bridge(tiny_kd: dict) -> None:
    tiny_kd["distill"].append({"loss": "mse", "student": "stage1", "teacher": "stage1", "bridge": "conv1x1",
                               "weight": 0.5})
    tiny_kd["train"]["epochs"] = 1
    recipe = recipe_from_dict(tiny_kd)
    summary = run_recipe(recipe)
    assert summary["bridge_params"] == 8 * 32 + 2 * 32  # 1x1 conv (no bias) + BN affine
    weights = load_file(str(pointed(recipe.run_dir / "checkpoints", "latest") / "model.safetensors"))
    assert any(k.startswith("bridges.mse.") for k in weights)
