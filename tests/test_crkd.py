"""Cr-KD (class-relation KD for novel class discovery) and its base, UNO's swapped prediction: each loss against an
independent computation of the official code's formula, the refusals, and a tiny discovery run end to end."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import edit_recipe, straight_and_resumed, write_recipe
from kdkit.bench.methods import method_recipes, suites
from kdkit.cli import main
from kdkit.data import UNLABELLED, apply_setting, load_dataset
from kdkit.methods.crkd import class_relation_kd, sinkhorn_knopp, swapped_prediction_loss
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe


def official_sinkhorn(logits: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    """UNO's SinkhornKnopp.forward, step by step in float64 (exp domain: fine for the small logits used here)."""
    q = np.exp(logits / epsilon).T  # (K, B)
    clusters, batch = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(axis=1, keepdims=True) / clusters
        q = q / q.sum(axis=0, keepdims=True) / batch
    return (q * batch).T


def test_sinkhorn_matches_unos_exp_domain_computation_and_balances_the_clusters() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 4, generator=gen, dtype=torch.float64) * 0.3
    ours = sinkhorn_knopp(logits, epsilon=0.05, iterations=3)
    np.testing.assert_allclose(ours.numpy(), official_sinkhorn(logits.numpy(), 0.05, 3), rtol=1e-10, atol=1e-12)
    assert torch.allclose(ours.sum(1), torch.ones(12, dtype=torch.float64))  # each sample: a distribution
    # many rounds: each cluster gets B/K of the mass (equipartition)
    balanced = sinkhorn_knopp(logits, epsilon=0.05, iterations=200)
    assert torch.allclose(balanced.sum(0), torch.full((4,), 3.0, dtype=torch.float64), atol=1e-6)


def test_sinkhorn_is_finite_where_the_exp_domain_overflows() -> None:
    logits = torch.tensor([[30.0, -30.0, 0.0], [0.0, 30.0, -30.0], [-30.0, 0.0, 30.0]])  # exp(600) overflows float32
    q = sinkhorn_knopp(logits, epsilon=0.05)
    assert torch.isfinite(q).all() and torch.allclose(q, torch.eye(3), atol=1e-6)


def two_view_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(10, 6, generator=gen, dtype=torch.float64) * 2
    labels = torch.tensor([0, UNLABELLED, 1, UNLABELLED, UNLABELLED] * 2)  # 5 images, two views
    return logits, labels


def test_swapped_prediction_is_each_views_sinkhorn_target_predicted_by_the_other_view() -> None:
    logits, labels = two_view_batch()
    known, tau, eps = 2, 0.5, 0.3
    rows = [1, 3, 4]  # the unlabelled images
    total = 0.0
    for v, other in ((0, 1), (1, 0)):
        mine = logits[[5 * v + r for r in rows]].numpy()
        target = np.zeros_like(mine)
        target[:, known:] = official_sinkhorn(mine[:, known:], eps, 3)
        theirs = logits[[5 * other + r for r in rows]].numpy() / tau
        log_p = theirs - np.log(np.exp(theirs).sum(1, keepdims=True))  # over every class, known ones too
        total += float(np.mean([-(target[i] * log_p[i]).sum() for i in range(len(rows))]))
    ours = swapped_prediction_loss(logits, labels, known, temperature=tau, epsilon=eps)
    assert ours.dtype == torch.float64 and float(ours) == pytest.approx(total / 2, rel=1e-10)


def test_swapped_prediction_targets_carry_no_gradient_and_labelled_rows_do_not_count() -> None:
    logits, labels = two_view_batch()
    logits.requires_grad_(True)
    swapped_prediction_loss(logits, labels, 2).backward()
    labelled = (labels != UNLABELLED).nonzero().flatten()
    assert torch.equal(logits.grad[labelled], torch.zeros_like(logits.grad[labelled]))
    # no unlabelled image: 0 with zero gradient
    z = torch.randn(4, 6, requires_grad=True)
    value = swapped_prediction_loss(z, torch.tensor([0, 1, 0, 1]), 2)
    value.backward()
    assert float(value.detach()) == 0.0 and torch.equal(z.grad, torch.zeros_like(z))
    with pytest.raises(ValueError, match="odd"):
        swapped_prediction_loss(torch.randn(5, 6), torch.zeros(5, dtype=torch.int64), 2)


