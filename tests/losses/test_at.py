"""Attention transfer against a per-element computation of the paper's maps, plus property tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdkit.losses.at import ATLoss, at_loss, attention_map


def at_reference(f_s: np.ndarray, f_t: np.ndarray, p: float) -> float:
    """mean_{b,hw} (a_s - a_t)^2 with a = Q / |Q|, Q[h, w] = sum_c |f[c, h, w]|^p, written with loops."""

    def att(f: np.ndarray) -> list[float]:
        c, h, w = f.shape
        q = [sum(abs(float(f[k, i, j])) ** p for k in range(c)) for i in range(h) for j in range(w)]
        norm = math.sqrt(sum(v * v for v in q))
        return [v / norm for v in q]

    total, count = 0.0, 0
    for b in range(f_s.shape[0]):
        for x, y in zip(att(f_s[b]), att(f_t[b]), strict=True):
            total += (x - y) ** 2
            count += 1
    return total / count


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_at_matches_formula_with_different_channels(p: float) -> None:
    gen = torch.Generator().manual_seed(0)
    f_s = torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64)
    f_t = torch.randn(3, 7, 5, 6, generator=gen, dtype=torch.float64)
    assert at_loss(f_s, f_t, p).item() == pytest.approx(at_reference(f_s.numpy(), f_t.numpy(), p), rel=1e-9)


def test_student_map_is_pooled_to_the_teacher_size() -> None:
    gen = torch.Generator().manual_seed(1)
    f_s = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    f_t = torch.randn(2, 5, 4, 4, generator=gen, dtype=torch.float64)
    q = (f_s**2).mean(1)
    pooled = q.reshape(2, 4, 2, 4, 2).mean(dim=(2, 4))  # 2x2 average pooling of the attention map
    a_s = pooled.flatten(1) / pooled.flatten(1).norm(dim=1, keepdim=True)
    q_t = (f_t**2).mean(1).flatten(1)
    a_t = q_t / q_t.norm(dim=1, keepdim=True)
    assert at_loss(f_s, f_t).item() == pytest.approx(((a_s - a_t) ** 2).mean().item(), rel=1e-9)
    # upsampling works too (student smaller than the teacher) and gives a finite value
    assert torch.isfinite(at_loss(f_t, f_s))


def test_resize_smaller_pools_the_larger_feature_map_as_repdistiller() -> None:
    gen = torch.Generator().manual_seed(2)
    f_s = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    f_t = torch.randn(2, 5, 4, 4, generator=gen, dtype=torch.float64)
    pooled = f_s.reshape(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))
    assert at_loss(f_s, f_t, resize="smaller").item() == pytest.approx(at_loss(pooled, f_t).item(), rel=1e-9)
    assert at_loss(f_t, f_s, resize="smaller").item() == pytest.approx(at_loss(f_t, pooled).item(), rel=1e-9)
    assert at_loss(f_s, f_t, resize="smaller").item() != pytest.approx(at_loss(f_s, f_t).item(), rel=1e-3)


def test_zero_at_identity_and_invariant_to_feature_scale() -> None:
    f_s, f_t = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5)
    assert at_loss(f_s, f_s.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert at_loss(f_s * 7.5, f_t * 0.01).item() == pytest.approx(at_loss(f_s, f_t).item(), rel=1e-4)
    # the channel mean cancels in the normalisation: repeating the channels changes nothing
    assert at_loss(f_s.repeat(1, 3, 1, 1), f_t).item() == pytest.approx(at_loss(f_s, f_t).item(), rel=1e-5)


def test_finite_gradients_even_with_zero_maps() -> None:
    f_s = torch.randn(2, 4, 5, 5, requires_grad=True)
    loss = at_loss(f_s, torch.zeros(2, 6, 5, 5))  # an all-zero teacher map normalises to 0
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(f_s.grad).all()
    dead = torch.zeros(2, 4, 5, 5, requires_grad=True)
    at_loss(dead, torch.randn(2, 4, 5, 5)).backward()
    assert torch.isfinite(dead.grad).all()


def test_attention_map_shape() -> None:
    assert attention_map(torch.randn(2, 3, 4, 5)).shape == (2, 4, 5)


def test_bfloat16() -> None:
    f_s, f_t = torch.randn(4, 8, 6, 6), torch.randn(4, 8, 6, 6)
    got = at_loss(f_s.bfloat16(), f_t.bfloat16())
    assert got.dtype == torch.bfloat16
    assert got.float().item() == pytest.approx(at_loss(f_s, f_t).item(), rel=0.05)


def test_module_params_and_shape_check() -> None:
    f_s, f_t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    assert ATLoss(p=3.0)(f_s, f_t, torch.zeros(2)).item() == at_loss(f_s, f_t, 3.0).item()
    assert ATLoss(resize="smaller").resize == "smaller"
    with pytest.raises(ValueError, match="p must be"):
        ATLoss(p=0)
    with pytest.raises(ValueError, match="resize"):
        ATLoss(resize="teacher")  # type: ignore[arg-type]
    loss = ATLoss()
    assert loss.check_shapes((3, 8, 8), (64, 4, 4)) is None
    assert "feature maps" in (loss.check_shapes((64,), (64, 4, 4)) or "")
    with pytest.raises(ValueError, match="feature maps"):
        at_loss(torch.randn(2, 3), torch.randn(2, 3))
