"""Bridges are sized from the probed taps and let otherwise incomparable taps be distilled."""

from __future__ import annotations

import pytest
import torch
import yaml
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


def test_conv_bridge_refuses_different_spatial_size_naming_the_bridges_that_map_it() -> None:
    with pytest.raises(KdkitError, match="keeps the spatial size") as info:
        BRIDGES.get("conv1x1")((8, 14, 14), (32, 7, 7))
    assert info.value.choices == ["convreg", "linear"]  # smallest first: a strided conv, then a dense layer
    assert "use `bridge: convreg` (or linear)" in str(info.value.fix)
    assert BRIDGES.get("convreg")((8, 14, 14), (32, 7, 7))(torch.randn(2, 8, 14, 14)).shape == (2, 32, 7, 7)


def test_hints_follow_the_declared_shape_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """A newly registered bridge whose rule maps the shapes is suggested; no bridge name is written in the hints."""
    import kdkit.bridges as bridges

    monkeypatch.setattr(BRIDGES, "_entries", dict(BRIDGES._entries))
    monkeypatch.setattr(BRIDGES, "_help", dict(BRIDGES._help))
    monkeypatch.setattr(bridges, "SHAPE_RULES", dict(bridges.SHAPE_RULES))
    student, teacher = (8, 3, 3), (32, 7, 7)  # smaller, not half: only the dense layer maps it
    assert bridges.bridges_for(student, teacher) == ["linear"]

    def maps_upsampling(s: tuple[int, ...], t: tuple[int, ...]) -> str | None:
        """(C, H, W) maps onto larger ones."""
        return None if len(s) == len(t) == 3 and s[1] <= t[1] and s[2] <= t[2] else "it only enlarges maps"

    @bridges.register_bridge("upsample", maps=maps_upsampling)
    def upsample(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Upsample(size=tuple(teacher_shape[1:])),
                                   torch.nn.Conv2d(student_shape[0], teacher_shape[0], 1))

    assert bridges.bridges_for(student, teacher) == ["upsample", "linear"]
    assert bridges.bridge_hint(student, teacher).startswith("use `bridge: upsample` (or linear)")
    with pytest.raises(KdkitError, match="it only enlarges maps") as info:  # its factory refuses what it declares
        BRIDGES.get("upsample")(teacher, student)
    assert info.value.choices == bridges.bridges_for(teacher, student)
    assert "upsample" not in info.value.choices


@pytest.mark.slow
def test_feature_term_with_bridge_trains_and_saves_the_bridge(tiny_kd: dict) -> None:
    tiny_kd["distill"].append({"loss": "mse", "student": "stage1", "teacher": "stage1", "bridge": "conv1x1",
                               "weight": 0.5})
    tiny_kd["train"]["epochs"] = 1
    recipe = recipe_from_dict(tiny_kd)
    summary = run_recipe(recipe)
    assert summary["bridge_params"] == 8 * 32 + 2 * 32  # 1x1 conv (no bias) + BN affine
    resolved = yaml.safe_load((recipe.run_dir / "resolved_params.yaml").read_text())
    assert resolved == {"distill": [  # defaults written out (standardize), the recipe's values kept (temperature: 4)
        {"name": "kd", "loss": "kd", "params": {"temperature": 4.0, "standardize": False}},
        {"name": "mse", "loss": "mse", "params": {}, "bridge": "conv1x1", "bridge_params": {}}]}
    assert yaml.safe_load((recipe.run_dir / "recipe.yaml").read_text()) == recipe.to_dict()
    weights = load_file(str(pointed(recipe.run_dir / "checkpoints", "latest") / "model.safetensors"))
    assert any(k.startswith("bridges.mse.") for k in weights)
