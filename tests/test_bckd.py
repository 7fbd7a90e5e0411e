"""BCKD (binary-classification and IoU localization distillation of dense detectors): each term against plain loops
over locations and classes (boxes decoded in pixels around each location's point), its gradients, properties, the
refusals, and a tiny detection run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import shipped_on_tiny_scenes, tiny_det, write_recipe
from kdkit.cli import main
from kdkit.errors import KdkitError
from kdkit.losses import LOSSES

K = 3  # classes in the hand-made outputs


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def distances(box: list[float], bins: int, coding: str) -> list[float]:
    """Edge distances in strides of one location: the distribution's expectation, exp(raw) or raw."""
    if not bins:
        return [math.exp(min(v, 8.0)) for v in box] if coding == "exp" else list(box)
    out = []
    for e in range(4):
        logits = box[e * (bins + 1):(e + 1) * (bins + 1)]
        z = sum(math.exp(v) for v in logits)
        out.append(sum(i * math.exp(v) / z for i, v in enumerate(logits)))
    return out


def pixel_box(point: tuple[float, float], stride: float, d: list[float]) -> tuple[float, float, float, float]:
    """The box ``x - l s, y - t s, x + r s, y + b s`` the detection task decodes."""
    x, y = point
    return x - d[0] * stride, y - d[1] * stride, x + d[2] * stride, y + d[3] * stride


