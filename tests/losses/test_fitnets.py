"""FitNets hint loss against a per-element computation, plus property tests."""

from __future__ import annotations

import pytest
import torch

from conftest import nearly_equal_maps
from kdkit.losses.fitnets import FitNetsLoss, fitnets_loss
from kdkit.losses.kd import mse_loss


def test_fitnets_matches_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64), torch.randn(2, 3, 4, 5, generator=gen)
    total = sum((x - y) ** 2 for x, y in zip(a.flatten().tolist(), b.double().flatten().tolist(), strict=True))
    assert fitnets_loss(a, b).item() == pytest.approx(total / a.numel(), rel=1e-5)


def test_fitnets_is_float64_exact_on_nearly_equal_maps() -> None:
    # Maps 1e-6 apart: float32 rounding (~1e-7 per value) would be off by ~10 %; float64 to ~1e-12.
    a, b = nearly_equal_maps(2, 3, 4, 5)
    got = fitnets_loss(a, b)
    assert got.dtype == torch.float64
    total = sum((x - y) ** 2 for x, y in zip(a.flatten().tolist(), b.flatten().tolist(), strict=True))
    assert got.item() == pytest.approx(total / a.numel(), rel=1e-10, abs=0)


def test_fitnets_is_the_mse_loss() -> None:
    a, b = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert fitnets_loss(a, b).item() == mse_loss(a, b).item()


def test_zero_at_identity_and_finite_gradients() -> None:
    a = torch.randn(2, 3, 4, 4, requires_grad=True)
    assert fitnets_loss(a, a.detach().clone()).item() == 0.0
    loss = fitnets_loss(a, torch.randn(2, 3, 4, 4) * 100)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all()


def test_bfloat16() -> None:
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    got = fitnets_loss(a.bfloat16(), b.bfloat16())
    assert got.dtype == torch.bfloat16
    assert got.float().item() == pytest.approx(fitnets_loss(a, b).item(), rel=0.05)


def test_module_defaults_and_shape_check() -> None:
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    loss = FitNetsLoss()
    assert loss(a, b, torch.zeros(2)).item() == fitnets_loss(a, b).item()
    assert (FitNetsLoss.default_student_tap, FitNetsLoss.default_teacher_tap) == ("stage2", "stage2")
    assert loss.check_shapes((3, 4, 4), (3, 4, 4)) is None
    assert "convreg" in (loss.check_shapes((8, 8, 8), (16, 4, 4)) or "")
    with pytest.raises(TypeError):
        FitNetsLoss(temperature=4.0)  # type: ignore[call-arg]