def official_crkd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, known: int, tau: float,
                  temperature: float, weighting: str) -> torch.Tensor:
    """Cr-KD's KD() per sample with plain loops (differentiable: the learnable weight keeps its gradient)."""
    scale = tau * temperature
    rows = [i for i in range(len(labels)) if labels[i] == UNLABELLED]
    ce, w = [], []
    for i in rows:
        p = [math.exp(float(teacher[i, c]) / scale) for c in range(known)]
        p = [v / sum(p) for v in p]
        log_norm = torch.logsumexp(student[i, :known] / scale, 0)
        ce.append(sum(-p[c] * (student[i, c] / scale - log_norm) for c in range(known)))
        all_norm = torch.exp(student[i] / scale).sum()
        w.append(sum(torch.exp(student[i, c] / scale) for c in range(known)) / all_norm)
    w_mean = sum(w) / len(w)
    if weighting == "none":
        weights = [1.0] * len(rows)
    elif weighting == "detached":
        weights = [float(x.detach()) / float(w_mean.detach()) for x in w]
    else:
        weights = [x / w_mean for x in w]
    return sum(weights[j] * ce[j] * temperature**2 for j in range(len(rows))) / len(rows)


@pytest.mark.parametrize("weighting", ["learnable", "detached", "none"])
def test_crkd_matches_the_official_weighted_soft_cross_entropy_and_its_gradient(weighting: str) -> None:
    gen = torch.Generator().manual_seed(2)
    student = (torch.randn(7, 6, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    teacher = torch.randn(7, 6, generator=gen, dtype=torch.float64) * 3
    labels = torch.tensor([0, UNLABELLED, 1, UNLABELLED, UNLABELLED, 2, UNLABELLED])
    ours = class_relation_kd(student, teacher, labels, known=3, tau=0.5, temperature=2.0, weighting=weighting)
    ref = official_crkd(student, teacher, labels, 3, 0.5, 2.0, weighting)
    assert ours.dtype == torch.float64 and float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
    (g_ours,) = torch.autograd.grad(ours, student)
    (g_ref,) = torch.autograd.grad(ref, student)
    assert torch.allclose(g_ours, g_ref, rtol=1e-9, atol=1e-12)
    assert torch.equal(g_ours[[0, 2, 5]], torch.zeros(3, 6, dtype=torch.float64))  # labelled rows: no KD
    novel_slot_grad = g_ours[[1, 3, 4, 6], 3:].abs().sum()
    # only the weight reads the novel outputs: they get a gradient iff the weighting is learnable
    assert (novel_slot_grad > 0) == (weighting == "learnable")


def test_crkd_is_zero_when_the_student_keeps_the_class_relation_and_ignores_teacher_novel_outputs() -> None:
    teacher = torch.tensor([[2.0, 0.0, -1.0, 50.0], [0.5, 1.0, 0.0, -50.0]])
    labels = torch.full((2,), UNLABELLED)
    student = teacher.clone()
    student[:, 3] = 0.0
    value = class_relation_kd(student, teacher, labels, known=3, tau=1.0, temperature=1.0, weighting="none")
    entropy = -(torch.softmax(teacher[:, :3], 1) * torch.log_softmax(teacher[:, :3], 1)).sum(1).mean()
    assert float(value) == pytest.approx(float(entropy))  # soft CE = the relation's own entropy: KL 0
    assert float(class_relation_kd(student, teacher, torch.tensor([0, 1]), known=3)) == 0.0


def test_part_known_keeps_the_known_classes_labelled_images_with_every_output() -> None:
    data = load_dataset("digits")
    known = apply_setting(data, "novel_classes", {"part": "known"}, seed=0)
    full = apply_setting(data, "novel_classes", {}, seed=0)
    assert known.num_classes == full.num_classes == 10 and known.novel_classes == full.novel_classes == (5, 6, 7, 8, 9)
    assert known.num_labelled == len(known.train_labels) == full.num_labelled
    assert torch.equal(known.train_labels, full.train_labels[full.train_labels != UNLABELLED])
    assert torch.equal(known.test_labels, full.test_labels)


TERMS = [{"loss": "ncd_swap", "known": 5, "temperature": 1.0, "epsilon": 0.5},
         {"loss": "crkd", "weight": 0.1, "known": 5, "tau": 1.0, "temperature": 4.0}]


def crkd_recipe(tiny_kd: dict) -> dict:
    recipe = copy.deepcopy(tiny_kd)
    recipe["data"]["setting"] = {"name": "novel_classes"}
    recipe["data"]["views"] = 2
    recipe["distill"] = copy.deepcopy(TERMS)
    recipe["train"]["ce_weight"] = 1.0
    recipe["train"]["best_metric"] = "novel_acc"
    return recipe


@pytest.mark.parametrize(("change", "message"), [
    ({"data.setting": None}, "discover novel classes, but the recipe has no data.setting"),
    ({"data.setting": {"name": "semi_supervised", "labelled": 50}}, "data.setting 'semi_supervised'"),
    ({"data.setting": {"name": "class_mismatch", "labelled": 50, "unlabelled": 60}}, "data.setting 'class_mismatch'"),
    ({"data.setting.part": "known"}, "part 'known' has none"),
    ({"data.views": 1}, "set data.views: 2"),
    ({"distill.1.weighting": "sometimes"}, "weighting"),
    ({"distill.1.tau": 0}, "tau"),
])
def test_recipes_crkd_cannot_work_with_are_refused(change: dict, message: str, tiny_kd: dict, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    recipe = edit_recipe(crkd_recipe(tiny_kd), change)
    if change.get("data.setting", {"name": "novel_classes"}) is None or "data.setting" in change:
        recipe["train"].pop("best_metric")  # novel_acc exists only with novel classes
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert message in capsys.readouterr().err


def test_crkd_without_a_teacher_is_refused(tiny_kd: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = crkd_recipe(tiny_kd)
    del recipe["teacher"]
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert "teacher" in capsys.readouterr().err


def test_a_known_count_other_than_the_datas_is_refused_before_training(tiny_kd: dict, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    recipe = edit_recipe(crkd_recipe(tiny_kd), {"distill.1.known": 4})
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    err = capsys.readouterr().err
    assert "known=4" in err and "5 known classes" in err
    assert not (Path(recipe["output"]["dir"]) / "metrics.json").exists()


@pytest.mark.slow
def test_a_tiny_discovery_run_trains_both_terms_and_reports_novel_acc(tiny_kd: dict) -> None:
    recipe = crkd_recipe(tiny_kd)
    recipe["train"]["epochs"] = 1
    summary = run_recipe(recipe_from_dict(recipe))
    rows = json.loads((Path(recipe["output"]["dir"]) / "metrics.json").read_text())
    assert all(r["train_crkd"] > 0 and r["train_ncd_swap"] > 0 and 0 <= r["test_novel_acc"] <= 100 for r in rows)
    assert summary["metric"] == "novel_acc" and "best_novel_acc" in summary


def test_the_novel_classes_suite_is_a_benchmark_suite_with_its_baselines_first() -> None:
    assert "novel_classes" in suites()
    assert method_recipes("novel_classes") == ["student_ce", "kd", "crkd", "uno"]


@pytest.mark.slow
def test_crkd_resumes_exactly(tiny_kd: dict, tmp_path: Path) -> None:
    # stateless between steps (Sinkhorn per batch, the strong view seeded per batch): resuming must change nothing
    straight, broken = straight_and_resumed(crkd_recipe(tiny_kd), tmp_path, 8)
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((broken / "metrics.json").read_text())
    assert [(r["train_loss"], r["test_novel_acc"]) for r in a] == [(r["train_loss"], r["test_novel_acc"]) for r in b]


def test_novel_acc_is_a_python_float_so_a_checkpoint_holding_it_loads_weights_only() -> None:
    from kdkit.tasks.classification import cluster_accuracy

    value = cluster_accuracy(torch.tensor([[0.0, 4.0], [3.0, 1.0]]))
    assert type(value) is float and value == pytest.approx(100.0 * 7 / 8)
