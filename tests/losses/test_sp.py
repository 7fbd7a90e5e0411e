"""Similarity-preserving KD against loops, plus permutation and scale properties."""

from __future__ import annotations

import math

import pytest
import torch

from kdkit.losses.sp import SPLoss, similarity_matrix, sp_loss


def sp_reference(f_s: list[list[float]], f_t: list[list[float]]) -> float:
    """sum_ij (G_t - G_s)^2 / B^2 with G = row-normalised Q Q^T, written with loops."""
    b = len(f_s)

    def gram(q: list[list[float]]) -> list[list[float]]:
        g = [[sum(x * y for x, y in zip(q[i], q[j], strict=True)) for j in range(b)] for i in range(b)]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in g]

    g_s, g_t = gram(f_s), gram(f_t)
    return sum((g_t[i][j] - g_s[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_sp_matches_loops_with_different_shapes() -> None:
    gen = torch.Generator().manual_seed(0)
    f_s = torch.randn(5, 2, 3, 3, generator=gen, dtype=torch.float64)
    f_t = torch.randn(5, 11, generator=gen, dtype=torch.float64)
    expected = sp_reference(f_s.flatten(1).tolist(), f_t.tolist())
    assert sp_loss(f_s, f_t).item() == pytest.approx(expected, rel=1e-9)


def test_batch_permutation_and_scale() -> None:
    gen = torch.Generator().manual_seed(1)
    f_s, f_t = torch.randn(6, 4, 2, 2, generator=gen), torch.randn(6, 9, generator=gen)
    base = sp_loss(f_s, f_t).item()
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert sp_loss(f_s[perm], f_t[perm]).item() == pytest.approx(base, rel=1e-5)
    assert sp_loss(f_s * 25.0, f_t * 0.03).item() == pytest.approx(base, rel=1e-5)
    assert sp_loss(f_s[perm], f_t).item() != pytest.approx(base, rel=1e-3)  # permuting one side only changes it


def test_zero_at_identity_rows_unit_norm_and_finite_gradients() -> None:
    f = torch.randn(4, 6)
    assert sp_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(similarity_matrix(f).norm(dim=1), torch.ones(4))
    f_s = torch.randn(4, 6, requires_grad=True)
    loss = sp_loss(f_s, torch.randn(4, 3) * 1e3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(f_s.grad).all()
    zero = torch.zeros(4, 6, requires_grad=True)  # an all-zero Gram row normalises to 0
    sp_loss(zero, torch.randn(4, 3)).backward()
    assert torch.isfinite(zero.grad).all()


def test_bfloat16() -> None:
    f_s, f_t = torch.randn(8, 16), torch.randn(8, 32)
    got = sp_loss(f_s.bfloat16(), f_t.bfloat16())
    assert got.dtype == torch.bfloat16
    assert got.float().item() == pytest.approx(sp_loss(f_s, f_t).item(), rel=0.05)


def test_module_and_shapes() -> None:
    f_s, f_t = torch.randn(4, 3, 2, 2), torch.randn(4, 6)
    assert SPLoss()(f_s, f_t, torch.zeros(4)).item() == sp_loss(f_s, f_t).item()
    assert SPLoss().check_shapes((3, 2, 2), (6,)) is None
    assert SPLoss.default_student_tap == SPLoss.default_teacher_tap == "penultimate"
    with pytest.raises(ValueError, match="same batch"):
        sp_loss(torch.randn(4, 3), torch.randn(5, 3))
