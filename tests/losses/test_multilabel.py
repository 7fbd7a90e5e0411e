"""Multi-label KD (MLD) and label-wise embedding relations against plain-loop computations, plus properties."""

from __future__ import annotations

import math

import pytest
import torch

from kdkit.losses.multilabel import LabelRelationLoss, MultiLabelKDLoss, label_relation_loss, mld_loss


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def mld_reference(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float) -> float:
    """T^2 / B * sum_{b,k} [p log(p/q) + (1-p) log((1-p)/(1-q))], p = sigma(z_t/T), q = sigma(z_s/T)."""
    total = 0.0
    for row_s, row_t in zip(z_s.tolist(), z_t.tolist(), strict=True):
        for s, t in zip(row_s, row_t, strict=True):
            p, q = _sigmoid(t / temperature), _sigmoid(s / temperature)
            total += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    return temperature**2 * total / z_s.shape[0]


def mld_official(z_s: torch.Tensor, z_t: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The official L2D formulation: clamped probabilities, then log, summed and divided by the batch size."""
    p_s = torch.sigmoid(z_s).clamp(eps, 1 - eps)
    p_t = torch.sigmoid(z_t).clamp(eps, 1 - eps)
    kl = p_t * (p_t.log() - p_s.log()) + (1 - p_t) * ((1 - p_t).log() - (1 - p_s).log())
    return kl.sum() / z_s.shape[0]


def _logits(batch: int = 4, classes: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, classes, generator=gen, dtype=torch.float64) * 2,
            torch.randn(batch, classes, generator=gen, dtype=torch.float64) * 3)


# ----------------------------------------------------------------------------------------------- MLD


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_mld_matches_formula(temperature: float) -> None:
    z_s, z_t = _logits()
    assert mld_loss(z_s, z_t, temperature).item() == pytest.approx(mld_reference(z_s, z_t, temperature), rel=1e-5)


def test_mld_clamp_option_reproduces_official_code_even_when_saturated() -> None:
    z_s, z_t = _logits(seed=1)
    z_s[0, :3] = torch.tensor([40.0, -40.0, 25.0])
    z_t[1, :3] = torch.tensor([-30.0, 50.0, 19.0])
    want = mld_official(z_s, z_t).item()  # float64: in float32 the official `1 - 1e-8` rounds to 1...
    assert mld_loss(z_s, z_t, clamp_eps=1e-8).item() == pytest.approx(want, rel=1e-4)
    assert not torch.isfinite(mld_official(z_s.float(), z_t.float()))  # ...and log(1 - 1) is -inf
    z_s, z_t = _logits(seed=2)  # moderate logits: the exact default agrees with the official code too
    assert mld_loss(z_s, z_t).item() == pytest.approx(mld_official(z_s.float(), z_t.float()).item(), rel=1e-5)


def test_mld_zero_at_identical_logits_and_positive_otherwise() -> None:
    z_s, z_t = _logits(seed=3)
    assert mld_loss(z_s, z_s.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert mld_loss(z_s, z_t).item() > 0


def test_mld_finite_gradients_with_saturated_outputs() -> None:
    z_t = torch.tensor([[1e4, -1e4, 1e4], [-1e4, 1e4, 0.0]])
    for z_s in (torch.randn(2, 3), -z_t):  # a random student, and one saturated the wrong way
        z_s = z_s.clone().requires_grad_(True)
        loss = mld_loss(z_s, z_t)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z_s.grad).all()


def test_mld_bfloat16() -> None:
    z_s, z_t = (z.float() for z in _logits(seed=4))
    got = mld_loss(z_s.bfloat16(), z_t.bfloat16())
    assert got.dtype == torch.bfloat16 and torch.isfinite(got)
    assert got.float().item() == pytest.approx(mld_loss(z_s, z_t).item(), rel=0.05)


def test_mld_module_matches_function_and_rejects_bad_values() -> None:
    z_s, z_t = _logits(seed=5)
    labels = torch.zeros_like(z_s)
    assert MultiLabelKDLoss(temperature=2.0)(z_s, z_t, labels).item() == pytest.approx(mld_loss(z_s, z_t, 2.0).item())
    assert MultiLabelKDLoss(clamp_eps=1e-8)(z_s, z_t, labels).item() == pytest.approx(
        mld_loss(z_s, z_t, clamp_eps=1e-8).item())
    with pytest.raises(ValueError, match="temperature"):
        MultiLabelKDLoss(temperature=0)
    with pytest.raises(ValueError, match="clamp_eps"):
        MultiLabelKDLoss(clamp_eps=0.5)
    with pytest.raises(ValueError, match="one shape"):
        mld_loss(z_s, z_t[:, :2])


# ------------------------------------------------------------------------------------ label relations


def _smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _group_loss(es: list[list[float]], et: list[list[float]]) -> float:
    """(1/n) sum_{i != j} smooth_l1(d_s/mean_s - d_t/mean_t) over one group, with exact distances."""
    n = len(es)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    d_s = {p: math.dist(es[p[0]], es[p[1]]) for p in pairs}
    d_t = {p: math.dist(et[p[0]], et[p[1]]) for p in pairs}
    mean_s, mean_t = sum(d_s.values()) / len(pairs), sum(d_t.values()) / len(pairs)
    return sum(_smooth_l1(d_s[p] / mean_s - d_t[p] / mean_t) for p in pairs) / n


def relation_reference(e_s: torch.Tensor, e_t: torch.Tensor, labels: torch.Tensor, w_c: float, w_i: float,
                       reduction: str = "sum") -> float:
    batch, classes = labels.shape
    s, t, y = e_s.tolist(), e_t.tolist(), labels.tolist()
    cd = [_group_loss([s[b][k] for b in range(batch) if y[b][k]], [t[b][k] for b in range(batch) if y[b][k]])
          for k in range(classes) if sum(y[b][k] for b in range(batch)) >= 2]
    idl = [_group_loss([s[b][k] for k in range(classes) if y[b][k]], [t[b][k] for k in range(classes) if y[b][k]])
           for b in range(batch) if sum(y[b]) >= 2]
    if reduction == "mean":
        return w_c * sum(cd) / max(len(cd), 1) + w_i * sum(idl) / max(len(idl), 1)
    return w_c * sum(cd) + w_i * sum(idl)


def _embeddings(batch: int = 5, classes: int = 4, d_s: int = 3, d_t: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    e_s = torch.randn(batch, classes, d_s, generator=gen, dtype=torch.float64)
    e_t = torch.randn(batch, classes, d_t, generator=gen, dtype=torch.float64)
    labels = (torch.rand(batch, classes, generator=gen) < 0.6).float()
    labels[0, 1] = labels[1, 1] = 1.0  # at least one class and...
    labels[2, 0] = labels[2, 3] = 1.0  # ...one sample with >= 2 positives
    return e_s, e_t, labels


@pytest.mark.parametrize(("w_c", "w_i", "reduction"), [(1.0, 0.0, "sum"), (0.0, 1.0, "sum"), (1.0, 10.0, "sum"),
                                                       (1.0, 10.0, "mean")])
def test_label_relation_matches_per_group_loops(w_c: float, w_i: float, reduction: str) -> None:
    e_s, e_t, labels = _embeddings()
    want = relation_reference(e_s, e_t, labels, w_c, w_i, reduction)
    got = label_relation_loss(e_s, e_t, labels, w_c, w_i, reduction).item()  # type: ignore[arg-type]
    assert got == pytest.approx(want, rel=1e-4)


def test_label_relation_without_labels_uses_every_label() -> None:
    e_s, e_t, labels = _embeddings(seed=1)
    everything = torch.ones_like(labels)
    assert label_relation_loss(e_s, e_t).item() == pytest.approx(
        relation_reference(e_s, e_t, everything, 1.0, 10.0), rel=1e-4)
    assert label_relation_loss(e_s, e_t).item() == pytest.approx(label_relation_loss(e_s, e_t, everything).item())


def test_label_relation_zero_at_identity_and_invariant_to_similarity_transforms() -> None:
    e_s, e_t, labels = _embeddings(d_s=4, d_t=4, seed=2)
    assert label_relation_loss(e_s, e_s.clone(), labels).item() == pytest.approx(0.0, abs=1e-6)
    want = label_relation_loss(e_s, e_t, labels).item()
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    moved = 3.7 * e_s @ rotation + torch.randn(4, dtype=torch.float64)  # scale, rotate, translate
    assert label_relation_loss(moved, e_t, labels).item() == pytest.approx(want, rel=1e-4)


def test_label_relation_invariant_to_joint_permutation_of_batch_and_labels() -> None:
    e_s, e_t, labels = _embeddings(seed=3)
    want = label_relation_loss(e_s, e_t, labels).item()
    rows, cols = torch.randperm(5), torch.randperm(4)
    assert label_relation_loss(e_s[rows], e_t[rows], labels[rows]).item() == pytest.approx(want, rel=1e-5)
    assert label_relation_loss(e_s[:, cols], e_t[:, cols], labels[:, cols]).item() == pytest.approx(want, rel=1e-5)


def test_label_relation_skips_groups_with_fewer_than_two_positives() -> None:
    e_s, e_t, _ = _embeddings(seed=4)
    e_s = e_s.float().requires_grad_(True)
    none = torch.zeros(5, 4)
    loss = label_relation_loss(e_s, e_t.float(), none)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(e_s.grad).all()
    one_each = torch.eye(5, 4)  # every sample and every class has at most one positive
    assert label_relation_loss(e_s, e_t.float(), one_each).item() == 0.0


def test_label_relation_gradients_finite_with_duplicate_embeddings() -> None:
    e_s = torch.randn(3, 4, 5)
    e_s[:, 1] = e_s[:, 0]  # two labels with the same embedding: a zero distance
    e_s[1] = e_s[0]  # two samples with the same embeddings
    e_s.requires_grad_(True)
    loss = label_relation_loss(e_s, torch.randn(3, 4, 7))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(e_s.grad).all()


def test_label_relation_bfloat16() -> None:
    e_s, e_t, labels = (x.float() for x in _embeddings(seed=5))
    got = label_relation_loss(e_s.bfloat16(), e_t.bfloat16(), labels.bool())
    assert got.dtype == torch.bfloat16 and torch.isfinite(got)
    assert got.float().item() == pytest.approx(label_relation_loss(e_s, e_t, labels).item(), rel=0.05)


def test_label_relation_module_shapes_and_bad_values() -> None:
    e_s, e_t, labels = _embeddings(seed=6)
    module = LabelRelationLoss()
    assert module(e_s, e_t, labels).item() == pytest.approx(label_relation_loss(e_s, e_t, labels).item())
    assert LabelRelationLoss(use_labels=False, reduction="mean")(e_s, e_t, labels).item() == pytest.approx(
        label_relation_loss(e_s, e_t, None, reduction="mean").item())
    assert module.default_student_tap == module.default_teacher_tap == "label_embeddings"
    assert module.check_shapes((4, 3), (4, 6)) is None
    assert "K must match" in (module.check_shapes((4, 3), (5, 3)) or "")
    assert "(K, D)" in (module.check_shapes((12,), (12,)) or "")
    with pytest.raises(ValueError, match="use_labels"):
        module(e_s, e_t, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="both 0"):
        LabelRelationLoss(class_weight=0, instance_weight=0)
    with pytest.raises(ValueError, match=">= 0"):
        LabelRelationLoss(class_weight=-1)
    with pytest.raises(ValueError, match="reduction"):
        LabelRelationLoss(reduction="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="equal B and K"):
        label_relation_loss(e_s, e_t[:, :2])
