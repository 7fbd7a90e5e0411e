"""MDCS: the loss against the official code's computation, the confident-instance selection on a hand-checked case,
the experts' prior shifts and deployed mean, the refusals, and a tiny long-tailed run end to end (and resumed)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import edit_recipe, straight_and_resumed, write_recipe
from kdkit.bench.methods import method_recipes, suites
from kdkit.build import plan
from kdkit.cli import main
from kdkit.distill import Student
from kdkit.errors import KdkitError
from kdkit.methods.mdcs import (
    MdcsExperts,
    MdcsLoss,
    confident,
    consistency_loss,
    diversity_loss,
    mdcs_experts,
    mdcs_loss,
    shifted_logits,
)
from kdkit.methods.mdcs.method import MdcsRun
from kdkit.models import build_model
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe

LAMBDAS = (-0.5, 1.0, 2.5)
TERM = {"loss": "mdcs", "student": "penultimate", "bridge": "mdcs_experts", "warmup": 1.0}


def official_mdcs(experts: torch.Tensor, target: torch.Tensor, counts: torch.Tensor, epoch: float,
                  warmup: float = 20.0) -> torch.Tensor:
    """The official ``MDCSLoss.forward`` (model/loss.py), rewritten expert by expert: the prior is the class counts,
    ``log(counts ** lambda + 1e-9)``, temperature 1, ``0.6 * kl * min(epoch / warmup, 1)``, CE summed over experts."""
    num = target.shape[0] // 2
    loss = experts.new_zeros(())
    kl_loss = experts.new_zeros(())
    for k, lam in enumerate(LAMBDAS):
        logits = experts[:, k] + torch.log(torch.pow(counts.to(experts.dtype), lam) + 1e-9)
        teacher, student = logits[:num], logits[num:]
        teacher_soft = F.softmax(teacher, dim=1).detach()
        student_log = F.log_softmax(student, dim=1)
        _, teacher_index = torch.max(F.softmax(teacher, dim=1).detach(), dim=1)
        picked = teacher_index == target[:num]
        if picked.sum() > 0:
            kl_loss = kl_loss + F.kl_div(student_log[picked], teacher_soft[picked], reduction="batchmean")
        loss = loss + F.cross_entropy(logits, target)
    return loss + 0.6 * kl_loss * min(epoch / warmup, 1.0)


def two_view_batch(seed: int = 0, half: int = 6, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    experts = torch.randn(2 * half, 3, classes, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, classes, (half,), generator=gen).repeat(2)
    counts = torch.tensor([500, 200, 80, 20, 5])[:classes]
    return experts, labels, counts


def log_prior(counts: torch.Tensor) -> torch.Tensor:
    return (counts.double() / counts.sum()).log()


def test_each_expert_is_shifted_by_its_lambda_times_the_log_prior() -> None:
    experts, _, counts = two_view_batch()
    prior = counts.double() / counts.sum()
    out = shifted_logits(experts, prior.log(), LAMBDAS)
    for i in range(experts.shape[0]):
        for k, lam in enumerate(LAMBDAS):
            for c in range(experts.shape[2]):
                assert math.isclose(float(out[i, k, c]), float(experts[i, k, c]) + lam * math.log(float(prior[c])),
                                    rel_tol=1e-12, abs_tol=1e-12)


def test_the_shifts_lean_the_experts_head_uniform_and_tail() -> None:
    # a flat raw prediction, shifted: lambda < 0 favours the rarest class and lambda > 0 the most frequent, so CE on
    # the shifted logits makes the raw logits of expert 0 lean to the head and those of experts 1-2 to the tail
    flat = torch.zeros(1, 3, 5, dtype=torch.float64)
    out = shifted_logits(flat, log_prior(torch.tensor([500, 200, 80, 20, 5])), LAMBDAS)[0]
    assert int(out[0].argmax()) == 4 and int(out[1].argmax()) == 0 and int(out[2].argmax()) == 0
    assert float(out[2, 0] - out[2, 4]) == pytest.approx(2.5 * math.log(100), rel=1e-12)


@pytest.mark.parametrize(("seed", "epoch"), [(0, 20.0), (1, 5.0), (2, 0.0), (3, 40.0)])
def test_the_loss_is_the_official_codes(seed: int, epoch: float) -> None:
    experts, labels, counts = two_view_batch(seed)
    scale = min(epoch / 20.0, 1.0)
    ours = mdcs_loss(experts, labels, log_prior(counts), LAMBDAS, 0.6, scale)
    assert ours.dtype == torch.float64
    # the code's unnormalised counts and its 1e-9 differ from log(pi) by a per-row constant (and 1e-9 / counts^lambda)
    torch.testing.assert_close(ours, official_mdcs(experts, labels, counts, epoch), rtol=1e-7, atol=1e-7)


def test_the_loss_object_ramps_and_reads_its_prior() -> None:
    experts, labels, counts = two_view_batch(4)
    loss = MdcsLoss(warmup=20.0)
    loss.set_prior(counts)
    loss.ramp(5.0)
    assert loss.consistency_scale == 0.25
    torch.testing.assert_close(loss(experts, None, labels), official_mdcs(experts, labels, counts, 5.0),
                               rtol=1e-7, atol=1e-7)
    loss.ramp(30.0)
    assert loss.consistency_scale == 1.0
    assert MdcsLoss(warmup=0.0).consistency_scale == 1.0


def test_the_run_ramps_the_loss_at_the_batchs_epoch_position() -> None:
    loss = MdcsLoss(warmup=4.0)
    run = MdcsRun(loss, "mdcs")
    x, y, index = torch.zeros(2), torch.zeros(2), torch.zeros(2)
    assert run.ramp(SimpleNamespace(epoch=1, batch=5, steps_per_epoch=10), x, y, index) == (x, y, index)
    assert loss.consistency_scale == 1.5 / 4.0


def test_confident_instances_are_those_the_weak_view_classifies_right() -> None:
    # hand-checked: rows 0 and 2 predict their label (2, 0); row 1 predicts 0 but is labelled 1; row 3 ties 1 and 2
    # (torch.max takes the first: 1, the label)
    weak = torch.tensor([[0.1, 0.2, 3.0], [2.0, 1.0, 0.0], [5.0, -1.0, 0.0], [0.0, 1.0, 1.0]])
    labels = torch.tensor([2, 1, 0, 1])
    assert confident(weak, labels).tolist() == [True, False, True, True]


def test_the_selection_reads_the_shifted_logits_and_only_the_confident_rows_count() -> None:
    # one expert (lambda 2.5), two classes of prior 0.9 / 0.1: raw logits [0, 3] pick class 1, shifted ones
    # [2.5 log .9, 3 + 2.5 log .1] = [-0.26, -2.76] pick class 0
    prior = torch.tensor([0.9, 0.1], dtype=torch.float64).log()
    raw = torch.tensor([[[0.0, 3.0]], [[0.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)  # [w0 w1; s0 s1]
    labels = torch.tensor([0, 1, 0, 1])
    shifted = shifted_logits(raw, prior, (2.5,))
    assert confident(shifted[:2, 0], labels[:2]).tolist() == [True, False]
    # only row 0 counts: KL(softmax(w0) || softmax(s0)) over one row
    p = F.softmax(shifted[0, 0], dim=0)
    expected = (p * (p.log() - F.log_softmax(shifted[2, 0], dim=0))).sum()
    torch.testing.assert_close(consistency_loss(shifted, raw, labels), expected, rtol=1e-12, atol=0)


def test_no_confident_instance_adds_nothing_and_the_weak_view_is_only_a_target() -> None:
    experts, labels, counts = two_view_batch(5)
    experts.requires_grad_(True)
    shifted = shifted_logits(experts, log_prior(counts), LAMBDAS)
    wrong = (shifted[: len(labels) // 2].argmax(-1)[:, 0] + 1) % 5  # expert 0 never right on the weak view
    labels_wrong = wrong.repeat(2)
    value = consistency_loss(shifted[:, :1], experts[:, :1], labels_wrong)
    assert float(value.detach()) == 0.0
    value = consistency_loss(shifted, experts, labels)
    (grad,) = torch.autograd.grad(value, experts)
    half = len(labels) // 2
    assert torch.count_nonzero(grad[:half]) == 0 and torch.count_nonzero(grad[half:]) > 0


def test_the_ensemble_pairing_distils_the_deployed_prediction() -> None:
    experts, labels, counts = two_view_batch(6)
    half = len(labels) // 2
    mean = experts.mean(1)
    rows = [i for i in range(half) if int(mean[i].argmax()) == int(labels[i])]
    assert 0 < len(rows) < half
    kls = []
    for i in rows:
        p = np.exp(mean[i].numpy() - np.logaddexp.reduce(mean[i].numpy()))
        log_q = mean[half + i].numpy() - np.logaddexp.reduce(mean[half + i].numpy())
        kls.append(float((p * (np.log(p) - log_q)).sum()))
    shifted = shifted_logits(experts, log_prior(counts), LAMBDAS)
    got = consistency_loss(shifted, experts, labels, pairing="ensemble")
    assert float(got) == pytest.approx(sum(kls) / len(kls), rel=1e-12)


def test_diversity_is_each_experts_cross_entropy_on_both_views() -> None:
    experts, labels, counts = two_view_batch(7)
    shifted = shifted_logits(experts, log_prior(counts), LAMBDAS)
    expected = 0.0
    for k in range(3):
        for i in range(len(labels)):
            row = shifted[i, k].numpy()
            expected += (np.logaddexp.reduce(row) - row[int(labels[i])]) / len(labels)
    assert float(diversity_loss(shifted, labels)) == pytest.approx(expected, rel=1e-12)


def test_views_that_are_not_two_halves_of_the_same_images_are_refused() -> None:
    experts, labels, counts = two_view_batch(8)
    labels = labels.clone()
    labels[0] = (labels[0] + 1) % 5
    with pytest.raises(ValueError, match=r"data\.views: 2"):
        mdcs_loss(experts, labels, log_prior(counts))


def test_a_class_without_training_images_is_refused() -> None:
    with pytest.raises(KdkitError, match="class 2 has no training image"):
        MdcsLoss().set_prior(torch.tensor([5, 3, 0, 1]))


@pytest.mark.parametrize("classifier", ["cosine", "linear"])
def test_the_experts_are_deployed_as_their_mean_logits(classifier: str) -> None:
    torch.manual_seed(0)
    model = build_model("cnn_student", num_classes=10, in_channels=1, image_size=8)
    bridge = mdcs_experts((16, 2, 2), (10,), experts=3, classifier=classifier, hidden=0)  # type: ignore[arg-type]
    student = Student(model, {"mdcs": "penultimate"}, {"mdcs": bridge}).eval()
    x = torch.randn(4, 1, 8, 8)
    logits, per_term = student(x)
    assert per_term["mdcs"].shape == (4, 3, 10)
    torch.testing.assert_close(logits, per_term["mdcs"].mean(1))
    torch.testing.assert_close(student.predict(x), per_term["mdcs"].mean(1))
    feature = torch.randn(4, 64)
    w = bridge.experts[1].weight if classifier == "cosine" else bridge.experts[1].weight.T
    raw = feature @ w + (0 if classifier == "cosine" else bridge.experts[1].bias)
    expected = 30 * F.normalize(feature, dim=1) @ F.normalize(w, dim=0) if classifier == "cosine" else raw
    torch.testing.assert_close(MdcsExperts.forward(bridge, feature)[:, 1], expected)


def test_hidden_gives_each_expert_its_own_layer() -> None:
    bridge = mdcs_experts((16,), (10,), experts=2, hidden=8)
    assert isinstance(bridge, MdcsExperts) and bridge.output_shape((16,)) == (2, 10)
    assert bridge.experts[0][0].weight.shape == (8, 16) and bridge.experts[0][0] is not bridge.experts[1][0]


def mdcs_recipe(tiny: dict) -> dict:
    recipe = copy.deepcopy(tiny)
    recipe["data"]["views"] = 2
    recipe["data"]["subset"] = 400
    recipe["data"]["setting"] = {"name": "long_tailed", "imbalance": 10}
    recipe["distill"] = [dict(TERM)]
    recipe["train"]["ce_weight"] = 0
    return recipe


@pytest.mark.parametrize(("change", "message"), [
    ({"distill.0.bridge_params": {"experts": 1}}, "experts must be >= 2"),
    ({"data.views": 1}, "data.views is 1 (choices: 2)"),
    ({"train.ce_weight": 0.5}, "set train.ce_weight: 0"),
    ({"distill.0.lambdas": [-0.5, 1.0]}, "mdcs has 2 lambdas [-0.5, 1.0] for 3 experts"),
    ({"distill.0.bridge": None}, "loss 'mdcs' reads the output of the 'mdcs_experts' bridge"),
    ({"distill.1": dict(TERM)}, "a second `mdcs` term"),
    ({"distill.0.loss": "kd", "teacher": {"arch": "cnn_teacher", "checkpoint": "absent.safetensors"}},
     "the `mdcs_experts` bridge feeds the `mdcs` loss"),
    ({"distill.0.pairing": "mean"}, "pairing"),
    ({"data.setting": {"name": "semi_supervised", "labelled": 50}}, "method 'mdcs' needs the label of every"),
])
def test_recipes_mdcs_cannot_work_with_are_refused(change: dict, message: str, tiny: dict, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    recipe = mdcs_recipe(tiny)
    edit_recipe(recipe, change)
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert message in capsys.readouterr().err


def test_the_shipped_form_validates(tiny: dict, tmp_path: Path) -> None:
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", mdcs_recipe(tiny)))]) == 0


@pytest.mark.slow
def test_a_tiny_long_tailed_mdcs_run_deploys_the_experts_mean(tiny: dict) -> None:
    recipe = recipe_from_dict(mdcs_recipe(tiny))
    counts = torch.bincount(plan(recipe, training=True).data.train_labels, minlength=10).double()
    summary = run_recipe(recipe)
    mdcs = summary["mdcs"]
    assert mdcs["prior"] == pytest.approx((counts / counts.sum()).tolist(), abs=1e-6)
    assert mdcs["prior"][0] > 5 * mdcs["prior"][-1]  # the setting's long tail, not a uniform or hard-coded prior
    assert len(mdcs["expert_top1"]) == 3 and mdcs["lambdas"] == list(LAMBDAS)
    assert summary["last_top1"] == pytest.approx(mdcs["ensemble_top1"], abs=1e-4)  # the deployed prediction
    assert summary["bridge_params"] == 3 * 16 * 2 * 2 * 10
    rows = json.loads((Path(tiny["output"]["dir"]) / "metrics.json").read_text())
    assert all("train_mdcs" in r and "train_ce" not in r for r in rows)


@pytest.mark.slow
def test_mdcs_resumes_exactly(tiny: dict, tmp_path: Path) -> None:
    recipe = mdcs_recipe(tiny)
    recipe["distill"][0]["warmup"] = 2.0  # the consistency ramp is mid-way when the run is interrupted
    straight, broken = straight_and_resumed(recipe, tmp_path, 5)
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((broken / "metrics.json").read_text())
    assert [(r["train_loss"], r["test_top1"]) for r in a] == [(r["train_loss"], r["test_top1"]) for r in b]


def test_the_long_tailed_suite_is_a_benchmark_suite_with_its_baselines_first() -> None:
    assert "long_tailed" in suites()
    assert method_recipes("long_tailed") == ["student_ce", "kd", "mdcs"]


def test_a_run_whose_setting_leaves_a_class_empty_stops_before_training(tiny: dict, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    recipe = mdcs_recipe(tiny)
    recipe["data"]["setting"] = {"name": "long_tailed", "imbalance": 100, "max_per_class": 20}  # tail: int(0.2) = 0
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert "has no training image, so MDCS's prior shift" in capsys.readouterr().err
    assert not (Path(tiny["output"]["dir"]) / "metrics.json").exists()
