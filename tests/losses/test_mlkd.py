"""MLKD against a plain re-computation of the official code's composition, plus property tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdkit.losses.mlkd import MLKDLoss, mlkd_confidence_fractions, mlkd_loss
from kdkit.params import check_params

# The official forward_train (Jin-Ying/Multi-Level-Logit-Distillation, KD_ours.py), spelled out term by term:
# its temperature list is [cfg.KD.TEMPERATURE=4, 3, 5, 2, 6]; the strong-view instance terms at 2 and 6 read the
# weak logits.
OFFICIAL_STRONG_TERMS = [("s", 4.0), ("s", 3.0), ("s", 5.0), ("w", 2.0), ("w", 6.0)]


def _softmax(row: list[float], temperature: float) -> list[float]:
    top = max(row)
    exps = [math.exp((v - top) / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def _standardize(row: list[float]) -> list[float]:
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
    return [(v - mean) / (std + 1e-7) for v in row]


def _instance(zs: list[list[float]], zt: list[list[float]], temperature: float) -> float:
    total = 0.0
    for s_row, t_row in zip(zs, zt, strict=True):
        p_s, p_t = _softmax(s_row, temperature), _softmax(t_row, temperature)
        total += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=True) if pt > 0)
    return temperature**2 * total / len(zs)


def _class_relation(zs: list[list[float]], zt: list[list[float]], temperature: float) -> float:
    p_s = [_softmax(r, temperature) for r in zs]
    p_t = [_softmax(r, temperature) for r in zt]
    n, k = len(zs), len(zs[0])
    total = 0.0
    for a in range(k):
        for b in range(k):
            m_t = sum(p_t[i][a] * p_t[i][b] for i in range(n))
            m_s = sum(p_s[i][a] * p_s[i][b] for i in range(n))
            total += (m_t - m_s) ** 2
    return total / k


def _batch_relation(zs: list[list[float]], zt: list[list[float]], temperature: float) -> float:
    p_s = [_softmax(r, temperature) for r in zs]
    p_t = [_softmax(r, temperature) for r in zt]
    n, k = len(zs), len(zs[0])
    total = 0.0
    for i in range(n):
        for j in range(n):
            g_t = sum(p_t[i][c] * p_t[j][c] for c in range(k))
            g_s = sum(p_s[i][c] * p_s[j][c] for c in range(k))
            total += (g_t - g_s) ** 2
    return total / n


def _masks(zt_weak: list[list[float]], quantile: float) -> tuple[list[bool], list[bool]]:
    """The official masks: np.percentile of the teacher's weak-view confidences, kept where <= threshold."""
    probs = [_softmax(r, 1.0) for r in zt_weak]
    conf = [max(p) for p in probs]
    class_conf = [sum(p[c] for p in probs) for c in range(len(probs[0]))]
    thresh = np.percentile(np.array(conf), 100 * quantile)
    class_thresh = np.percentile(np.array(class_conf), 100 * quantile)
    return [c <= thresh for c in conf], [c <= class_thresh for c in class_conf]


def _mean_masked(value: float, mask: list[bool]) -> float:
    """What `(scalar * mask).mean()` computes."""
    return sum(value * m for m in mask) / len(mask)


def official_reference(z_s: torch.Tensor, z_t: torch.Tensor, strong_terms: list[tuple[str, float]],
                       standardize: bool = False, views: int = 2, quantile: float = 0.5) -> float:
    """loss_kd + loss_cc + loss_bc of the official forward_train (KD_WEIGHT divided out), one term at a time."""
    zs, zt = z_s.double().tolist(), z_t.double().tolist()
    half = len(zs) // 2 if views == 2 else len(zs)
    sw, ss = zs[:half], (zs[half:] if views == 2 else zs)
    tw, ts = zt[:half], (zt[half:] if views == 2 else zt)
    mask, class_mask = _masks(tw, quantile)
    inst = {"w": (sw, tw), "s": (ss, ts)}
    if standardize:
        inst = {v: ([_standardize(r) for r in a], [_standardize(r) for r in b]) for v, (a, b) in inst.items()}
    temps = [t for _, t in strong_terms]
    loss_kd_weak = sum(_mean_masked(_instance(*inst["w"], t), mask) for t in temps)
    loss_kd_strong = sum(_instance(*inst[v], t) for v, t in strong_terms)
    loss_cc_weak = sum(_mean_masked(_class_relation(sw, tw, t), class_mask) for t in temps)
    loss_bc_weak = sum(_mean_masked(_batch_relation(sw, tw, t), mask) for t in temps)
    return loss_kd_weak + loss_kd_strong + loss_cc_weak + loss_bc_weak


