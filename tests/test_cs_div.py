"""The multi-task dense losses: CS-divergence (intra + inter-task) and the per-task KL baseline, against float64
loops written here; properties (zero on identical outputs, precision, finite gradients); the channel split."""

from __future__ import annotations

import math

import pytest
import torch

from kdkit.errors import KdkitError
from kdkit.losses import LOSSES
from kdkit.losses.cs_div import cs_multitask_loss
from kdkit.losses.multitask_kd import multitask_kd_loss


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def cs(p: list[float], q: list[float]) -> float:
    """Cauchy-Schwarz divergence written out: -log(sum pq / sqrt(sum p^2 sum q^2))."""
    cross = sum(a * b for a, b in zip(p, q, strict=True))
    return -math.log(cross / math.sqrt(sum(a * a for a in p) * sum(b * b for b in q)))


def pixel_distributions(student: torch.Tensor, teacher: torch.Tensor,
                        t: float) -> list[tuple[list[float], list[float], float, float]]:
    """Per pixel of two ``(N, K + 2, H, W)`` outputs at temperature ``t``: the class softmaxes and the boundary
    sigmoids ``(q_s, q_t, b_s, b_t)``, computed one pixel at a time."""
    n, _, h, w = student.shape
    found = []
    for i in range(n):
        for y in range(h):
            for x in range(w):
                zs = [float(v) / t for v in student[i, :, y, x]]
                zt = [float(v) / t for v in teacher[i, :, y, x]]
                found.append((softmax(zs[:-1]), softmax(zt[:-1]), sigmoid(zs[-1]), sigmoid(zt[-1])))
    return found


def reference_cs(student: torch.Tensor, teacher: torch.Tensor, t: float, intra_w: float, inter_w: float) -> float:
    pixels = pixel_distributions(student, teacher, t)
    total = 0.0
    for qs, qt, bs, bt in pixels:
        intra = 0.5 * (cs(qs, qt) + cs([bs, 1 - bs], [bt, 1 - bt]))
        inter = cs([v / 2 for v in [*qs, bs, 1 - bs]], [v / 2 for v in [*qt, bt, 1 - bt]])
        total += intra_w * intra + inter_w * inter
    return total / len(pixels)


def reference_kd(student: torch.Tensor, teacher: torch.Tensor, t: float, ws: float, wb: float) -> float:
    pixels = pixel_distributions(student, teacher, t)
    total = 0.0
    for qs, qt, bs, bt in pixels:
        seg = sum(b * math.log(b / a) for a, b in zip(qs, qt, strict=True))
        bnd = bt * math.log(bt / bs) + (1 - bt) * math.log((1 - bt) / (1 - bs))
        total += ws * seg + wb * bnd
    return total / len(pixels) * t * t


def pair(seed: int = 0, shape: tuple[int, ...] = (2, 5, 3, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(*shape, generator=gen, dtype=torch.float64),
            2 * torch.randn(*shape, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize(("t", "intra_w", "inter_w"), [(1.0, 1.0, 1.0), (2.0, 0.5, 0.0), (0.5, 0.0, 2.0)])
def test_cs_multitask_matches_a_float64_loop(t: float, intra_w: float, inter_w: float) -> None:
    student, teacher = pair()
    got = cs_multitask_loss(student, teacher, t, intra_w, inter_w)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(reference_cs(student, teacher, t, intra_w, inter_w), rel=1e-10)


@pytest.mark.parametrize(("t", "ws", "wb"), [(1.0, 1.0, 1.0), (2.0, 0.5, 3.0)])
def test_multitask_kd_matches_a_float64_loop(t: float, ws: float, wb: float) -> None:
    student, teacher = pair(1)
    got = multitask_kd_loss(student, teacher, t, ws, wb)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(reference_kd(student, teacher, t, ws, wb), rel=1e-10)


def test_the_inter_task_term_is_not_the_sum_of_the_intra_terms() -> None:
    # the joint distribution's normaliser couples the tasks: inter differs from intra on generic outputs
    student, teacher = pair(2)
    intra = cs_multitask_loss(student, teacher, 1.0, 1.0, 0.0)
    inter = cs_multitask_loss(student, teacher, 1.0, 0.0, 1.0)
    assert abs(intra.item() - inter.item()) > 1e-3 and intra.item() > 0 and inter.item() > 0


@pytest.mark.parametrize("loss", [cs_multitask_loss, multitask_kd_loss])
def test_zero_with_finite_gradients_on_identical_and_extreme_outputs(loss) -> None:
    student, _ = pair(3)
    same = student.clone().requires_grad_(True)
    value = loss(same, student)
    value.backward()
    assert abs(value.item()) < 1e-12 and torch.isfinite(same.grad).all()
    extreme = (torch.randn(2, 5, 3, 3, generator=torch.Generator().manual_seed(4)) * 1e4).requires_grad_(True)
    value = loss(extreme, -extreme.detach())
    value.backward()
    assert math.isfinite(value.item()) and value.item() > 0 and torch.isfinite(extreme.grad).all()
    near = (student + 1e-9).float().requires_grad_(True)
    value = loss(near, student.float())
    value.backward()
    assert math.isfinite(value.item()) and torch.isfinite(near.grad).all()


@pytest.mark.parametrize("loss", [cs_multitask_loss, multitask_kd_loss])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precisions_upcast_to_float32(loss, dtype: torch.dtype) -> None:
    student, teacher = pair(5)
    got = loss(student.to(dtype), teacher.to(dtype))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(loss(student.to(dtype).double(), teacher.to(dtype).double()).item(), rel=1e-5)


@pytest.mark.parametrize("name", ["cs_multitask", "multitask_kd"])
def test_the_channel_split_is_checked(name: str) -> None:
    cls = LOSSES.get(name)
    assert cls().check_shapes((12, 8, 8), (12, 8, 8)) is None
    assert cls(seg_channels=11).check_shapes((12, 8, 8), (12, 8, 8)) is None
    wrong = cls(seg_channels=10).check_shapes((12, 8, 8), (12, 8, 8))
    assert isinstance(wrong, KdkitError) and "seg_channels" in str(wrong) and "11" in str(wrong)
    assert "(K + 2, H, W)" in cls().check_shapes((10,), (10,))
    assert "at least 3 channels" in cls().check_shapes((2, 8, 8), (2, 8, 8))
    with pytest.raises(ValueError, match="seg_channels 10"):
        cls(seg_channels=10)(*pair(6, (1, 12, 2, 2)), torch.zeros(1))
