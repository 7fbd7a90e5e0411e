"""DIST against numpy.corrcoef per row and per column, plus property tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdkit.losses.dist import DISTLoss, dist_loss
from kdkit.losses.standardize import standardize_logits


def _softmax_rows(z: np.ndarray) -> np.ndarray:
    out = np.empty_like(z)
    for i, row in enumerate(z):
        e = np.exp(row - row.max())
        out[i] = e / e.sum()
    return out


def dist_reference(z_s: torch.Tensor, z_t: torch.Tensor, beta: float, gamma: float, tau: float) -> float:
    """tau^2 (beta (1 - mean_i r(row i)) + gamma (1 - mean_j r(column j))), r from numpy.corrcoef."""
    y_s = _softmax_rows(z_s.double().numpy() / tau)
    y_t = _softmax_rows(z_t.double().numpy() / tau)
    rows = [np.corrcoef(y_s[i], y_t[i])[0, 1] for i in range(y_s.shape[0])]
    cols = [np.corrcoef(y_s[:, j], y_t[:, j])[0, 1] for j in range(y_s.shape[1])]
    return tau**2 * (beta * (1 - sum(rows) / len(rows)) + gamma * (1 - sum(cols) / len(cols)))


def _inputs(batch: int = 6, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, classes, generator=gen) * 2, torch.randn(batch, classes, generator=gen) * 3


@pytest.mark.parametrize(("beta", "gamma", "tau"), [(1.0, 1.0, 1.0), (2.0, 2.0, 4.0), (1.0, 0.0, 2.0), (0.0, 1.0, 1.0)])
def test_dist_matches_corrcoef(beta: float, gamma: float, tau: float) -> None:
    z_s, z_t = _inputs()
    got = dist_loss(z_s, z_t, beta, gamma, tau).item()
    assert got == pytest.approx(dist_reference(z_s, z_t, beta, gamma, tau), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("standardize", [False, True])
def test_dist_is_float64_exact_on_nearly_equal_logits(standardize: bool) -> None:
    # Teacher = student + 1e-3 noise: each 1 - Pearson is ~1e-7, which float32 softmaxes (~1e-7 rounding)
    # would get wrong by ~100 %; float64 matches numpy.corrcoef to ~1e-9 (eps=0: the paper's exact formula).
    gen = torch.Generator().manual_seed(2)
    z_s = torch.randn(6, 5, generator=gen, dtype=torch.float64) * 2
    z_t = z_s + 1e-3 * torch.randn(6, 5, generator=gen, dtype=torch.float64)
    got = dist_loss(z_s, z_t, 2.0, 2.0, 4.0, standardize=standardize, eps=0.0)
    assert got.dtype == torch.float64
    ref_s, ref_t = (standardize_logits(z_s), standardize_logits(z_t)) if standardize else (z_s, z_t)
    assert got.item() == pytest.approx(dist_reference(ref_s, ref_t, 2.0, 2.0, 4.0), rel=1e-7, abs=0)


def test_dist_zero_at_identical_logits_and_bounded() -> None:
    z_s, _ = _inputs(seed=1)
    assert dist_loss(z_s, z_s.clone()).item() == pytest.approx(0.0, abs=1e-5)
    worst = dist_loss(z_s, -z_s).item()
    assert 0 < worst <= 4.0 + 1e-6  # each term lies in [0, 2]


def test_dist_invariant_to_per_sample_logit_shift() -> None:
    z_s, z_t = _inputs(seed=2)
    shift = torch.randn(z_s.shape[0], 1) * 5
    want = dist_loss(z_s, z_t, 2.0, 2.0, 4.0).item()
    assert dist_loss(z_s + shift, z_t - shift, 2.0, 2.0, 4.0).item() == pytest.approx(want, rel=1e-5)


def test_dist_invariant_to_joint_permutation_of_samples_and_of_classes() -> None:
    z_s, z_t = _inputs(seed=3)
    want = dist_loss(z_s, z_t).item()
    rows, cols = torch.randperm(z_s.shape[0]), torch.randperm(z_s.shape[1])
    assert dist_loss(z_s[rows], z_t[rows]).item() == pytest.approx(want, rel=1e-5)
    assert dist_loss(z_s[:, cols], z_t[:, cols]).item() == pytest.approx(want, rel=1e-5)


def test_dist_intra_term_is_one_for_a_single_sample() -> None:
    z_s, z_t = _inputs(batch=1, seed=4)
    assert dist_loss(z_s, z_t, beta=0.0, gamma=1.0).item() == pytest.approx(1.0)


def test_dist_gradients_finite_with_saturated_teacher() -> None:
    z_s = torch.randn(4, 10, requires_grad=True)
    z_t = torch.full((4, 10), -1e4)
    z_t[:, 0] = 1e4
    loss = dist_loss(z_s, z_t, 2.0, 2.0, 4.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z_s.grad).all()


def test_dist_standardize_option() -> None:
    z_s, z_t = _inputs(seed=5)
    z_t = z_t * 4 + 1
    got = dist_loss(z_s, z_t, temperature=2.0, standardize=True).item()
    pre = dist_loss(standardize_logits(z_s), standardize_logits(z_t), temperature=2.0).item()
    assert got == pytest.approx(pre, rel=1e-6)
    assert got != pytest.approx(dist_loss(z_s, z_t, temperature=2.0).item(), rel=1e-3)


def test_dist_bfloat16() -> None:
    z_s, z_t = _inputs(seed=6)
    got = dist_loss(z_s.bfloat16(), z_t.bfloat16())
    assert got.dtype == torch.bfloat16 and torch.isfinite(got)
    assert got.float().item() == pytest.approx(dist_loss(z_s, z_t).item(), rel=0.05)


def test_dist_module_matches_function_and_rejects_bad_values() -> None:
    z_s, z_t = _inputs(seed=7)
    labels = torch.zeros(z_s.shape[0], dtype=torch.long)
    module = DISTLoss(beta=2.0, gamma=2.0, temperature=4.0)
    assert module(z_s, z_t, labels).item() == pytest.approx(dist_loss(z_s, z_t, 2.0, 2.0, 4.0).item())
    assert DISTLoss()(z_s, z_t, labels).item() == pytest.approx(dist_loss(z_s, z_t).item())
    with pytest.raises(ValueError, match="temperature"):
        DISTLoss(temperature=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        DISTLoss(gamma=-0.5)
    with pytest.raises(ValueError, match="one shape"):
        dist_loss(z_s, z_t[:, :3])
