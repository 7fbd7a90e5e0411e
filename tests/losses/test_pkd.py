"""PKD against a per-channel numpy computation and the Pearson identity, plus property tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdkit.losses.pkd import PKDLoss, pkd_loss, standardize_channels


def pkd_reference(f_s: np.ndarray, f_t: np.ndarray, eps: float = 1e-6) -> float:
    """Per channel: standardise over (N, H, W) with the unbiased std + eps; then sum of squares / numel / 2."""
    total = 0.0
    for c in range(f_s.shape[1]):
        xs, xt = f_s[:, c].ravel(), f_t[:, c].ravel()
        zs = [(v - xs.mean()) / (xs.std(ddof=1) + eps) for v in xs]
        zt = [(v - xt.mean()) / (xt.std(ddof=1) + eps) for v in xt]
        total += sum((a - b) ** 2 for a, b in zip(zs, zt, strict=True))
    return total / f_s.size / 2


def test_pkd_matches_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    f_s = torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64) * 3 + 1
    f_t = torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64) * 0.2 - 4
    assert pkd_loss(f_s, f_t).item() == pytest.approx(pkd_reference(f_s.numpy(), f_t.numpy()), rel=1e-9)


def test_pkd_is_one_minus_pearson() -> None:
    gen = torch.Generator().manual_seed(1)
    f_t = torch.randn(4, 3, 6, 6, generator=gen, dtype=torch.float64)
    f_s = 0.6 * f_t + torch.randn(4, 3, 6, 6, generator=gen, dtype=torch.float64)
    n = 4 * 6 * 6
    r = [np.corrcoef(f_s[:, c].ravel().numpy(), f_t[:, c].ravel().numpy())[0, 1] for c in range(3)]
    expected = (n - 1) / n * float(np.mean([1 - v for v in r]))
    assert pkd_loss(f_s, f_t).item() == pytest.approx(expected, rel=1e-5)


def test_invariant_to_per_channel_positive_affine_maps_of_either_input() -> None:
    gen = torch.Generator().manual_seed(2)
    f_s, f_t = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    scale = torch.tensor([0.01, 1.0, 7.0, 300.0]).view(1, 4, 1, 1)
    shift = torch.tensor([-5.0, 0.0, 2.0, 100.0]).view(1, 4, 1, 1)
    base = pkd_loss(f_s, f_t).item()
    assert pkd_loss(f_s * scale + shift, f_t).item() == pytest.approx(base, rel=1e-4)
    assert pkd_loss(f_s, f_t * scale.flip(1) - shift).item() == pytest.approx(base, rel=1e-4)


def test_zero_at_identity_and_finite_gradients() -> None:
    f = torch.randn(2, 3, 4, 4)
    assert pkd_loss(f, f.clone() * 2 + 1).item() == pytest.approx(0.0, abs=1e-10)
    f_s = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = pkd_loss(f_s, torch.randn(2, 3, 4, 4) * 1e3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(f_s.grad).all()
    dead = torch.zeros(2, 3, 4, 4, requires_grad=True)  # constant (e.g. dead ReLU) channels
    pkd_loss(dead, torch.randn(2, 3, 4, 4)).backward()
    assert torch.isfinite(dead.grad).all()


def test_standardize_channels_and_vectors() -> None:
    z = standardize_channels(torch.randn(5, 3, 2, 2) * 4 + 2)
    flat = z.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(flat.std(1), torch.ones(3), atol=1e-4)
    a, b = torch.randn(6, 4), torch.randn(6, 4)  # (B, C) vectors: channels over the batch
    assert pkd_loss(a, b).item() == pytest.approx(pkd_reference(a.double().numpy(), b.double().numpy()), rel=1e-5)


def test_bfloat16() -> None:
    f_s, f_t = torch.randn(4, 8, 6, 6), torch.randn(4, 8, 6, 6)
    got = pkd_loss(f_s.bfloat16(), f_t.bfloat16())
    assert got.dtype == torch.bfloat16
    assert got.float().item() == pytest.approx(pkd_loss(f_s, f_t).item(), rel=0.05)


def test_module_and_shapes() -> None:
    f_s, f_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert PKDLoss()(f_s, f_t, torch.zeros(2)).item() == pkd_loss(f_s, f_t).item()
    assert PKDLoss().check_shapes((3, 4, 4), (3, 4, 4)) is None
    assert PKDLoss().check_shapes((3, 4, 4), (5, 4, 4)) is not None
    with pytest.raises(ValueError, match="equal shapes"):
        pkd_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4))
    with pytest.raises(TypeError):
        PKDLoss(eps=1.0)  # type: ignore[call-arg]
