"""BatchNorm folding of the frozen teacher: same outputs, same taps, pre-activation nets untouched."""

from __future__ import annotations

import pytest
import torch

from kdkit.distill import FrozenTeacher
from kdkit.fold import conv_bn_pairs, fold_batchnorm
from kdkit.models import build_model
from kdkit.taps import resolve_tap


def _trained_like(name: str, **dims: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, **dims)
    for m in model.modules():  # non-trivial running statistics and affine parameters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("name,dims", [("cnn_teacher", {"num_classes": 10, "in_channels": 1, "image_size": 28}),
                                       ("resnet8x4", {"num_classes": 100}), ("vgg8", {"num_classes": 100})])
def test_folding_keeps_outputs_and_taps(name: str, dims: dict) -> None:
    model = _trained_like(name, **dims)
    size = dims.get("image_size", 32)
    x = torch.randn(3, dims.get("in_channels", 3), size, size)
    taps = ["logits", "stage1", "penultimate"]
    reference = FrozenTeacher(_trained_like(name, **dims), taps)(x)
    bns_before = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    folded = FrozenTeacher(model, taps, fold_bn=True)
    assert folded.folded > 0 and folded.fold_skipped is None
    out = folded(x)
    for key in taps:
        assert torch.allclose(out[key], reference[key], atol=1e-4, rtol=1e-4), key
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.model.modules()) == bns_before - folded.folded


def test_pre_activation_bn_is_not_folded() -> None:
    model = _trained_like("wrn_16_1", num_classes=10)
    pairs = conv_bn_pairs(model)
    # WRN blocks are BN -> ReLU -> conv: the block BNs read the previous output, not a conv's
    assert all(not bn.endswith("bn1") or "layer" not in bn for _, bn in pairs)
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    fold_batchnorm(model)
    assert torch.allclose(model(x), before, atol=1e-4, rtol=1e-4)


def test_tapped_conv_output_is_not_folded() -> None:
    model = _trained_like("cnn_teacher", num_classes=10, in_channels=1, image_size=28)
    tap = resolve_tap(model, "stage1.0.0")  # the first conv's raw output
    count, _ = fold_batchnorm(model, [tap])
    assert count == 3 and isinstance(model.stage1[0][1], torch.nn.BatchNorm2d)


def test_folding_needs_eval_mode() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(build_model("cnn_student", num_classes=10).train())
