"""RKD against loops over pairs and triplets, plus invariance tests."""

from __future__ import annotations

import math

import pytest
import torch

from kdkit.losses.rkd import RKDLoss, rkd_angle_loss, rkd_distance_loss, rkd_loss


def huber(x: float, y: float) -> float:
    d = abs(x - y)
    return 0.5 * d * d if d < 1 else d - 0.5


def rkd_reference(s: list[list[float]], t: list[list[float]]) -> tuple[float, float]:
    """(distance term, angle term), each the mean smooth-L1 over all B^2 pairs / B^3 triplets, with loops."""
    b = len(s)

    def dist(x: list[list[float]]) -> list[list[float]]:
        d = [[math.dist(x[i], x[j]) for j in range(b)] for i in range(b)]
        mu = sum(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        return [[v / mu for v in row] for row in d]

    def unit(x: list[list[float]], i: int, j: int) -> list[float]:
        v = [a - c for a, c in zip(x[i], x[j], strict=True)]
        n = math.sqrt(sum(a * a for a in v))
        return [a / n for a in v] if n > 0 else [0.0] * len(v)

    def cos(x: list[list[float]], i: int, j: int, k: int) -> float:  # angle at vertex j: <e_ij, e_kj>
        return sum(a * c for a, c in zip(unit(x, i, j), unit(x, k, j), strict=True))

    d_s, d_t = dist(s), dist(t)
    l_d = sum(huber(d_s[i][j], d_t[i][j]) for i in range(b) for j in range(b)) / b**2
    l_a = sum(huber(cos(s, i, j, k), cos(t, i, j, k)) for i in range(b) for j in range(b) for k in range(b)) / b**3
    return l_d, l_a


def test_rkd_matches_loops_with_different_widths() -> None:
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    t = torch.randn(5, 7, generator=gen, dtype=torch.float64) * 4
    l_d, l_a = rkd_reference(s.tolist(), t.tolist())
    assert rkd_distance_loss(s, t).item() == pytest.approx(l_d, rel=1e-9)
    assert rkd_angle_loss(s, t).item() == pytest.approx(l_a, rel=1e-9)
    assert rkd_loss(s, t).item() == pytest.approx(25 * l_d + 50 * l_a, rel=1e-9)
    assert rkd_loss(s, t, 2.0, 0.0).item() == pytest.approx(2 * l_d, rel=1e-9)


def test_large_distances_use_the_linear_part_of_smooth_l1() -> None:
    s = torch.tensor([[0.0], [1.0], [2.0], [100.0]], dtype=torch.float64)
    t = torch.tensor([[0.0], [50.0], [51.0], [52.0]], dtype=torch.float64)
    assert rkd_distance_loss(s, t).item() == pytest.approx(rkd_reference(s.tolist(), t.tolist())[0], rel=1e-9)


def test_invariant_to_rotation_translation_and_scale() -> None:
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 5, generator=gen), torch.randn(6, 4, generator=gen)
    rotation, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen))
    base = rkd_loss(s, t).item()
    assert rkd_loss(s @ rotation, t).item() == pytest.approx(base, rel=1e-4)
    assert rkd_loss(s + torch.randn(1, 5, generator=gen) * 10, t).item() == pytest.approx(base, rel=1e-4)
    assert rkd_distance_loss(s * 13.0, t * 0.1).item() == pytest.approx(rkd_distance_loss(s, t).item(), rel=1e-4)
    assert rkd_angle_loss(s * 13.0, t * 0.1).item() == pytest.approx(rkd_angle_loss(s, t).item(), rel=1e-4)


def test_zero_at_identity_and_batch_permutation() -> None:
    s, t = torch.randn(6, 5), torch.randn(6, 3)
    assert rkd_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert rkd_loss(s[perm], t[perm]).item() == pytest.approx(rkd_loss(s, t).item(), rel=1e-5)


def test_flattens_feature_maps() -> None:
    s, t = torch.randn(4, 2, 3, 3), torch.randn(4, 5)
    assert rkd_loss(s, t).item() == pytest.approx(rkd_loss(s.flatten(1), t).item(), rel=1e-6)


def test_finite_gradients_with_duplicates_and_tiny_batches() -> None:
    s = torch.randn(5, 4)
    s[1] = s[0]  # coincident embeddings: zero distance and undefined unit vectors
    s.requires_grad_(True)
    loss = rkd_loss(s, torch.randn(5, 8))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    one = torch.randn(1, 4, requires_grad=True)
    loss = rkd_loss(one, torch.randn(1, 8))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(one.grad).all()


def test_bfloat16() -> None:
    s, t = torch.randn(8, 16), torch.randn(8, 32)
    got = rkd_loss(s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.bfloat16
    assert got.float().item() == pytest.approx(rkd_loss(s, t).item(), rel=0.05)


def test_module_params_and_shapes() -> None:
    s, t = torch.randn(4, 3), torch.randn(4, 6)
    assert RKDLoss(distance_weight=1.0, angle_weight=2.0)(s, t, torch.zeros(4)).item() == pytest.approx(
        rkd_loss(s, t, 1.0, 2.0).item())
    with pytest.raises(ValueError, match=">= 0"):
        RKDLoss(angle_weight=-1.0)
    with pytest.raises(ValueError, match="both 0"):
        RKDLoss(distance_weight=0.0, angle_weight=0.0)
    assert RKDLoss().check_shapes((64,), (256, 2, 2)) is None
    assert RKDLoss.default_student_tap == RKDLoss.default_teacher_tap == "penultimate"
