"""Building models by name: built-ins, timm, torchvision, import paths; errors for bad names/params."""

from __future__ import annotations

import pytest
import torch

from kdkit.errors import KdkitError
from kdkit.models import MODELS, build_model, count_parameters


def test_small_cnn_pair_sizes_match_the_measured_pair() -> None:
    teacher = build_model("cnn_teacher", num_classes=10, in_channels=1, image_size=28)
    student = build_model("cnn_student", num_classes=10, in_channels=1, image_size=28)
    assert count_parameters(teacher) == 96_554 and count_parameters(student) == 12_050
    assert student(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_timm_model_by_name() -> None:
    pytest.importorskip("timm")
    model = build_model("timm:resnet10t", num_classes=7, in_channels=1, image_size=32).eval()
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 7)
    with pytest.raises(KdkitError, match="unknown timm model 'resnet10x'"):
        build_model("timm:resnet10x", num_classes=7)


def test_torchvision_model_by_name() -> None:
    model = build_model("torchvision:resnet18", num_classes=5, in_channels=3).eval()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(KdkitError, match="valid choices: resnet18"):
        build_model("torchvision:resnet19", num_classes=5)
    with pytest.raises(KdkitError, match="expects 3-channel"):
        build_model("torchvision:resnet18", num_classes=5, in_channels=1)


def test_import_path_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDKIT_TRUST_CODE", "1")
    model = build_model("torch.nn:Flatten", num_classes=3)
    assert isinstance(model, torch.nn.Flatten)
    with pytest.raises(KdkitError, match="has no attribute 'Flaten'"):
        build_model("torch.nn:Flaten", num_classes=3)
    with pytest.raises(KdkitError, match="cannot import 'no_such_pkg'"):
        build_model("no_such_pkg:make", num_classes=3)


def test_bad_params_are_checked_against_the_signature() -> None:
    with pytest.raises(KdkitError, match="no parameter 'widht'; valid choices: width"):
        build_model("cnn_student", num_classes=10, params={"widht": 3})
    with pytest.raises(KdkitError, match="width"):
        build_model("cnn_student", num_classes=10, params={"width": "wide"})
    assert count_parameters(build_model("cnn_student", num_classes=10, in_channels=1, image_size=28,
                                        params={"width": 4})) < 12_050


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2"])
def test_cifar_zoo_builds_by_name_for_the_recipes_classes(name: str) -> None:
    model = build_model(name, num_classes=7, in_channels=3, image_size=32).eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    assert MODELS.describe(name)  # `kdkit ls models` has a line for it
