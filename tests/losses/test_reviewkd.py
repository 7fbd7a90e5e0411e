"""ReviewKD's hierarchical context loss against a plain loop computation, plus property tests."""

from __future__ import annotations

import pytest
import torch

from conftest import nearly_equal_maps
from kdkit.losses.reviewkd import ReviewKDLoss, hcl_loss


def pool_reference(x: torch.Tensor, level: int) -> list[list[list[list[float]]]]:
    """Adaptive average pooling to level x level with explicit bin edges floor(i*H/l) .. ceil((i+1)*H/l)."""
    b_size, channels, height, width = x.shape
    out = []
    for b in range(b_size):
        per_c = []
        for c in range(channels):
            rows = []
            for i in range(level):
                r0, r1 = (i * height) // level, -((-(i + 1) * height) // level)
                row = []
                for j in range(level):
                    c0, c1 = (j * width) // level, -((-(j + 1) * width) // level)
                    cells = [x[b, c, r, s].item() for r in range(r0, r1) for s in range(c0, c1)]
                    row.append(sum(cells) / len(cells))
                rows.append(row)
            per_c.append(rows)
        out.append(per_c)
    return out


def mse_reference(a: list, b: list) -> float:
    flat_a = torch.tensor(a, dtype=torch.float64).flatten().tolist()
    flat_b = torch.tensor(b, dtype=torch.float64).flatten().tolist()
    return sum((p - q) ** 2 for p, q in zip(flat_a, flat_b, strict=True)) / len(flat_a)


def hcl_reference(fs: torch.Tensor, ft: torch.Tensor) -> float:
    """Full-size MSE (weight 1) + pooled MSEs at 4, 2, 1 (< H) with weights 1/2, 1/4, ... per level used."""
    height = fs.shape[2]
    total = mse_reference(fs.tolist(), ft.tolist())
    weights = [1.0]
    for level in (4, 2, 1):
        if level < height:
            weight = weights[-1] / 2
            weights.append(weight)
            total += weight * mse_reference(pool_reference(fs, level), pool_reference(ft, level))
    return total / sum(weights)


@pytest.mark.parametrize("size", [(8, 8), (6, 6), (4, 4), (2, 2), (1, 1), (5, 7)])
def test_hcl_matches_loop_reference(size: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    fs = torch.randn(2, 3, *size, generator=gen, dtype=torch.float64)
    ft = torch.randn(2, 3, *size, generator=gen, dtype=torch.float64) * 2 + 0.5
    assert hcl_loss(fs, ft).item() == pytest.approx(hcl_reference(fs, ft), rel=1e-12)


def test_hcl_is_float64_exact_on_nearly_equal_maps() -> None:
    # Maps 1e-6 apart: float32 rounding (~1e-7 per value) would be off by ~10 %; float64 to ~1e-10.
    fs, ft = nearly_equal_maps(2, 3, 8, 8)
    got = hcl_loss(fs, ft)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(hcl_reference(fs, ft), rel=1e-8, abs=0)


def test_hcl_weights_halve_per_level_used() -> None:
    # A constant difference d makes every level's MSE d^2, so the normalised sum is exactly d^2.
    fs = torch.zeros(1, 2, 8, 8)
    assert hcl_loss(fs + 3.0, fs).item() == pytest.approx(9.0)
    # A zero-mean pattern vanishes at every pooled level: only the full-size term (weight 1 of 15/8) remains.
    pattern = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(4, 4).expand(1, 2, 8, 8)
    assert hcl_loss(pattern, fs).item() == pytest.approx(1.0 / (1 + 1 / 2 + 1 / 4 + 1 / 8))
    # 4x4 maps use levels 2 and 1 only (weights 1/2, 1/4).
    assert hcl_loss(pattern[..., :4, :4], fs[..., :4, :4]).item() == pytest.approx(1.0 / (1 + 1 / 2 + 1 / 4))


def test_hcl_pooled_level_is_plain_mse() -> None:
    fs, ft = torch.randn(4, 5), torch.randn(4, 5)
    assert hcl_loss(fs, ft).item() == pytest.approx(((fs - ft) ** 2).mean().item(), rel=1e-6)


def test_hcl_zero_at_identity_and_positive_otherwise() -> None:
    f = torch.randn(3, 4, 8, 8)
    assert hcl_loss(f, f.clone()).item() == 0.0
    assert hcl_loss(f, f.flip(0)).item() > 0


def test_hcl_gradients_finite() -> None:
    fs = torch.randn(2, 4, 8, 8, requires_grad=True)
    loss = hcl_loss(fs, torch.randn(2, 4, 8, 8) * 100)
    loss.backward()
    assert torch.isfinite(loss) and fs.grad is not None and torch.isfinite(fs.grad).all()
    assert fs.grad.abs().sum() > 0


def test_hcl_bfloat16() -> None:
    fs, ft = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    got = hcl_loss(fs.bfloat16(), ft.bfloat16())
    assert got.dtype == torch.bfloat16 and torch.isfinite(got)
    assert got.float().item() == pytest.approx(hcl_loss(fs, ft).item(), rel=0.02)


def test_module_equals_function_and_sums_stages() -> None:
    loss = ReviewKDLoss()
    fs, ft = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    labels = torch.zeros(2, dtype=torch.long)
    assert loss(fs, ft, labels).item() == pytest.approx(hcl_loss(fs, ft).item())
    gs, gt = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4)
    summed = loss.compute([fs, gs], [ft, gt], labels)
    assert summed.item() == pytest.approx(hcl_loss(fs, ft).item() + hcl_loss(gs, gt).item(), rel=1e-6)
    with pytest.raises(TypeError):
        ReviewKDLoss(weight=5)  # type: ignore[call-arg]  # the weight belongs to the recipe term


def test_check_shapes() -> None:
    loss = ReviewKDLoss()
    assert loss.check_shapes((8, 4, 4), (8, 4, 4)) is None
    assert loss.check_shapes((8,), (8,)) is None
    assert loss.check_shapes((8, 4, 4), (16, 4, 4)) is not None
    assert "(C, H, W)" in (loss.check_shapes((8, 4), (8, 4)) or "")
    assert ReviewKDLoss.pairwise is True
