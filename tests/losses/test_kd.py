"""KD and MSE against independent computations of their formulas, plus property tests."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import standardize_reference
from kdkit.losses import KDLoss, MSELoss, kd_loss, mse_loss, standardize_logits


def kd_reference(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float) -> float:
    """T^2 * mean_b sum_k p_t log(p_t / p_s), written out with Python loops."""
    total = 0.0
    for b in range(z_s.shape[0]):
        exp_s = [math.exp(v / temperature) for v in z_s[b].tolist()]
        exp_t = [math.exp(v / temperature) for v in z_t[b].tolist()]
        p_s = [e / sum(exp_s) for e in exp_s]
        p_t = [e / sum(exp_t) for e in exp_t]
        total += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=True))
    return temperature**2 * total / z_s.shape[0]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_matches_formula(temperature: float) -> None:
    gen = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(5, 7, generator=gen, dtype=torch.float64), torch.randn(5, 7, generator=gen) * 3
    got = kd_loss(z_s.float(), z_t, temperature).item()
    assert got == pytest.approx(kd_reference(z_s, z_t.double(), temperature), rel=1e-5)


def nearly_equal(shape: tuple[int, ...], delta: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``(x, x + delta * noise)``: a student and a teacher that almost agree."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 3
    return x, x + delta * torch.randn(*shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("standardize", [False, True])
def test_kd_is_float64_exact_on_nearly_equal_logits(standardize: bool) -> None:
    # Teacher = student + 1e-3 noise: the KL is ~1e-7, so float32 rounding of the logits (~1e-7 each) would be
    # off by ~10 %; float64 (logits, standardisation and softmaxes) gets the independent formula to ~1e-9 (the
    # cancellation in sum p (log p - log q) of both computations).
    z_s, z_t = nearly_equal((5, 7), 1e-3)
    got = kd_loss(z_s, z_t, 2.0, standardize=standardize)
    assert got.dtype == torch.float64
    ref_s, ref_t = (standardize_reference(z_s), standardize_reference(z_t)) if standardize else (z_s, z_t)
    assert got.item() == pytest.approx(kd_reference(ref_s, ref_t, 2.0), rel=1e-7, abs=0)


def test_standardize_logits_keeps_float64() -> None:
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 5 + 100
    got = standardize_logits(z)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, standardize_reference(z), rtol=1e-13, atol=1e-13)


def test_mse_is_float64_exact_on_nearly_equal_inputs() -> None:
    # Differences of 1e-6: float32 inputs would carry errors of ~1e-7 in each, i.e. ~10 % of the loss.
    a, b = nearly_equal((2, 3, 4, 4), 1e-6)
    got = mse_loss(a, b)
    assert got.dtype == torch.float64
    expected = sum((x - y) ** 2 for x, y in zip(a.flatten().tolist(), b.flatten().tolist(), strict=True)) / a.numel()
    assert got.item() == pytest.approx(expected, rel=1e-10, abs=0)


def test_kd_zero_at_identity_and_positive_otherwise() -> None:
    z = torch.randn(4, 10)
    assert kd_loss(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(z, z.flip(1)).item() > 0


def test_kd_invariant_to_per_sample_logit_shift() -> None:
    z_s, z_t = torch.randn(3, 6), torch.randn(3, 6)
    shift = torch.randn(3, 1) * 5
    assert kd_loss(z_s + shift, z_t - shift).item() == pytest.approx(kd_loss(z_s, z_t).item(), rel=1e-5)


def test_kd_gradients_finite_even_when_teacher_saturates() -> None:
    z_s = torch.randn(4, 10, requires_grad=True)
    z_t = torch.zeros(4, 10)
    z_t[:, 0] = 1e4  # one-hot teacher: p_t has exact zeros
    loss = kd_loss(z_s, z_t, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z_s.grad).all()


def test_kd_bfloat16() -> None:
    z_s, z_t = torch.randn(4, 10), torch.randn(4, 10)
    got = kd_loss(z_s.bfloat16(), z_t.bfloat16())
    assert got.dtype == torch.bfloat16
    assert got.float().item() == pytest.approx(kd_loss(z_s, z_t).item(), rel=0.05)


def test_kd_module_and_bad_temperature() -> None:
    z_s, z_t = torch.randn(2, 3), torch.randn(2, 3)
    assert KDLoss(temperature=2.0)(z_s, z_t, torch.zeros(2)).item() == pytest.approx(kd_loss(z_s, z_t, 2.0).item())
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(temperature=0)


def test_mse_matches_formula() -> None:
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert mse_loss(a, b).item() == pytest.approx(((a - b) ** 2).sum().item() / a.numel(), rel=1e-6)
    assert MSELoss()(a, a, torch.zeros(2)).item() == 0.0
