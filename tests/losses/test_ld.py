"""LD (localization distillation) against a per-location, per-edge loop, and its properties."""

from __future__ import annotations

import math

import pytest
import torch

from kdkit.losses import LOSSES
from kdkit.losses.ld import ld_loss


def reference(student: torch.Tensor, teacher: torch.Tensor, bins: int, tau: float) -> float:
    """LD written out: per location, the teacher-score-weighted sum over edges of KL(p_T || p_S) * tau²."""
    k = student.shape[-1] - 4 * (bins + 1) - 1
    total, weights = 0.0, 0.0
    for b in range(student.shape[0]):
        for loc in range(student.shape[1]):
            w = max(1 / (1 + math.exp(-float(v))) for v in teacher[b, loc, :k])
            kl = 0.0
            for e in range(4):
                sl = slice(k + e * (bins + 1), k + (e + 1) * (bins + 1))
                p_t = torch.softmax(teacher[b, loc, sl] / tau, 0).tolist()
                p_s = torch.softmax(student[b, loc, sl] / tau, 0).tolist()
                kl += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=True))
            total += w * kl
            weights += w
    return tau**2 * total / weights


@pytest.mark.parametrize("tau", [1.0, 10.0])
def test_ld_matches_the_written_out_kl(tau: float) -> None:
    gen = torch.Generator().manual_seed(0)
    bins, k = 4, 3
    student = torch.randn(2, 5, k + 4 * (bins + 1) + 1, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(2, 5, k + 4 * (bins + 1) + 1, generator=gen, dtype=torch.float64) * 3
    value = ld_loss(student, teacher, bins, tau)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(reference(student, teacher, bins, tau), rel=1e-10)


def test_ld_is_zero_for_identical_boxes_whatever_the_classes_and_has_finite_grads() -> None:
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(3, 7, 3 + 20 + 1, generator=gen)
    student = teacher.clone()
    student[..., :3] += 5.0  # other class logits and centerness: LD compares the box distributions only
    student[..., -1] -= 2.0
    loss = LOSSES.get("ld")(bins=4)
    assert loss(student, teacher, torch.zeros(3)).abs().item() < 1e-6
    moved = student.clone().requires_grad_(True)
    value = loss(moved + torch.randn(moved.shape, generator=gen), teacher, torch.zeros(3))
    value.backward()
    assert value > 0 and torch.isfinite(moved.grad).all() and moved.grad[..., 3:23].abs().sum() > 0
    assert moved.grad[..., :3].abs().sum() == 0  # the teacher's scores weigh; the student's class logits get nothing


def test_ld_refuses_a_layout_without_room_for_the_bins() -> None:
    loss = LOSSES.get("ld")(bins=8)
    assert "box_bins to 8" in loss.check_shapes((189, 15), (189, 15))
    assert loss.check_shapes((189, 47), (189, 47)) is None
    assert "differs" in loss.check_shapes((189, 47), (100, 47))
