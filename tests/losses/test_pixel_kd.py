"""Pixel-wise KD against a loop over pixels and against the official cross-entropy form, plus property tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdkit.losses.pixel_kd import PixelKDLoss, pixel_kd_loss


def softmax(z: np.ndarray) -> list[float]:
    e = [math.exp(v - z.max()) for v in z]
    return [v / sum(e) for v in e]


def pixel_kd_reference(z_s: np.ndarray, z_t: np.ndarray, temperature: float) -> float:
    """T^2 * mean over images of the mean over pixels of KL(q_t || q_s), q = softmax over the classes."""
    n, _, h, w = z_s.shape
    total = 0.0
    for i in range(n):
        for y in range(h):
            for x in range(w):
                qs, qt = softmax(z_s[i, :, y, x] / temperature), softmax(z_t[i, :, y, x] / temperature)
                total += sum(b * math.log(b / a) for a, b in zip(qs, qt, strict=True)) / (h * w)
    return temperature**2 * total / n


def official_cross_entropy(z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """The official CriterionPixelWise.forward, transcribed: sum of -q_t log q_s over every pixel / (W H)."""
    _, c, w, h = z_s.shape
    p_t = torch.softmax(z_t.permute(0, 2, 3, 1).reshape(-1, c), dim=1)
    log_s = torch.log_softmax(z_s.permute(0, 2, 3, 1).reshape(-1, c), dim=1)
    return torch.sum(-p_t * log_s) / w / h


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_pixel_kd_matches_the_formula(temperature: float) -> None:
    gen = torch.Generator().manual_seed(0)
    z_s = torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64) * 2
    z_t = torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64) * 3
    got = pixel_kd_loss(z_s, z_t, temperature).item()
    assert got == pytest.approx(pixel_kd_reference(z_s.numpy(), z_t.numpy(), temperature), rel=1e-10)
    assert pixel_kd_loss(z_s, z_t, temperature, batch="sum").item() == pytest.approx(2 * got, rel=1e-12)


def test_the_official_sum_is_this_kl_plus_the_teachers_entropy() -> None:
    gen = torch.Generator().manual_seed(1)
    z_s = torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64)
    p_t = torch.softmax(z_t, 1)
    entropy = -(p_t * torch.log_softmax(z_t, 1)).sum() / 25
    ours, official = pixel_kd_loss(z_s, z_t, batch="sum"), official_cross_entropy(z_s, z_t)
    assert ours.item() == pytest.approx((official - entropy).item(), rel=1e-10)
    grad_ours, = torch.autograd.grad(ours, z_s)
    grad_official, = torch.autograd.grad(official, z_s)
    torch.testing.assert_close(grad_ours, grad_official)  # the same gradient for the student


def test_zero_at_identity_and_blind_to_per_pixel_offsets() -> None:
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    offsets = torch.randn(2, 1, 3, 3, generator=gen, dtype=torch.float64) * 10
    assert pixel_kd_loss(z, z.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert pixel_kd_loss(z + offsets, z).item() == pytest.approx(0.0, abs=1e-12)
    assert pixel_kd_loss(z * 3, z).item() > 1e-3


def test_precision_gradients_and_shapes() -> None:
    z_s, z_t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert pixel_kd_loss(z_s.double(), z_t.double()).dtype == torch.float64
    assert pixel_kd_loss(z_s.half(), z_t.half()).dtype == torch.float32
    leaf = torch.randn(2, 4, 3, 3, requires_grad=True)
    pixel_kd_loss(leaf, torch.randn(2, 4, 3, 3) * 1e3).backward()
    assert torch.isfinite(leaf.grad).all()
    assert PixelKDLoss(temperature=2.0)(z_s, z_t, torch.zeros(2)).item() == pixel_kd_loss(z_s, z_t, 2.0).item()
    assert "(K, H, W)" in PixelKDLoss().check_shapes((4,), (4,))
    with pytest.raises(ValueError, match="one shape"):
        pixel_kd_loss(torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3))
