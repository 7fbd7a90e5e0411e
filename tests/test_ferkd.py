"""FerKD: the label rule and loss against hand-checked values, the mining and SelfMix draws, the mined replay on a real
cache, the refusals, and a tiny cached run that resumes exactly."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import built_cache, edit_recipe, straight_and_resumed, write_recipe
from kdkit.assemble import assemble
from kdkit.cache.views import apply_views
from kdkit.cli import main
from kdkit.data.augment import normalize
from kdkit.method import active_methods
from kdkit.methods.ferkd import (
    FerkdLoss,
    FerkdMethod,
    SelfMixPartner,
    calibrated_targets,
    cutmix_boxes,
    discarded,
    ferkd_loss,
    kept_views,
    partner_slots,
    paste,
)
from kdkit.methods.ferkd.method import FerkdRun
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe


def softmax_row(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def reference_loss(student: list[list[float]], teacher: list[list[float]], labels: list[int], tau: float, eps: float,
                   partner: list[list[float]] | None = None, lam: list[float] | None = None) -> float:
    """FerKD's soft CE with calibrated (and SelfMix-mixed) targets, in Python floats."""

    def target(row: list[float], y: int) -> list[float]:
        p = softmax_row(row)
        if p[y] >= tau:
            return p
        return [(1 - eps) * (c == y) + eps / len(row) for c in range(len(row))]

    total = 0.0
    for i, (s, t, y) in enumerate(zip(student, teacher, labels, strict=True)):
        q = target(t, y)
        if partner is not None and lam is not None:
            q = [lam[i] * a + (1 - lam[i]) * b for a, b in zip(q, target(partner[i], y), strict=True)]
        log_z = math.log(sum(math.exp(v) for v in s))
        total += -sum(qc * (sc - log_z) for qc, sc in zip(q, s, strict=True))
    return total / len(student)


