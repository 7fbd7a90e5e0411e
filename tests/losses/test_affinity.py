"""Affinity mimicking against a row-by-row loop computation, plus its minimum and symmetry."""

from __future__ import annotations

import math

import pytest
import torch

from kdkit.losses.affinity import AffinityLoss, affinity_loss


def unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def affinities(a: torch.Tensor, b: torch.Tensor, scale: float) -> list[list[float]]:
    ua, ub = [unit(r) for r in a.tolist()], [unit(r) for r in b.tolist()]
    return [[scale * sum(x * y for x, y in zip(ra, rb, strict=True)) for rb in ub] for ra in ua]


def softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def soft_ce(logits: list[list[float]], target: list[list[float]]) -> float:
    total = 0.0
    for row, trow in zip(logits, target, strict=True):
        p_t, p_s = softmax(trow), softmax(row)
        total += -sum(pt * math.log(ps) for pt, ps in zip(p_t, p_s, strict=True))
    return total / len(logits)


def transpose(m: list[list[float]]) -> list[list[float]]:
    return [list(col) for col in zip(*m, strict=True)]


def reference(s_a, s_b, t_a, t_b, scale_s: float, scale_t: float) -> float:
    a_s, a_t = affinities(s_a, s_b, scale_s), affinities(t_a, t_b, scale_t)
    return 0.5 * (soft_ce(a_s, a_t) + soft_ce(transpose(a_s), transpose(a_t)))


def entropy_of_rows(m: list[list[float]]) -> float:
    return sum(-sum(p * math.log(p) for p in softmax(row) if p > 0) for row in m) / len(m)


def embeddings(b: int, d_s: int, d_t: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, d, generator=g, dtype=torch.float64) for d in (d_s, d_s, d_t, d_t))


@pytest.mark.parametrize(("scale_s", "scale_t"), [(1.0, 1.0), (10.0, 5.0), (100.0, 100.0)])
def test_affinity_matches_loop_reference(scale_s: float, scale_t: float) -> None:
    s_a, s_b, t_a, t_b = embeddings(5, 4, 7)
    got = affinity_loss(s_a, s_b, t_a, t_b, scale_s, scale_t).item()
    assert got == pytest.approx(reference(s_a, s_b, t_a, t_b, scale_s, scale_t), rel=1e-9)


def test_affinity_minimum_is_teacher_entropy_and_kl_part_is_zero() -> None:
    _, _, t_a, t_b = embeddings(6, 3, 3, seed=1)
    a_t = affinities(t_a, t_b, 5.0)
    entropy = 0.5 * (entropy_of_rows(a_t) + entropy_of_rows(transpose(a_t)))
    at_identity = affinity_loss(t_a, t_b, t_a, t_b, 5.0, 5.0).item()
    assert at_identity == pytest.approx(entropy, rel=1e-9)
    assert at_identity - entropy == pytest.approx(0.0, abs=1e-12)  # the KL part
    assert entropy > 0.1  # not zero: soft targets
    # Same affinities from other embeddings (an orthogonal map, 2x scale) also reach the minimum.
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    assert affinity_loss(2 * t_a @ q, t_b @ q, t_a, t_b, 5.0, 5.0).item() == pytest.approx(entropy, rel=1e-9)
    s_a, s_b, _, _ = embeddings(6, 3, 3, seed=3)
    assert affinity_loss(s_a, s_b, t_a, t_b, 5.0, 5.0).item() > entropy + 1e-3


def test_affinity_gradient_vanishes_at_identical_affinities() -> None:
    _, _, t_a, t_b = embeddings(6, 4, 4, seed=4)
    s_a, s_b = t_a.clone().requires_grad_(True), t_b.clone().requires_grad_(True)
    affinity_loss(s_a, s_b, t_a, t_b, 10.0, 10.0).backward()
    assert s_a.grad.abs().max().item() < 1e-10 and s_b.grad.abs().max().item() < 1e-10


def test_affinity_symmetric_in_swapping_the_pair() -> None:
    s_a, s_b, t_a, t_b = embeddings(5, 4, 6, seed=5)
    assert affinity_loss(s_b, s_a, t_b, t_a, 7.0, 3.0).item() == pytest.approx(
        affinity_loss(s_a, s_b, t_a, t_b, 7.0, 3.0).item(), rel=1e-12)


def test_affinity_finite_gradients_with_saturated_teacher() -> None:
    s_a, s_b, t_a, t_b = (x.float() for x in embeddings(8, 4, 4, seed=6))
    s_a.requires_grad_(True)
    scale_s = torch.tensor(10.0, requires_grad=True)  # a learnable student scale, as in TinyCLIP
    loss = affinity_loss(s_a, s_b, t_a, t_b, scale_s, 1e4)  # teacher softmax is one-hot
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s_a.grad).all() and torch.isfinite(scale_s.grad)


def test_affinity_bfloat16() -> None:
    s_a, s_b, t_a, t_b = (x.float() for x in embeddings(8, 4, 6, seed=7))
    got = affinity_loss(s_a.bfloat16(), s_b.bfloat16(), t_a.bfloat16(), t_b.bfloat16(), 10.0, 10.0)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got)
    assert got.float().item() == pytest.approx(affinity_loss(s_a, s_b, t_a, t_b, 10.0, 10.0).item(), rel=0.03)


def test_affinity_module_shapes_and_bad_params() -> None:
    s_a, s_b, t_a, t_b = embeddings(5, 4, 6, seed=8)
    student, teacher = torch.stack([s_a, s_b], dim=1), torch.stack([t_a, t_b], dim=1)
    labels = torch.zeros(5, dtype=torch.long)
    assert AffinityLoss(scale=20.0)(student, teacher, labels).item() == pytest.approx(
        affinity_loss(s_a, s_b, t_a, t_b, 20.0, 20.0).item())
    assert AffinityLoss(scale=20.0, teacher_scale=50.0)(student, teacher, labels).item() == pytest.approx(
        affinity_loss(s_a, s_b, t_a, t_b, 20.0, 50.0).item())
    module = AffinityLoss()
    assert module.check_shapes((2, 4), (2, 6)) is None
    assert "(2, D)" in (module.check_shapes((4,), (2, 6)) or "")
    assert "teacher" in (module.check_shapes((2, 4), (3, 6)) or "")
    for bad in ({"scale": 0.0}, {"teacher_scale": -1.0}):
        with pytest.raises(ValueError, match="scale"):
            AffinityLoss(**bad)  # type: ignore[arg-type]


def test_views_pairs_the_two_halves_of_a_two_view_batch() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(8, 5, 2, 2), torch.randn(8, 7)
    loss = AffinityLoss(pairs="views", scale=10.0)
    expected = affinity_loss(s[:4].flatten(1), s[4:].flatten(1), t[:4], t[4:], 10.0, 10.0)
    assert loss(s, t, torch.zeros(8)).item() == pytest.approx(expected.item())
    assert loss.check_shapes((5, 2, 2), (7,)) is None
    with pytest.raises(ValueError, match=r"data\.views: 2"):
        loss(s[:7], t[:7], torch.zeros(7))