def paper_reference(z_s: torch.Tensor, z_t: torch.Tensor, temps: list[float], views: int = 2) -> float:
    zs, zt = z_s.double().tolist(), z_t.double().tolist()
    half = len(zs) // views
    total = 0.0
    for v in range(views):
        a, b = zs[v * half:(v + 1) * half], zt[v * half:(v + 1) * half]
        for t in temps:
            total += _instance(a, b, t) + _class_relation(a, b, t) + _batch_relation(a, b, t)
    return total


def _logits(rows: int, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, classes, generator=gen, dtype=torch.float64) * 2,
            torch.randn(rows, classes, generator=gen, dtype=torch.float64) * 3)


@pytest.mark.parametrize("half", [4, 3])
def test_official_matches_term_by_term_reference(half: int) -> None:
    z_s, z_t = _logits(2 * half)
    got = mlkd_loss(z_s, z_t).item()
    assert got == pytest.approx(official_reference(z_s, z_t, OFFICIAL_STRONG_TERMS), rel=1e-6)


def test_official_standardized_matches_reference() -> None:
    z_s, z_t = _logits(8, seed=1)
    got = mlkd_loss(z_s, z_t, standardize=True).item()
    assert got == pytest.approx(official_reference(z_s, z_t, OFFICIAL_STRONG_TERMS, standardize=True), rel=1e-6)


def test_official_logit_standardization_run_temperatures() -> None:
    # MLKD+LS: base temperature 2 replaces 4, so the code's list is [2, 3, 5, 2, 6]; the strong-view terms are
    # (s,2) (s,3) (s,5) (w,2) (w,6).
    z_s, z_t = _logits(8, seed=2)
    terms = [("s", 2.0), ("s", 3.0), ("s", 5.0), ("w", 2.0), ("w", 6.0)]
    got = mlkd_loss(z_s, z_t, temperatures=(2, 3, 5, 2, 6), standardize=True).item()
    assert got == pytest.approx(official_reference(z_s, z_t, terms, standardize=True), rel=1e-6)


def test_official_without_slip_and_other_quantile() -> None:
    z_s, z_t = _logits(10, seed=3)
    terms = [("s", t) for t in (2.0, 3.0, 4.0, 5.0, 6.0)]
    got = mlkd_loss(z_s, z_t, slip_temperatures=(), confidence_quantile=0.3).item()
    assert got == pytest.approx(official_reference(z_s, z_t, terms, quantile=0.3), rel=1e-6)


def test_official_single_view() -> None:
    z_s, z_t = _logits(5, seed=4)
    got = mlkd_loss(z_s, z_t, views=1).item()
    assert got == pytest.approx(official_reference(z_s, z_t, OFFICIAL_STRONG_TERMS, views=1), rel=1e-6)


@pytest.mark.parametrize("views", [1, 2])
def test_paper_variant_matches_reference(views: int) -> None:
    z_s, z_t = _logits(6, seed=5)
    got = mlkd_loss(z_s, z_t, views=views, variant="paper").item()
    assert got == pytest.approx(paper_reference(z_s, z_t, [2.0, 3.0, 4.0, 5.0, 6.0], views), rel=1e-6)


