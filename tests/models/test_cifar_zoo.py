"""The CIFAR KD model zoo: published parameter counts, logits shape, and feature taps that resolve."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kdkit.models.cifar  # noqa: F401  (registers the zoo)
from kdkit.models.registry import MODELS

# Parameter counts (millions) for 100 classes. The first group are the figures published with the
# CRD / RepDistiller and mdistiller tables; the second group has no figure there and is pinned to the count of
# the reference architecture, to catch accidental changes.
PARAMS_M = {
    "resnet20": 0.28,
    "resnet32": 0.47,
    "resnet56": 0.86,
    "resnet110": 1.73,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_1": 0.18,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "wrn_40_2": 2.26,
    "vgg8": 3.96,
    "vgg13": 9.46,
    "mobilenetv2": 0.81,
    "shufflenetv1": 0.95,
    "shufflenetv2": 1.36,
    # pinned, not published
    "resnet8": 0.0839,
    "resnet14": 0.181,
    "resnet44": 0.667,
    "vgg11": 9.28,
    "vgg16": 14.77,
    "vgg19": 20.09,
}
REQUIRED_TAPS = {"stage1", "stage2", "stage3", "penultimate"}


def _resolve(model: nn.Module, tap: str) -> tuple[nn.Module, bool]:
    path, _, which = tap.partition(":")
    assert which in ("", "input"), f"bad tap suffix in {tap!r}"
    modules = dict(model.named_modules())
    assert path in modules, f"tap path {path!r} is not a module"
    return modules[path], which == "input"


def _check(name: str, num_classes: int, in_channels: int, image_size: int) -> None:
    model = MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, image_size=image_size).eval()
    taps = model.feature_taps
    assert set(taps) >= REQUIRED_TAPS, f"{name} lacks taps {REQUIRED_TAPS - set(taps)}"

    captured: dict[str, torch.Tensor] = {}
    handles = []
    for tap, path in taps.items():
        module, want_input = _resolve(model, path)

        def hook(
            _m: nn.Module,
            args: tuple[torch.Tensor, ...],
            out: torch.Tensor,
            tap: str = tap,
            want_input: bool = want_input,
        ) -> None:
            captured[tap] = args[0] if want_input else out

        handles.append(module.register_forward_hook(hook))

    with torch.no_grad():
        logits = model(torch.randn(2, in_channels, image_size, image_size))
    for h in handles:
        h.remove()

    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (2, num_classes)
    assert set(captured) == set(taps), f"taps that never fired: {set(taps) - set(captured)}"
    head, _ = _resolve(model, taps["penultimate"])
    assert isinstance(head, nn.Linear)
    assert captured["penultimate"].shape == (2, head.in_features)
    for tap, feat in captured.items():
        if tap != "penultimate":
            assert feat.dim() == 4 and feat.shape[0] == 2, (tap, feat.shape)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PARAMS_M))
def test_zoo_model(name: str) -> None:
    """Each zoo model has its expected size, returns logits only, and has working feature taps."""
    model = MODELS.get(name)(num_classes=100)
    n = sum(p.numel() for p in model.parameters())
    expected = PARAMS_M[name] * 1e6
    assert abs(n - expected) <= 0.03 * expected, f"{name}: {n / 1e6:.3f}M params vs expected {PARAMS_M[name]}M"
    _check(name, num_classes=100, in_channels=3, image_size=32)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1"])
def test_grayscale_28px(name: str) -> None:
    """Models adapt to 1-channel 28x28 inputs (Fashion-MNIST-sized)."""
    _check(name, num_classes=10, in_channels=1, image_size=28)