def test_the_label_rule_keeps_confident_soft_labels_and_softens_the_hard_label_below_the_threshold() -> None:
    teacher = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [math.log(2.0), 0.0, -30.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0])
    # row 0: p_y = e^2 / (e^2 + 2) = 0.787 >= 0.5 -> the teacher's soft label; row 1: p_y = 1/3 -> the softened
    # one-hot; row 2: p_y = 2 / (3 + e^-30) = 0.667 -> soft. Exactly at the threshold a row stays soft.
    targets = calibrated_targets(teacher, labels, calibrate_below=0.5, smoothing=0.1)
    e2 = math.exp(2.0)
    expected = [[e2 / (e2 + 2), 1 / (e2 + 2), 1 / (e2 + 2)], [0.1 / 3, 0.9 + 0.1 / 3, 0.1 / 3],
                softmax_row([math.log(2.0), 0.0, -30.0])]
    torch.testing.assert_close(targets, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    at_threshold = calibrated_targets(torch.tensor([[0.0, 0.0]], dtype=torch.float64), torch.tensor([1]), 0.5, 0.2)
    torch.testing.assert_close(at_threshold, torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    # above the threshold a row is calibrated: p_y = 0.787 < 0.8
    torch.testing.assert_close(calibrated_targets(teacher[:1], labels[:1], 0.8, 0.0),
                               torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(6, 4, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(6, 4, generator=gen, dtype=torch.float64) * 3
    partner = torch.randn(6, 4, generator=gen, dtype=torch.float64) * 3
    return student, teacher, partner, torch.tensor([0, 1, 2, 3, 0, 1])


@pytest.mark.parametrize(("tau", "eps"), [(0.5, 0.1), (0.2, 0.0), (0.9, 0.3), (1.0, 0.1)])
def test_the_loss_is_the_soft_cross_entropy_to_the_calibrated_targets(tau: float, eps: float) -> None:
    student, teacher, _, labels = batch()
    value = ferkd_loss(student, teacher, labels, tau, eps)
    assert value.dtype == torch.float64
    expected = reference_loss(student.tolist(), teacher.tolist(), labels.tolist(), tau, eps)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    # the rows do differ: some are calibrated and some are not at tau 0.5
    q = calibrated_targets(teacher, labels, 0.5, 0.1)
    assert 0 < int((q.max(1).values > 0.9).sum()) < len(q)


def test_selfmix_mixes_the_two_regions_calibrated_labels_by_area() -> None:
    student, teacher, partner, labels = batch(1)
    lam = torch.tensor([1.0, 0.0, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    value = ferkd_loss(student, teacher, labels, 0.5, 0.1, partner, lam)
    expected = reference_loss(student.tolist(), teacher.tolist(), labels.tolist(), 0.5, 0.1, partner.tolist(),
                              lam.tolist())
    assert value.item() == pytest.approx(expected, rel=1e-12)
    assert value.item() != pytest.approx(ferkd_loss(student, teacher, labels, 0.5, 0.1).item(), rel=1e-6)


def test_the_loss_module_consumes_a_pending_partner_once() -> None:
    student, teacher, partner, labels = batch(2)
    loss = FerkdLoss(calibrate_below=0.5, smoothing=0.1)
    lam = torch.full((6,), 0.3, dtype=torch.float64)
    loss.partner = SelfMixPartner(partner, lam)
    torch.testing.assert_close(loss(student, teacher, labels), ferkd_loss(student, teacher, labels, 0.5, 0.1,
                                                                          partner, lam))
    assert loss.partner is None
    torch.testing.assert_close(loss(student, teacher, labels), ferkd_loss(student, teacher, labels, 0.5, 0.1))


def test_mining_drops_each_images_easiest_and_hardest_views() -> None:
    assert discarded(30, 0.1, 0.1) == (3, 3) and discarded(6, 0.2, 0.0) == (1, 0) and discarded(3, 0.1, 0.1) == (0, 0)
    confidence = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.3],
                               [0.2, 0.4, 0.6, 0.8, 1.0],
                               [0.5, 0.5, 0.5, 0.5, 0.5]])  # ties: by view index, lowest index is "hardest"
    torch.testing.assert_close(kept_views(confidence, 1, 1), torch.tensor([[2, 3, 4], [1, 2, 3], [1, 2, 3]]))
    torch.testing.assert_close(kept_views(confidence, 2, 0), torch.tensor([[1, 2, 4], [0, 1, 2], [0, 1, 2]]))
    torch.testing.assert_close(kept_views(confidence, 0, 0), torch.arange(5).repeat(3, 1))
    with pytest.raises(ValueError, match="leaves none"):
        kept_views(confidence, 3, 2)


def test_selfmix_draws_another_kept_view_and_a_box_whose_area_is_the_label_weight() -> None:
    rng = np.random.default_rng(0)
    slots = torch.arange(50) % 4
    partners = partner_slots(slots, 4, rng)
    assert ((partners != slots) & (partners >= 0) & (partners < 4)).all()
    assert set(partners.tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="at least 2"):
        partner_slots(slots, 1, rng)
    mask, lam = cutmix_boxes(64, 8, 6, 1.0, np.random.default_rng(1))
    assert mask.shape == (64, 1, 8, 6) and lam.dtype == torch.float64
    torch.testing.assert_close(lam, 1.0 - mask.double().mean((1, 2, 3)))
    assert float(lam.min()) > 0 and float(lam.max()) == 1.0 and float(lam.mean()) < 0.9
    x, other = torch.zeros(64, 2, 8, 6), torch.ones(64, 2, 8, 6)
    torch.testing.assert_close(paste(x, other, mask), mask.expand(-1, 2, -1, -1).float())


def ferkd_recipe(cached: dict, **section: object) -> dict:
    recipe = copy.deepcopy(cached)
    recipe["teacher"]["cache"]["views"] = 6
    recipe["distill"] = [{"loss": "ferkd", "calibrate_below": 0.5, "smoothing": 0.1}]
    recipe["ferkd"] = {"discard_easy": 0.2, "discard_hard": 0.2, **section}
    recipe["train"]["ce_weight"] = 0
    return recipe


@pytest.mark.slow
def test_the_mined_replay_reads_only_kept_views_each_once_per_cycle(cached: dict) -> None:
    _recipe, built, cache, replay, teacher = built_cache(ferkd_recipe(cached))
    run = FerkdMethod().attach(built, None)
    assert isinstance(run, FerkdRun)
    run.on_event(SimpleNamespace(teacher=teacher), "epoch_start")
    # independently: the true-class probability of every stored view, ranked per image with numpy
    labels = built.data.train_labels
    n = cache.num_samples
    conf = np.stack([cache.lookup(torch.arange(n), torch.full((n,), k))["logits"].softmax(1)
                     [torch.arange(n), labels].numpy() for k in range(6)], 1)
    order = np.argsort(conf, axis=1, kind="stable")
    expected = np.sort(order[:, 1:5], axis=1)
    assert np.array_equal(replay.kept.numpy(), expected)
    index = torch.arange(n)
    read = torch.stack([replay.views(index, e) for e in range(4)], 1)  # 4 epochs: one cycle of the 4 kept views
    assert np.array_equal(np.sort(read.numpy(), 1), expected)
    assert torch.equal(teacher(torch.zeros(n, 1), index, 2)["logits"],
                       cache.lookup(index, replay.views(index, 2))["logits"])  # the teacher reads the same views
    stats = run.summary(None)["ferkd"]
    assert (stats["views_stored"], stats["views_kept"], stats["dropped_easy"], stats["dropped_hard"]) == (6, 4, 1, 1)
    assert stats["confidence_mean_kept"] == pytest.approx(float(np.take_along_axis(conf, expected, 1).mean()), abs=1e-4)


@pytest.mark.slow
def test_selfmix_pastes_a_box_of_another_kept_view_and_hands_its_stored_output_to_the_loss(cached: dict) -> None:
    assembled = assemble(recipe_from_dict(ferkd_recipe(cached)))
    engine, loader = assembled.engine, assembled.train_loader
    run = next(r for m, r in assembled.methods if m.name == "ferkd")
    run.on_event(engine, "epoch_start")
    x, y, index = next(iter(loader.epoch(0)))
    mixed, y_out, index_out = run.selfmix(engine, x, y, index)
    assert torch.equal(y_out, y) and torch.equal(index_out, index)  # one image, one label
    replay = engine.teacher.replay
    rng = np.random.default_rng([0, 0, 0])  # train.seed 0, epoch 0, batch 0: the documented draw
    partner = replay.kept[index, partner_slots(replay.slots(index, 0), 4, rng)]
    mask, lam = cutmix_boxes(len(x), x.shape[-2], x.shape[-1], 1.0, rng)
    assert (partner != replay.views(index, 0)).all()
    assert all(p in row for p, row in zip(partner.tolist(), replay.kept[index].tolist(), strict=True))
    pixels = normalize(apply_views(loader.images[index], replay.cache.views[index, partner], replay.augment),
                       loader.mean, loader.std)
    torch.testing.assert_close(mixed, torch.where(mask, pixels, x))
    assert 0 < int(mask.sum()) < mask.numel()  # some pixels pasted, not all
    pending = run.term.loss.partner
    torch.testing.assert_close(pending.teacher, replay.cache.lookup(index, partner)["logits"])
    torch.testing.assert_close(pending.lam, lam)


@pytest.mark.parametrize(("change", "message"), [
    ({"teacher.cache": None}, "teacher.cache is None (choices: a teacher-output cache"),
    ({"distill.0.loss": "kd"}, "no `ferkd` term in distill (terms: ['kd'])"),
    ({"distill.1": {"loss": "ferkd"}}, "distill.1 is a second `ferkd` term"),
    ({"ferkd.discard_easy": 0.5, "ferkd.discard_hard": 0.5}, "drop 3 + 3 of the 6 stored views per image, leaving"),
    ({"ferkd.discard_easy": 0.5, "ferkd.discard_hard": 0.4}, "1 of 6 stored view(s) per image is kept (choices: 2"),
    ({"distill.0.calibrate_below": 0}, "calibrate_below"),
    ({"ferkd.selfmix_alpha": -1}, "selfmix_alpha"),
])
def test_recipes_ferkd_cannot_work_with_are_refused(change: dict, message: str, cached: dict, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    recipe = ferkd_recipe(cached)
    edit_recipe(recipe, change)
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert message in capsys.readouterr().err


def test_a_recipe_with_one_kept_view_and_no_selfmix_is_accepted(cached: dict, tmp_path: Path) -> None:
    recipe = ferkd_recipe(cached, selfmix=False)
    recipe["ferkd"].update(discard_easy=0.5, discard_hard=0.4)
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0


def test_the_ferkd_loss_alone_is_the_label_rule_and_activates_no_method(cached: dict) -> None:
    recipe = ferkd_recipe(cached)
    del recipe["ferkd"], recipe["teacher"]["cache"]
    assert [m.name for m in active_methods(recipe_from_dict(recipe))] == []
    assert [m.name for m in active_methods(recipe_from_dict(ferkd_recipe(cached)))] == ["ferkd"]


@pytest.mark.slow
def test_a_tiny_ferkd_run_reports_its_mining(cached: dict) -> None:
    summary = run_recipe(recipe_from_dict(ferkd_recipe(cached)))
    stats = summary["ferkd"]
    assert (stats["views_kept"], stats["selfmix"]) == (4, True) and 0 <= stats["calibrated_share"] <= 1
    rows = json.loads((Path(cached["output"]["dir"]) / "metrics.json").read_text())
    assert all(math.isfinite(r["train_ferkd"]) for r in rows)


@pytest.mark.slow
def test_ferkd_resumes_exactly(cached: dict, tmp_path: Path) -> None:
    straight, broken = straight_and_resumed(ferkd_recipe(cached), tmp_path, 8)
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((broken / "metrics.json").read_text())
    assert [(r["train_loss"], r["test_top1"]) for r in a] == [(r["train_loss"], r["test_top1"]) for r in b]
