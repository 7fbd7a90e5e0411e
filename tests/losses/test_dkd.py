"""DKD against a per-sample loop of the paper's definitions, plus numerics and property tests."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import standardize_reference
from kdkit.losses.dkd import DKDLoss, dkd_loss
from kdkit.losses.standardize import standardize_logits


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def dkd_reference(z_s: torch.Tensor, z_t: torch.Tensor, labels: torch.Tensor,
                  temperature: float) -> tuple[float, float]:
    """(TCKD, NCKD), each times T^2 and averaged over the batch, from the paper's definitions, sample by sample."""
    tckd = nckd = 0.0
    batch = z_s.shape[0]
    for b in range(batch):
        gt = int(labels[b])
        s = [v / temperature for v in z_s[b].tolist()]
        t = [v / temperature for v in z_t[b].tolist()]
        p_s, p_t = _softmax(s), _softmax(t)
        tckd += _kl([p_t[gt], 1 - p_t[gt]], [p_s[gt], 1 - p_s[gt]])
        others = [k for k in range(len(s)) if k != gt]
        nckd += _kl(_softmax([t[k] for k in others]), _softmax([s[k] for k in others]))
    return temperature**2 * tckd / batch, temperature**2 * nckd / batch


def dkd_naive(z_s: torch.Tensor, z_t: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float,
              temperature: float) -> torch.Tensor:
    """The prob-then-log formulation of the reference code (megvii-research/mdistiller), rewritten here."""
    gt = F.one_hot(labels, z_s.shape[1]).to(z_s.dtype)
    p_s, p_t = F.softmax(z_s / temperature, dim=1), F.softmax(z_t / temperature, dim=1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * (1 - gt)).sum(1)], dim=1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * (1 - gt)).sum(1)], dim=1)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * temperature**2 / z_s.shape[0]
    q_t = F.softmax(z_t / temperature - 1000.0 * gt, dim=1)
    log_q_s = F.log_softmax(z_s / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="sum") * temperature**2 / z_s.shape[0]
    return alpha * tckd + beta * nckd


