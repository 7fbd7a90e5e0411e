"""Unlabelled training samples through the pipeline: the supervised loss and the training accuracy skip them,
distillation terms use them, the teacher cache serves them, and recipes that cannot train on them are refused
before training (exit code 2). Also the novel classes' clustering accuracy (Hungarian matching)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import write_recipe
from kdkit.build import plan, teacher_logits
from kdkit.cli import main
from kdkit.data import UNLABELLED, apply_setting, load_dataset
from kdkit.distill import Objective, labelled_cross_entropy
from kdkit.distributed import DistContext
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe
from kdkit.task import TASKS
from kdkit.tasks.classification import cluster_accuracy

SEMI = {"name": "semi_supervised", "labelled": 50}


# -- the supervised loss and the training accuracy ------------------------------------------------------------------

def test_cross_entropy_averages_over_the_labelled_samples_only() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    targets = torch.tensor([2, UNLABELLED, 0, UNLABELLED, UNLABELLED, 3])
    keep = targets != UNLABELLED
    for smoothing in (0.0, 0.1):
        expected = F.cross_entropy(logits[keep], targets[keep], label_smoothing=smoothing)  # the labelled ones alone
        value = labelled_cross_entropy(logits, targets, smoothing)
        assert value.dtype == torch.float64
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    labelled = torch.tensor([2, 1, 0, 3, 1, 3])  # all labelled: exactly F.cross_entropy's mean, bit for bit
    assert torch.equal(labelled_cross_entropy(logits.float(), labelled), F.cross_entropy(logits.float(), labelled))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_a_batch_without_labels_gives_zero_loss_and_zero_gradient(smoothing: float) -> None:
    logits = torch.randn(5, 3, requires_grad=True)
    value = labelled_cross_entropy(logits, torch.full((5,), UNLABELLED), smoothing)
    value.backward()
    assert value.item() == 0.0 and torch.equal(logits.grad, torch.zeros(5, 3))  # not NaN: the mean 0/0 is masked


def test_the_objective_and_the_task_skip_unlabelled_samples() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [5.0, 0.0]])
    targets = torch.tensor([0, UNLABELLED, 1])
    bound = TASKS.get("classification").bind(None, "cpu")
    expected = F.cross_entropy(logits[[0, 2]], targets[[0, 2]])
    torch.testing.assert_close(bound.loss(logits, targets), expected)
    torch.testing.assert_close(Objective([], ce_weight=1.0)(logits, targets, {}, {})["ce"], expected)
    right, scored = bound.train_score(logits, targets)
    assert (right.item(), scored.item()) == (1.0, 2.0)  # sample 1 predicts class 1 but is unlabelled: not counted


# -- the novel classes' clustering accuracy -------------------------------------------------------------------------

def test_cluster_accuracy_on_hand_checked_confusions() -> None:
    assert cluster_accuracy(torch.tensor([[0, 7, 0], [0, 0, 4], [5, 0, 0]])) == 100.0  # a permutation: all right
    # rows are clusters, columns classes; the two matchings: (0->0, 1->1) = 5 + 4 = 9 and (0->1, 1->0) = 1 + 2 = 3
    assert cluster_accuracy(torch.tensor([[5, 1], [2, 4]])) == 75.0
    assert cluster_accuracy(torch.tensor([[1, 5], [4, 2]])) == 75.0  # the swapped matching is found
    assert cluster_accuracy(torch.tensor([[3, 3, 0]])) == 50.0  # one cluster, three classes: at most one class right
    assert cluster_accuracy(torch.zeros(2, 2)) == 0.0


def test_novel_acc_scores_a_permuted_clustering_100() -> None:
    data = apply_setting(load_dataset("digits"), "novel_classes", {}, seed=0)  # 5 known (0-4), 5 novel (5-9)
    bound = TASKS.get("classification").bind(data, "cpu")
    assert bound.metrics == ("top1", "top5", "novel_acc", "loss")
    labels = data.test_labels
    slots = torch.tensor([0, 1, 2, 3, 4, 7, 9, 5, 8, 6])  # novel class c gets output slot perm[c]: a relabelling
    logits = F.one_hot(slots[labels], 10).float() * 5
    evaluator = bound.evaluator(DistContext())
    for batch in torch.arange(len(labels)).split(100):  # summed over batches
        evaluator.update(logits[batch], labels[batch])
    metrics = evaluator.compute()
    assert metrics["novel_acc"] == 100.0
    novel = int((labels >= 5).sum())
    assert metrics["top1"] == pytest.approx(100.0 * (len(labels) - novel + int((labels == 8).sum())) / len(labels))
    # every novel image in one cluster: the largest novel class's share
    evaluator = bound.evaluator(DistContext())
    evaluator.update(F.one_hot(torch.full_like(labels, 5), 10).float(), labels)
    shares = torch.bincount(labels[labels >= 5])
    assert evaluator.compute()["novel_acc"] == pytest.approx(100.0 * float(shares.max()) / novel)
    assert "novel_acc" not in TASKS.get("classification").bind(load_dataset("digits"), "cpu").metrics


# -- runs -----------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_kd_trains_on_labelled_and_unlabelled_samples_and_a_teacher_cache_serves_them(cached: dict) -> None:
    cached["data"]["setting"] = SEMI
    summary = run_recipe(recipe_from_dict(cached))
    assert (summary["train_samples"], summary["train_labelled"]) == (200, 50)
    manifest = json.loads((Path(summary["teacher_cache"]["dir"]) / "manifest.json").read_text())
    assert manifest["data"]["num_samples"] == 200  # the cache holds the teacher's outputs on every sample
    rows = json.loads((Path(cached["output"]["dir"]) / "metrics.json").read_text())
    assert all(np.isfinite(r["train_ce"]) and np.isfinite(r["train_kd"]) and 0 <= r["train_top1"] <= 100
               for r in rows)


def test_the_training_accuracy_counts_labelled_samples_only(tiny_kd: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdkit.assemble import assemble

    tiny_kd["data"]["setting"] = SEMI
    recipe = recipe_from_dict(tiny_kd, ["train.epochs=1"])
    run = assemble(recipe, ctx=DistContext(), run_dir=None, progress=False)
    scored = []
    original = run.engine.task.train_score

    def spy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = original(logits, targets)
        scored.append((int(out[1]), int((targets != UNLABELLED).sum())))
        return out

    monkeypatch.setattr(run.engine.task, "train_score", spy)
    run.engine.fit()
    assert scored and all(n == labelled for n, labelled in scored) and sum(n for n, _ in scored) < 32 * len(scored)


def test_score_based_pruning_ranks_by_the_recipes_teacher(tiny_kd: dict) -> None:
    tiny_kd["data"]["setting"] = {"name": "pruned", "keep": 0.25, "score": "teacher_margin"}
    built = plan(recipe_from_dict(tiny_kd), training=True)
    base = plan(recipe_from_dict(tiny_kd, ["data.setting=null"]), training=True)
    logits = teacher_logits(base.teacher.model, base.data)
    expected = apply_setting(base.data, "pruned", {"keep": 0.25, "score": "teacher_margin"}, seed=0,
                             teacher_logits=logits)
    assert len(built.data.train_labels) == 50
    assert torch.equal(built.data.train_images, expected.train_images)
    random = apply_setting(base.data, "pruned", {"keep": 0.25}, seed=0)
    assert not torch.equal(built.data.train_images, random.train_images)


# -- refusals before training -----------------------------------------------------------------------------------------

REFUSED = [
    ("dkd reads labels", {"distill": [{"loss": "dkd"}]}, SEMI, "distill.0.loss", "loss 'dkd' reads the class labels"),
    ("no term learns from unlabelled", {"distill": [], "teacher": None}, SEMI, "distill",
     "no `distill:` term learns from them"),
    ("zero labels with CE", {}, {"name": "shifted"}, "train.ce_weight", "all 100 training samples are unlabelled"),
    ("TST needs every label", {"tst": {"ops": ["contrast", "rotate"], "num_ops": 1, "policy_epochs": [1]}}, SEMI,
     "data.setting", "method 'tst' needs the label of every training sample"),
    ("score pruning without teacher", {"distill": [], "teacher": None},
     {"name": "pruned", "score": "teacher_margin"}, "recipe", "ranks the training images by a teacher"),
    ("unknown setting", {}, {"name": "long_tail"}, "data.setting.name", "unknown setting 'long_tail'"),
    ("bad parameter", {}, {"name": "long_tailed", "imbalance": 0.5}, "data.setting.imbalance",
     "imbalance must be >= 1"),
]


@pytest.mark.parametrize(("case", "changes", "setting", "where", "message"), REFUSED, ids=[r[0] for r in REFUSED])
def test_what_cannot_train_on_the_setting_fails_before_training(
        case: str, changes: dict, setting: dict, where: str, message: str, tiny_kd: dict, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    recipe = {**tiny_kd, **changes}
    recipe["data"] = {**recipe["data"], "setting": setting}
    recipe = {k: v for k, v in recipe.items() if v is not None}
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    err = capsys.readouterr().err
    assert f"{where}:" in err and message in err and "fix:" in err, err
    assert not (Path(tiny_kd["output"]["dir"]) / "checkpoints").exists()  # nothing trained