def box_iou(a: tuple[float, ...], b: tuple[float, ...], kind: str) -> float:
    """(G)IoU of two pixel boxes, with torchvision's 1e-7 in the denominators."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    iou = inter / (union + 1e-7)
    if kind == "iou":
        return iou
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return iou - (hull - union) / (hull + 1e-7)


def loop_bckd(student: torch.Tensor, teacher: torch.Tensor, boxes: int, *, bins: int, coding: str, beta: float,
              cls_weight: float, loc_weight: float, kind: str) -> float:
    """BCKD with Python floats: per location the classes' gap-weighted BCE, and the largest gap times 1 - (G)IoU of
    the pixel boxes decoded around an arbitrary point and stride (the IoU must not depend on them)."""
    box_channels = 4 * (bins + 1) if bins else 4
    cls = loc = 0.0
    for b, (rows_s, rows_t) in enumerate(zip(student.tolist(), teacher.tolist(), strict=True)):
        for loc_index, (s, t) in enumerate(zip(rows_s, rows_t, strict=True)):
            gaps = []
            for k in range(K):
                p_s, p_t = sigmoid(s[k]), sigmoid(t[k])
                bce = -(p_t * math.log(p_s) + (1 - p_t) * math.log(1 - p_s))
                cls += abs(p_t - p_s) ** beta * bce
                gaps.append(abs(p_t - p_s))
            point, stride = (3.5 + 7 * loc_index, 11.0 + b), 2.0 ** (1 + loc_index % 3)
            box_s = pixel_box(point, stride, distances(s[K:K + box_channels], bins, coding))
            box_t = pixel_box(point, stride, distances(t[K:K + box_channels], bins, coding))
            loc += max(gaps) * (1.0 - box_iou(box_s, box_t, kind))
    return (cls_weight * cls + loc_weight * loc) / boxes


def outputs(bins: int, coding: str = "exp", locations: int = 4, scale: float = 2.0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(bins)
    channels = K + (4 * (bins + 1) if bins else 4) + 1
    student = torch.randn(2, locations, channels, generator=gen, dtype=torch.float64) * scale
    teacher = torch.randn(2, locations, channels, generator=gen, dtype=torch.float64) * scale
    if coding == "linear":  # torchvision's head ReLUs its regressions
        student[..., K:K + 4], teacher[..., K:K + 4] = student[..., K:K + 4].abs(), teacher[..., K:K + 4].abs()
    return student, teacher


def targets(boxes: int, padding: int = 1) -> torch.Tensor:
    rows = torch.zeros(2, boxes + padding, 5, dtype=torch.float64)
    rows[..., 4] = -1.0
    flat = rows.view(-1, 5)
    flat[:boxes, :4] = torch.tensor([0.1, 0.2, 0.5, 0.6], dtype=torch.float64)
    flat[:boxes, 4] = 1.0
    return rows


@pytest.mark.parametrize(("bins", "coding", "kind", "beta"), [
    (8, "exp", "iou", 1.0), (8, "exp", "giou", 1.0), (4, "exp", "iou", 2.0), (0, "exp", "iou", 1.0),
    (0, "linear", "giou", 0.5),
])
def test_bckd_equals_plain_loops_over_locations_and_classes(bins: int, coding: str, kind: str, beta: float) -> None:
    student, teacher = outputs(bins, coding)
    loss = LOSSES.get("bckd")(bins=bins, box_coding=coding, iou=kind, beta=beta, cls_weight=0.7, loc_weight=4.0)
    value = loss(student, teacher, targets(3))
    expected = loop_bckd(student, teacher, 3, bins=bins, coding=coding, beta=beta, cls_weight=0.7, loc_weight=4.0,
                         kind=kind)
    # 1e-7: the IoUs' 1e-7 guard sits on areas in strides^2 in the loss and in pixels^2 in the loops
    assert value.dtype == torch.float64 and value.item() == pytest.approx(expected, rel=1e-7)


def test_each_term_alone_is_its_loop() -> None:
    student, teacher = outputs(8)
    only_cls = LOSSES.get("bckd")(loc_weight=0.0)(student, teacher, targets(2)).item()
    only_loc = LOSSES.get("bckd")(cls_weight=0.0, loc_weight=1.0)(student, teacher, targets(2)).item()
    common = {"bins": 8, "coding": "exp", "beta": 1.0, "kind": "iou"}
    assert only_cls == pytest.approx(loop_bckd(student, teacher, 2, cls_weight=1, loc_weight=0, **common), rel=1e-10)
    assert only_loc == pytest.approx(loop_bckd(student, teacher, 2, cls_weight=0, loc_weight=1, **common), rel=1e-7)
    assert only_cls > 0 and only_loc > 0


def test_gradients_follow_the_official_detachment() -> None:
    """The classification factor |p_t - p_s|^beta is differentiated (the official novel_kd_loss uses the live
    score); the localization weight max_k |p_t - p_s| is not (the official head detaches the scores); the
    teacher gets nothing."""
    student, teacher = outputs(8)
    student.requires_grad_()
    teacher.requires_grad_()
    LOSSES.get("bckd")(loc_weight=0.0)(student, teacher, targets(2)).backward()
    p_t = torch.sigmoid(teacher[..., :K].detach())
    logit = student[..., :K].detach().clone().requires_grad_()
    p_s = torch.sigmoid(logit)
    bce = -(p_t * torch.log(p_s) + (1 - p_t) * torch.log(1 - p_s))
    ((p_t - p_s).abs() * bce).sum().div(2).backward()
    torch.testing.assert_close(student.grad[..., :K], logit.grad, rtol=1e-10, atol=1e-12)
    assert teacher.grad is None
    # the box term moves the student's boxes only: its class logits get nothing from it
    student.grad = None
    LOSSES.get("bckd")(cls_weight=0.0)(student, teacher, targets(2)).backward()
    assert student.grad[..., :K].abs().max() == 0 and student.grad[..., K:K + 36].abs().max() > 0
    assert teacher.grad is None


def test_bckd_is_zero_when_the_student_is_the_teacher_and_divides_by_the_gt_boxes() -> None:
    student, teacher = outputs(8)
    loss = LOSSES.get("bckd")()
    assert loss(teacher.clone(), teacher, targets(2)).item() == pytest.approx(0.0, abs=1e-12)
    one, three = loss(student, teacher, targets(1, padding=3)), loss(student, teacher, targets(3, padding=0))
    assert one.item() == pytest.approx(3 * three.item(), rel=1e-12)  # padding rows are not boxes
    none = loss(student, teacher, targets(0))  # no box in the batch: divided by 1, not by 0
    assert torch.isfinite(none) and none.item() == pytest.approx(one.item(), rel=1e-12)


def test_gradients_are_finite_on_extreme_logits_and_half_is_upcast() -> None:
    student, teacher = outputs(8, scale=60.0)
    student = student.float().requires_grad_()
    value = LOSSES.get("bckd")(iou="giou")(student, teacher.float(), targets(2).float())
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.grad).all()
    direct, teacher_direct = outputs(0, scale=60.0)  # exp coding past e^8 is clamped
    assert torch.isfinite(LOSSES.get("bckd")(bins=0)(direct, teacher_direct, targets(2)))
    half = LOSSES.get("bckd")()(student.detach().bfloat16(), teacher.bfloat16(), targets(2).bfloat16())
    assert half.dtype == torch.float32 and torch.isfinite(half)


def test_bckd_refuses_what_is_not_two_dense_detector_outputs_of_one_layout() -> None:
    loss = LOSSES.get("bckd")(bins=8)
    assert loss.check_shapes((189, 47), (189, 47)) is None
    assert "dense detector output" in loss.check_shapes((10,), (10,))  # classification logits
    assert "dense detector output" in loss.check_shapes((11, 48, 48), (11, 48, 48))  # segmentation maps
    assert "dense detector output" in loss.check_shapes((189, 15), (189, 15))  # a box_bins 0 detector, bins 8
    assert "differs from the teacher's" in loss.check_shapes((189, 47), (189, 57))
    with pytest.raises(KdkitError, match="detection task's targets"):
        loss(*outputs(8), torch.zeros(2, dtype=torch.long))


# -- recipes ----------------------------------------------------------------------------------------------------------

def test_bckd_on_a_segmentation_recipe_exits_2_before_training(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    recipe = shipped_on_tiny_scenes("scenes_seg/pixel_kd", tmp_path)
    recipe["distill"] = [{"loss": "bckd", "weight": 1.0}]
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    err = capsys.readouterr().err  # the plan's check of what a loss reads from the task's logits
    assert "loss 'bckd' reads dense per-location detector outputs" in err and "task 'segmentation'" in err
    assert "valid choices:" in err and "pixel_kd" in err.split("valid choices:")[1]
    assert not (tmp_path / "run").exists()


def test_bckd_on_a_classification_recipe_exits_2_before_training(tiny: dict, teacher_file: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    tiny["teacher"] = {"arch": "cnn_teacher", "checkpoint": str(teacher_file)}
    tiny["distill"] = [{"loss": "bckd", "weight": 1.0}]
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", tiny))]) == 2
    err = capsys.readouterr().err
    assert "loss 'bckd' reads dense per-location detector outputs" in err and "task 'classification'" in err
    assert not Path(tiny["output"]["dir"]).exists()


@pytest.mark.slow
def test_the_shipped_bckd_recipe_runs_end_to_end(tmp_path: Path) -> None:
    from kdkit.recipe import recipe_from_dict
    from kdkit.runner import run_recipe

    recipe = tiny_det(tmp_path, "scenes_det/bckd")
    summary = run_recipe(recipe_from_dict(recipe))
    assert summary["task"] == "detection"
    row = json.loads((tmp_path / "run" / "metrics.json").read_text())[-1]
    assert math.isfinite(row["train_bckd"]) and row["train_bckd"] > 0 and math.isfinite(row["test_map"])
