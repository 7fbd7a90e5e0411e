"""ReviewKD's 'review' bridge (ABF fusion of all student stages): shapes, gradients, errors, and a recipe."""

from __future__ import annotations

import pytest
import torch

import kdkit.bridges.abf  # registers the "review" bridge (the lead imports it in bridges/__init__)
import kdkit.losses.reviewkd  # noqa: F401  # registers the "reviewkd" loss
from kdkit.bridges import FUSING_BRIDGES
from kdkit.bridges.abf import ABF, ReviewFusion, review_bridge
from kdkit.build import plan
from kdkit.errors import KdkitError, RecipeErrors
from kdkit.losses.reviewkd import hcl_loss
from kdkit.models import build_model
from kdkit.recipe import recipe_from_dict
from kdkit.taps import tap_shapes

STAGES = ["stage1", "stage2", "stage3"]
PREACT = ["stage1_preact", "stage2_preact", "stage3_preact"]


@pytest.fixture(scope="module")
def r8x4_to_r32x4() -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Per-sample student (resnet8x4) and teacher (resnet32x4) shapes of the stages at 32x32."""
    torch.manual_seed(0)
    student = build_model("resnet8x4", num_classes=100, in_channels=3, image_size=32)
    teacher = build_model("resnet32x4", num_classes=100, in_channels=3, image_size=32)
    s = tap_shapes(student, [*STAGES, "penultimate"], (3, 32, 32))
    t = tap_shapes(teacher, [*PREACT, "penultimate"], (3, 32, 32))
    return [s[k] for k in [*STAGES, "penultimate"]], [t[k] for k in [*PREACT, "penultimate"]]


def test_fuses_all_taps() -> None:
    assert "review" in FUSING_BRIDGES and "conv1x1" not in FUSING_BRIDGES  # one module for all the taps


def test_maps_student_stages_to_teacher_shapes(r8x4_to_r32x4) -> None:
    students, teachers = r8x4_to_r32x4
    students, teachers = students[:3], teachers[:3]
    bridge = review_bridge(students, teachers)
    assert isinstance(bridge, ReviewFusion)
    assert bridge.mid_channels == 256  # official: min(512, channels of the deepest student level)
    assert [abf.att_conv is None for abf in bridge.abfs] == [False, False, True]  # the deepest level does not fuse
    outs = bridge([torch.randn(2, *s) for s in students])
    assert [tuple(o.shape[1:]) for o in outs] == teachers
    assert review_bridge(students, teachers, mid_channels=64).mid_channels == 64


def test_pooled_penultimate_level_like_the_official_code(r8x4_to_r32x4) -> None:
    students, teachers = r8x4_to_r32x4  # ..., (256,) pooled level last
    bridge = review_bridge(students, teachers)
    outs = bridge([torch.randn(2, *s) for s in students])
    assert [tuple(o.shape[1:]) for o in outs] == teachers and outs[-1].dim() == 2


def test_shallow_outputs_review_deeper_stages() -> None:
    students, teachers = [(4, 8, 8), (6, 4, 4), (8, 2, 2)], [(5, 8, 8), (7, 4, 4), (9, 2, 2)]
    torch.manual_seed(0)
    bridge = review_bridge(students, teachers).eval()
    feats = [torch.randn(2, *s) for s in students]
    before = bridge(feats)
    changed = bridge([feats[0], feats[1], feats[2] + 1.0])
    assert not torch.allclose(before[0], changed[0])  # stage 1's output sees stage 3 (through stage 2)
    changed = bridge([feats[0] + 1.0, feats[1], feats[2]])
    assert torch.equal(before[2], changed[2])  # the deepest output does not see shallower stages


def test_abf_attention_fusion_formula() -> None:
    torch.manual_seed(0)
    abf = ABF(3, 4, 5, fuse=True).eval()
    x, residual = torch.randn(2, 3, 4, 4), torch.randn(2, 4, 2, 2)
    out, z = abf(x, residual)
    xm = abf.conv1(x)
    up = residual.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest 2x
    att = abf.att_conv(torch.cat([xm, up], 1))
    assert torch.allclose(z, xm * att[:, :1] + up * att[:, 1:], atol=1e-6)
    assert torch.allclose(out, abf.conv2(z), atol=1e-6) and out.shape == (2, 5, 4, 4)


def test_gradients_reach_every_abf_parameter(r8x4_to_r32x4) -> None:
    students, teachers = r8x4_to_r32x4
    students, teachers = [(s[0] // 8, *s[1:]) for s in students[:3]], [(t[0] // 8, *t[1:]) for t in teachers[:3]]
    torch.manual_seed(0)
    bridge = review_bridge(students, teachers)
    feats = [torch.randn(2, *s, requires_grad=True) for s in students]
    outs = bridge(feats)
    loss = sum(hcl_loss(o, torch.randn_like(o)) for o in outs)
    loss.backward()
    for name, param in bridge.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_errors_name_the_fix() -> None:
    with pytest.raises(KdkitError, match="resize"):
        review_bridge([(4, 8, 8), (6, 4, 4)], [(5, 16, 16), (7, 8, 8)])
    with pytest.raises(KdkitError, match="lists of taps"):
        review_bridge((4, 8, 8), (5, 8, 8))  # type: ignore[arg-type]
    with pytest.raises(KdkitError, match="mid_channels"):
        review_bridge([(4, 8, 8)], [(5, 8, 8)], mid_channels=0)
    with pytest.raises(KdkitError, match=r"\(C, H, W\)"):
        review_bridge([(4, 8)], [(5, 8)])
    # Official ShuffleNet-style setup: student stages half the teacher's size, resized (nearest).
    bridge = review_bridge([(4, 8, 8), (6, 4, 4)], [(5, 16, 16), (7, 8, 8)], resize=True)
    outs = bridge([torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)])
    assert [tuple(o.shape[1:]) for o in outs] == [(5, 16, 16), (7, 8, 8)]


@pytest.mark.slow
def test_recipe_end_to_end(tiny_kd: dict) -> None:
    tiny_kd["distill"] = [{"loss": "reviewkd", "student": ["stage1", "stage2"], "teacher": ["stage1", "stage2"],
                           "bridge": "review", "weight": 5, "warmup_epochs": 20}]
    built = plan(recipe_from_dict(tiny_kd), training=True)
    bridge = built.student.bridges["reviewkd"]
    assert isinstance(bridge, ReviewFusion) and len(bridge.abfs) == 2 and bridge.mid_channels == 16
    assert built.tap_shapes["reviewkd"] == ([(32, 4, 4), (64, 2, 2)], [(32, 4, 4), (64, 2, 2)])
    x, labels = torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    logits, per_term = built.student(x)
    teacher = built.teacher(x)
    out = built.objective(logits, labels, per_term, teacher, epoch=10.0)
    expected = sum(hcl_loss(s, teacher[k]) for s, k in zip(per_term["reviewkd"], ["stage1", "stage2"], strict=True))
    assert out["reviewkd"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.1 * out["ce"].item() + 5 * 0.5 * expected.item(), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None for p in bridge.parameters())


def test_recipe_size_mismatch_is_reported(tiny_kd: dict) -> None:
    tiny_kd["distill"] = [{"loss": "reviewkd", "student": ["stage1", "stage2"], "teacher": ["stage2", "stage1"],
                           "bridge": "review"}]
    with pytest.raises(RecipeErrors, match="resize"):
        plan(recipe_from_dict(tiny_kd), training=True)
    tiny_kd["distill"][0]["bridge_params"] = {"resize": True}
    built = plan(recipe_from_dict(tiny_kd), training=True)
    assert built.tap_shapes["reviewkd"][0] == [(64, 2, 2), (32, 4, 4)]