@pytest.mark.parametrize(("variant", "standardize"), [("official", False), ("official", True), ("paper", False)])
def test_float64_exact_on_nearly_equal_logits(variant: str, standardize: bool) -> None:
    # Teacher = student + 1e-3 noise: every term is ~1e-7, which float32 rounding of the logits (~1e-7 each)
    # would get wrong by ~10 %; float64 matches the term-by-term reference to ~1e-8.
    z_s, _ = _logits(8, seed=6)
    z_t = z_s + 1e-3 * torch.randn(z_s.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = mlkd_loss(z_s, z_t, variant=variant, standardize=standardize)
    assert got.dtype == torch.float64
    expected = official_reference(z_s, z_t, OFFICIAL_STRONG_TERMS, standardize=standardize) if variant == "official" \
        else paper_reference(z_s, z_t, [2.0, 3.0, 4.0, 5.0, 6.0])
    assert got.item() == pytest.approx(expected, rel=1e-7, abs=0)


def test_confidence_fractions() -> None:
    z_t = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    f_b, f_c = mlkd_confidence_fractions(z_t)
    assert f_b.item() == pytest.approx(0.5) and f_c.item() == pytest.approx(0.5)  # distinct values, even counts
    saturated = torch.zeros(4, 10)
    saturated[:, 0] = 1e4  # every confidence is 1: all tie with the median, all kept
    assert mlkd_confidence_fractions(saturated)[0].item() == 1.0


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("standardize", [False, True])
def test_zero_when_student_equals_teacher(variant: str, standardize: bool) -> None:
    z = torch.randn(8, 7)
    assert mlkd_loss(z, z.clone(), variant=variant, standardize=standardize).item() == pytest.approx(0.0, abs=1e-6)
    assert mlkd_loss(z, z.flip(1), variant=variant).item() > 0


def test_invariant_to_logit_shift_and_consistent_batch_permutation() -> None:
    z_s, z_t = torch.randn(8, 6), torch.randn(8, 6)
    ref = mlkd_loss(z_s, z_t).item()
    shift = torch.randn(8, 1) * 5
    assert mlkd_loss(z_s + shift, z_t - shift).item() == pytest.approx(ref, rel=1e-5)
    perm = torch.tensor([2, 0, 3, 1])
    both = torch.cat([perm, perm + 4])  # the same images reordered in both views
    assert mlkd_loss(z_s[both], z_t[both]).item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_gradients_finite_even_when_teacher_saturates(variant: str) -> None:
    z_s = (torch.randn(8, 10) * 30).requires_grad_()
    z_t = torch.zeros(8, 10)
    z_t[:, 0] = 1e4  # one-hot teacher: exact zeros in p_t at every temperature
    loss = mlkd_loss(z_s, z_t, variant=variant, standardize=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z_s.grad).all()
    assert z_s.grad.abs().sum() > 0


def test_bfloat16() -> None:
    z_s, z_t = torch.randn(8, 10), torch.randn(8, 10)
    got = mlkd_loss(z_s.bfloat16(), z_t.bfloat16())
    assert got.dtype == torch.bfloat16
    assert got.float().item() == pytest.approx(mlkd_loss(z_s, z_t).item(), rel=0.05)


def test_module_forward_and_params() -> None:
    z_s, z_t = torch.randn(8, 5), torch.randn(8, 5)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    module = MLKDLoss(temperatures=(2.0, 4.0), standardize=True)
    assert module(z_s, z_t, labels).item() == pytest.approx(
        mlkd_loss(z_s, z_t, temperatures=(2.0, 4.0), standardize=True).item())
    params = check_params(MLKDLoss, {"temperatures": [2, 3, 5, 2, 6], "variant": "paper"}, where="distill[0]",
                          what="loss 'mlkd'")
    assert params["temperatures"] == (2.0, 3.0, 5.0, 2.0, 6.0)


def test_views_validation() -> None:
    z_s, z_t = torch.randn(7, 5), torch.randn(7, 5)
    with pytest.raises(ValueError, match="views=2"):
        mlkd_loss(z_s, z_t)
    with pytest.raises(ValueError, match="views=2"):
        MLKDLoss()(z_s, z_t, torch.zeros(7, dtype=torch.long))
    assert torch.isfinite(MLKDLoss(views=1)(z_s, z_t, torch.zeros(7, dtype=torch.long)))
    with pytest.raises(ValueError, match="same images"):  # even batch, but not [weak; strong] of one set of images
        MLKDLoss()(torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="views"):
        mlkd_loss(torch.randn(4, 5), torch.randn(4, 5), views=3)


@pytest.mark.parametrize("bad", [{"views": 3}, {"temperatures": ()}, {"temperatures": (2.0, 0.0)},
                                 {"confidence_quantile": 1.5}, {"variant": "other"},
                                 {"standardize_relations": True}])
def test_bad_parameters(bad: dict) -> None:
    with pytest.raises(ValueError):
        MLKDLoss(**bad)
