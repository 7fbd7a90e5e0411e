"""Segmentation networks by name: the built-in segnet pair and torchvision's segmenters (tiny inputs only)."""

from __future__ import annotations

import pytest
import torch

from kdkit.errors import KdkitError
from kdkit.models import MODELS, build_model, count_parameters
from kdkit.taps import tap_shapes

STAGES = ["stage1", "stage2", "stage3", "decoder2", "decoder1", "logits"]


def test_segnet_pair_outputs_per_pixel_logits_and_exposes_each_stage() -> None:
    teacher = build_model("segnet_teacher", num_classes=11, in_channels=1, image_size=48)
    student = build_model("segnet_student", num_classes=11, in_channels=1, image_size=48)
    assert count_parameters(teacher) == 343_851 and count_parameters(student) == 21_843
    assert MODELS.describe("segnet_teacher") and MODELS.describe("segnet_student")
    shapes = tap_shapes(student, STAGES, (1, 48, 48))
    assert shapes == {"stage1": (8, 48, 48), "stage2": (16, 24, 24), "stage3": (32, 12, 12),
                      "decoder2": (16, 24, 24), "decoder1": (8, 48, 48), "logits": (11, 48, 48)}
    assert tap_shapes(teacher, ["stage3"], (1, 48, 48)) == {"stage3": (128, 12, 12)}
    odd = build_model("segnet_student", num_classes=4, in_channels=3, params={"width": 4}).eval()
    assert odd(torch.zeros(2, 3, 30, 22)).shape == (2, 4, 30, 22)  # any size: upsampled to the skip's size


@pytest.mark.slow
def test_torchvision_lraspp_by_name_on_one_channel() -> None:
    model = build_model("torchvision:lraspp_mobilenet_v3_large", num_classes=4, in_channels=1).eval()
    stem = model.model.backbone["0"][0]
    assert isinstance(stem, torch.nn.Conv2d) and stem.in_channels == 1  # rebuilt for grey images
    shapes = tap_shapes(model, ["logits", "stage1", "stage2", "stage3", "stage4", "stage5"], (1, 32, 32))
    assert shapes["logits"] == (4, 32, 32)  # the dict's "out", at the input's resolution
    sides = [shapes[f"stage{i}"][1] for i in range(1, 6)]
    assert sides == [16, 8, 4, 2, 2]  # each stage's last block; LR-ASPP dilates the last stage (output stride 16)


@pytest.mark.slow
def test_torchvision_deeplab_taps_and_refused_params() -> None:
    model = build_model("torchvision:deeplabv3_mobilenet_v3_large", num_classes=3, in_channels=3).eval()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    assert set(model.feature_taps) == {f"stage{i}" for i in range(1, 6)}
    for bad in ("weights", "aux_loss", "weights_backbone"):
        with pytest.raises(KdkitError, match=f"parameter '{bad}' is set by kdkit"):
            build_model("torchvision:lraspp_mobilenet_v3_large", num_classes=3, params={bad: None})


@pytest.mark.slow
def test_torchvision_fcn_resnet_stages_are_the_resnet_layers() -> None:
    model = build_model("torchvision:fcn_resnet50", num_classes=2, in_channels=1).eval()
    assert model.feature_taps == {f"stage{i}": f"model.backbone.layer{i}" for i in range(1, 5)}
    shapes = tap_shapes(model, ["logits", "stage1", "stage4"], (1, 32, 32))
    assert shapes == {"logits": (2, 32, 32), "stage1": (256, 8, 8), "stage4": (2048, 4, 4)}  # dilated: stride 8
