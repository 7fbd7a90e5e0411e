"""Taps: resolution with suggestions, hook capture equal to a manual forward, shape probing."""

from __future__ import annotations

import pytest
import torch

from kdkit.errors import KdkitError
from kdkit.models import build_model
from kdkit.taps import TapRecorder, probe_shapes, resolve_tap


@pytest.fixture
def cnn() -> torch.nn.Module:
    return build_model("cnn_student", num_classes=10, in_channels=1, image_size=28).eval()


def test_friendly_names_and_paths_resolve(cnn: torch.nn.Module) -> None:
    assert resolve_tap(cnn, "stage2").path == "stage2"
    penultimate = resolve_tap(cnn, "penultimate")
    assert (penultimate.path, penultimate.capture) == ("fc", "input")
    assert resolve_tap(cnn, "stage1.0.0").capture == "output"
    assert resolve_tap(cnn, "logits").capture == "logits"


def test_bad_path_suggests_closest(cnn: torch.nn.Module) -> None:
    with pytest.raises(KdkitError) as info:
        resolve_tap(cnn, "stage3", where="distill.0.student")
    text = str(info.value)
    assert "'stage3'" in text and "stage2" in text.split("valid choices:")[1][:40]


def test_recorder_captures_what_a_manual_forward_computes(cnn: torch.nn.Module) -> None:
    x = torch.randn(3, 1, 28, 28)
    taps = [resolve_tap(cnn, "stage1"), resolve_tap(cnn, "penultimate")]
    recorder = TapRecorder(cnn, taps)
    with torch.no_grad():
        s1 = cnn.stage1(x)  # the reference (these calls fire the stage1 hook too: clear it below)
        flat = cnn.stage2(s1).flatten(1)
        recorder.pop()
        cnn(x)
        got = recorder.pop()
    assert torch.equal(got["stage1"], s1) and torch.equal(got["penultimate"], flat)
    assert recorder.pop() == {}  # cleared after each read
    recorder.remove()
    with torch.no_grad():
        cnn(x)
    assert recorder.pop() == {}


def test_probe_shapes_restores_mode(cnn: torch.nn.Module) -> None:
    cnn.train()
    taps = [resolve_tap(cnn, s) for s in ("stage1", "stage2", "penultimate", "logits")]
    shapes = probe_shapes(cnn, taps, torch.zeros(2, 1, 28, 28))
    assert shapes == {"stage1": (8, 14, 14), "stage2": (16, 7, 7), "penultimate": (784,), "logits": (10,)}
    assert cnn.training
