"""The objective: one place where weights apply; every component returned."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdkit.distill import Objective, Term
from kdkit.losses import KDLoss, kd_loss


def test_total_is_weighted_sum_and_components_are_unweighted() -> None:
    z_s, z_t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    objective = Objective([Term("kd", KDLoss(temperature=2.0), "logits", "logits", weight=0.9)], ce_weight=0.1)
    out = objective(z_s, y, {"kd": z_s}, {"logits": z_t})
    ce, kd = F.cross_entropy(z_s, y), kd_loss(z_s, z_t, 2.0)
    assert out["ce"].item() == pytest.approx(ce.item()) and out["kd"].item() == pytest.approx(kd.item())
    assert out["loss"].item() == pytest.approx(0.1 * ce.item() + 0.9 * kd.item(), rel=1e-6)


def test_float64_logits_give_a_float64_objective() -> None:
    # The cross-entropy and the sum stay in float64 (a float32 total would be off by ~1e-7 relative).
    gen = torch.Generator().manual_seed(0)
    z_s = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    z_t = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    objective = Objective([Term("kd", KDLoss(temperature=2.0), "logits", "logits", weight=0.9)], ce_weight=0.1)
    out = objective(z_s, y, {"kd": z_s}, {"logits": z_t})
    assert {k: v.dtype for k, v in out.items()} == {"ce": torch.float64, "kd": torch.float64, "loss": torch.float64}
    expected = 0.1 * F.cross_entropy(z_s, y) + 0.9 * kd_loss(z_s, z_t, 2.0)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-14, abs=0)


def test_warmup_ramps_the_weight_linearly() -> None:
    term = Term("kd", KDLoss(), "logits", "logits", weight=2.0, warmup_epochs=4)
    assert [term.scale(e) for e in (0, 1, 2, 4, 10)] == [0.0, 0.5, 1.0, 2.0, 2.0]


def test_plain_training_is_cross_entropy() -> None:
    z, y = torch.randn(3, 4), torch.tensor([0, 1, 3])
    out = Objective(ce_weight=1.0, label_smoothing=0.1)(z, y, {}, {})
    assert set(out) == {"ce", "loss"}
    assert out["loss"].item() == pytest.approx(F.cross_entropy(z, y, label_smoothing=0.1).item())