def _inputs(batch: int = 5, classes: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    z_s = torch.randn(batch, classes, generator=gen, dtype=torch.float64) * 2
    z_t = torch.randn(batch, classes, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, classes, (batch,), generator=gen)
    return z_s, z_t, labels


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 0.0), (0.0, 1.0), (1.0, 8.0), (0.5, 2.0)])
def test_dkd_matches_per_sample_definitions(temperature: float, alpha: float, beta: float) -> None:
    z_s, z_t, labels = _inputs()
    tckd, nckd = dkd_reference(z_s, z_t, labels, temperature)
    got = dkd_loss(z_s, z_t, labels, alpha, beta, temperature).item()
    assert got == pytest.approx(alpha * tckd + beta * nckd, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("standardize", [False, True])
def test_dkd_is_float64_exact_on_nearly_equal_logits(standardize: bool) -> None:
    # Teacher = student + 1e-3 noise: TCKD and NCKD are ~1e-7, which float32 rounding of the logits would get
    # wrong by ~10 %; float64 matches the per-sample definitions to ~1e-8 (cancellation in the KLs).
    z_s, _, labels = _inputs(seed=7)
    z_t = z_s + 1e-3 * torch.randn(z_s.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    got = dkd_loss(z_s, z_t, labels, 1.0, 8.0, 2.0, standardize=standardize)
    assert got.dtype == torch.float64
    ref_s, ref_t = (standardize_reference(z_s), standardize_reference(z_t)) if standardize else (z_s, z_t)
    tckd, nckd = dkd_reference(ref_s, ref_t, labels, 2.0)
    assert got.item() == pytest.approx(tckd + 8.0 * nckd, rel=1e-7, abs=0)


def test_dkd_equals_reference_code_on_moderate_logits() -> None:
    z_s, z_t, labels = _inputs(seed=1)
    want = dkd_naive(z_s, z_t, labels, 1.0, 8.0, 4.0).item()
    assert dkd_loss(z_s, z_t, labels, 1.0, 8.0, 4.0).item() == pytest.approx(want, rel=1e-6)


def test_dkd_finite_when_outputs_saturate_where_prob_then_log_is_not() -> None:
    labels = torch.tensor([0, 1, 2, 3])
    z_t = torch.full((4, 6), -1e4)
    z_t[torch.arange(4), labels] = 1e4  # teacher: p_gt == 1 exactly
    z_t[1] = 1e4
    z_t[1, 1] = -1e4  # ...and one sample where the teacher is sure the gt is wrong: p_gt == 0
    z_s = (-z_t).clone().requires_grad_(True)  # student saturated the other way round
    loss = dkd_loss(z_s, z_t, labels, 1.0, 8.0, 4.0)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(z_s.grad).all()

    z_naive = z_s.detach().clone().requires_grad_(True)
    naive = dkd_naive(z_naive, z_t, labels, 1.0, 8.0, 4.0)
    assert not torch.isfinite(naive)


def test_dkd_nckd_masks_the_gt_exactly_where_the_reference_shift_of_1000_does_not() -> None:
    labels = torch.tensor([0, 1, 2, 3])
    z_t = torch.full((4, 6), -1e4, dtype=torch.float64)
    z_t[torch.arange(4), labels] = 1e4  # gt logit 2e4/T above the others: a shift of 1000 leaves it on top
    z_s = torch.randn(4, 6, dtype=torch.float64)
    _, nckd = dkd_reference(z_s, z_t, labels, 4.0)
    assert dkd_loss(z_s, z_t, labels, 0.0, 1.0, 4.0).item() == pytest.approx(nckd, rel=1e-5)
    assert dkd_naive(z_s, z_t, labels, 0.0, 1.0, 4.0).item() > 100 * nckd


def test_dkd_gradients_finite_with_saturated_teacher() -> None:
    z_s = torch.randn(4, 10, requires_grad=True)
    z_t = torch.full((4, 10), -1e4)
    z_t[:, 0] = 1e4
    labels = torch.tensor([0, 0, 3, 9])
    loss = dkd_loss(z_s, z_t, labels, 1.0, 8.0, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z_s.grad).all()


def test_dkd_zero_at_identical_logits_and_with_zero_weights() -> None:
    z_s, z_t, labels = _inputs(seed=2)
    assert dkd_loss(z_s, z_s.clone(), labels).item() == pytest.approx(0.0, abs=1e-10)
    assert dkd_loss(z_s, z_t, labels, alpha=0.0, beta=0.0).item() == 0.0
    assert dkd_loss(z_s, z_t, labels).item() > 0


def test_dkd_invariant_to_per_sample_logit_shift() -> None:
    z_s, z_t, labels = _inputs(seed=3)
    shift = torch.randn(z_s.shape[0], 1, dtype=torch.float64) * 5
    assert dkd_loss(z_s + shift, z_t - shift, labels).item() == pytest.approx(dkd_loss(z_s, z_t, labels).item(),
                                                                              rel=1e-6)


def test_dkd_standardize_option() -> None:
    z_s, z_t, labels = _inputs(seed=4)
    z_s, z_t = z_s.float(), z_t.float() * 4 + 1
    got = dkd_loss(z_s, z_t, labels, standardize=True).item()
    pre = dkd_loss(standardize_logits(z_s), standardize_logits(z_t), labels).item()
    assert got == pytest.approx(pre, rel=1e-6)
    assert got != pytest.approx(dkd_loss(z_s, z_t, labels).item(), rel=1e-3)


def test_dkd_bfloat16() -> None:
    z_s, z_t, labels = _inputs(seed=5)
    z_s, z_t = z_s.float(), z_t.float()
    got = dkd_loss(z_s.bfloat16(), z_t.bfloat16(), labels)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got)
    assert got.float().item() == pytest.approx(dkd_loss(z_s, z_t, labels).item(), rel=0.05)


def test_dkd_module_matches_function_and_rejects_bad_values() -> None:
    z_s, z_t, labels = _inputs(seed=6)
    module = DKDLoss(alpha=0.5, beta=2.0, temperature=2.0)
    assert module(z_s, z_t, labels).item() == pytest.approx(dkd_loss(z_s, z_t, labels, 0.5, 2.0, 2.0).item())
    assert DKDLoss(standardize=True)(z_s, z_t, labels).item() == pytest.approx(
        dkd_loss(z_s, z_t, labels, standardize=True).item())
    with pytest.raises(ValueError, match="temperature"):
        DKDLoss(temperature=0)
    with pytest.raises(ValueError, match="beta"):
        DKDLoss(beta=-1)
    with pytest.raises(ValueError, match="class index"):
        module(z_s, z_t, torch.zeros(z_s.shape[0], z_s.shape[1]))
    with pytest.raises(ValueError, match="2 classes"):
        dkd_loss(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))
