"""CWD against a loop over images, channels and positions, and against mmrazor's formula, plus property tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdkit.losses.cwd import CWDLoss, cwd_loss


def cwd_reference(f_s: np.ndarray, f_t: np.ndarray, tau: float) -> float:
    """tau^2 / (N C) * sum over images and channels of KL(spatial softmax of the teacher || of the student)."""
    n, c = f_s.shape[:2]
    total = 0.0
    for i in range(n):
        for k in range(c):
            zs, zt = f_s[i, k].ravel() / tau, f_t[i, k].ravel() / tau
            ps = [math.exp(v - zs.max()) for v in zs]
            pt = [math.exp(v - zt.max()) for v in zt]
            ps = [v / sum(ps) for v in ps]
            pt = [v / sum(pt) for v in pt]
            total += sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True))
    return tau**2 * total / (n * c)


def mmrazor_formula(f_s: torch.Tensor, f_t: torch.Tensor, tau: float) -> torch.Tensor:
    """mmrazor's ChannelWiseDivergence.forward, transcribed (loss_weight 1)."""
    n, c, h, w = f_s.shape
    p_t = torch.softmax(f_t.reshape(-1, h * w) / tau, dim=1)
    log_t = torch.log_softmax(f_t.reshape(-1, h * w) / tau, dim=1)
    log_s = torch.log_softmax(f_s.reshape(-1, h * w) / tau, dim=1)
    return torch.sum(p_t * log_t - p_t * log_s) * tau**2 / (c * n)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_matches_the_formula_and_mmrazor(tau: float) -> None:
    gen = torch.Generator().manual_seed(0)
    f_s = torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64) * 2
    f_t = torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64) * 3 + 1
    got = cwd_loss(f_s, f_t, tau).item()
    assert got == pytest.approx(cwd_reference(f_s.numpy(), f_t.numpy(), tau), rel=1e-10)
    assert got == pytest.approx(mmrazor_formula(f_s, f_t, tau).item(), rel=1e-10)


def test_zero_at_identity_and_blind_to_per_channel_offsets() -> None:
    gen = torch.Generator().manual_seed(1)
    f = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    offsets = torch.randn(2, 3, 1, 1, generator=gen, dtype=torch.float64) * 10
    assert cwd_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert cwd_loss(f + offsets, f).item() == pytest.approx(0.0, abs=1e-12)  # a spatial softmax ignores them
    assert cwd_loss(f * 2, f).item() > 1e-3


def test_precision_gradients_and_shapes() -> None:
    f_s, f_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert cwd_loss(f_s.double(), f_t.double()).dtype == torch.float64
    half = cwd_loss(f_s.bfloat16(), f_t.bfloat16())
    assert half.dtype == torch.float32  # half precisions are upcast
    assert half.item() == pytest.approx(cwd_loss(f_s.bfloat16().float(), f_t.bfloat16().float()).item(), rel=1e-6)
    leaf = torch.randn(2, 3, 4, 4, requires_grad=True)
    cwd_loss(leaf, torch.randn(2, 3, 4, 4) * 1e3).backward()  # a saturated teacher
    assert torch.isfinite(leaf.grad).all()
    assert CWDLoss(tau=2.0)(f_s, f_t, torch.zeros(2)).item() == cwd_loss(f_s, f_t, 2.0).item()
    assert CWDLoss().check_shapes((3, 4, 4), (3, 4, 4)) is None
    assert "(C, H, W)" in CWDLoss().check_shapes((3,), (3,))
    assert "differs" in CWDLoss().check_shapes((3, 4, 4), (5, 4, 4))
    with pytest.raises(ValueError, match="one shape"):
        cwd_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4))
