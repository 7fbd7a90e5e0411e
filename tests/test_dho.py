"""DHO (dual-head optimisation): the KD term against the official code's computation, the deployed combination of
the two heads, the refusals, and a tiny semi-supervised run end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import edit_recipe, straight_and_resumed, write_recipe
from kdkit.bench.methods import method_recipes, suites
from kdkit.cli import main
from kdkit.data import UNLABELLED
from kdkit.distill import Student
from kdkit.methods.dho import DhoHead, combine_heads, dho_head, dho_kd_loss
from kdkit.models import build_model
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe

TERM = {"loss": "dho", "weight": 0.5, "student": "penultimate", "bridge": "dho_head", "temperature": 2,
        "bridge_params": {"alpha": 0.5, "beta": 1.0}}


def official_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The official code's KD term of one batch (train_others.py): kl_div(batchmean) * T^2."""
    return F.kl_div(F.log_softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1),
                    reduction="batchmean") * temperature**2


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(7, 5, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(7, 5, generator=gen, dtype=torch.float64) * 3
    labels = torch.tensor([1, UNLABELLED, 0, UNLABELLED, UNLABELLED, 4, UNLABELLED])
    return student, teacher, labels


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_union_average_is_the_kd_mean_over_every_sample(temperature: float) -> None:
    student, teacher, labels = batch()
    value = dho_kd_loss(student, teacher, labels, temperature, "union")
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, official_kd(student, teacher, temperature), rtol=1e-12, atol=0)


def test_split_average_is_the_official_codes_labelled_plus_unlabelled_batch_means() -> None:
    student, teacher, labels = batch()
    lab, unl = labels != UNLABELLED, labels == UNLABELLED
    expected = official_kd(student[lab], teacher[lab], 2.0) + official_kd(student[unl], teacher[unl], 2.0)
    torch.testing.assert_close(dho_kd_loss(student, teacher, labels, 2.0, "split"), expected, rtol=1e-12, atol=0)
    # a batch without unlabelled samples: its labelled mean alone (the empty part adds 0, not NaN)
    all_labelled = torch.arange(7) % 5
    torch.testing.assert_close(dho_kd_loss(student, teacher, all_labelled, 2.0, "split"),
                               official_kd(student, teacher, 2.0), rtol=1e-12, atol=0)


def test_the_deployed_combination_mixes_the_two_heads_probabilities() -> None:
    student, teacher, _ = batch()
    for alpha, beta in ((0.5, 1.0), (0.3, 0.5), (0.8, 2.0)):
        mix = alpha * torch.softmax(student, 1) + (1 - alpha) * torch.softmax(teacher / beta, 1)
        torch.testing.assert_close(combine_heads(student, teacher, alpha, beta), mix.log(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(combine_heads(student, teacher, 1.0, 0.5), torch.log_softmax(student, 1))  # CE head
    torch.testing.assert_close(combine_heads(student, teacher, 0.0, 0.5), torch.log_softmax(teacher / 0.5, 1))
    big = torch.tensor([[2000.0, 0.0], [0.0, -3000.0]])
    assert torch.isfinite(combine_heads(big, -big, 0.5, 1.0)).all()  # no underflow to log(0)


def student_with_head(alpha: float = 0.3, beta: float = 0.5) -> tuple[Student, torch.nn.Module, DhoHead]:
    torch.manual_seed(0)
    model = build_model("cnn_student", num_classes=10, in_channels=1, image_size=8)
    head = dho_head((16 * 2 * 2,), (10,), alpha=alpha, beta=beta)
    return Student(model, {"dho": "penultimate"}, {"dho": head}), model, head


def test_training_keeps_the_models_logits_and_the_deployed_network_combines_both_heads() -> None:
    student, model, head = student_with_head()
    x = torch.randn(4, 1, 8, 8)
    student.eval()
    logits, per_term = student(x)
    feature = model.stage2(model.stage1(x)).flatten(1)  # the shared feature, computed apart
    torch.testing.assert_close(logits, model.fc(feature))  # training: the CE head is the model's own classifier
    torch.testing.assert_close(per_term["dho"], head.linear(feature))  # the loss reads the KD head
    deployed = student.predict(x)
    mix = 0.3 * torch.softmax(model.fc(feature), 1) + 0.7 * torch.softmax(head.linear(feature) / 0.5, 1)
    torch.testing.assert_close(deployed, mix.log())
    assert deployed.argmax(1).tolist() == mix.argmax(1).tolist()


@pytest.mark.parametrize(("change", "message"), [
    ({"train.ce_weight": 0}, "set train.ce_weight > 0"),
    ({"distill.0.bridge": None}, "loss 'dho' reads the output of the 'dho_head' bridge"),
    ({"distill.1": dict(TERM)}, "a second `dho` term"),
    ({"distill.0.bridge_params.alpha": 1.5}, "alpha must be in [0, 1]"),
    ({"distill.0.average": "both"}, "average"),
])
def test_recipes_dho_cannot_work_with_are_refused(change: dict, message: str, tiny_kd: dict, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    recipe = dho_recipe(tiny_kd)
    edit_recipe(recipe, change)
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert message in capsys.readouterr().err


def dho_recipe(tiny_kd: dict) -> dict:
    recipe = copy.deepcopy(tiny_kd)
    recipe["data"]["setting"] = {"name": "semi_supervised", "labelled": 50}
    recipe["distill"] = [dict(TERM, bridge_params=dict(TERM["bridge_params"]))]
    recipe["train"]["ce_weight"] = 0.5
    return recipe


@pytest.mark.slow
def test_a_tiny_semi_supervised_dho_run_deploys_both_heads(tiny_kd: dict) -> None:
    summary = run_recipe(recipe_from_dict(dho_recipe(tiny_kd)))
    head = 16 * 2 * 2 * 10 + 10
    assert summary["bridge_params"] == head and summary["deployed"]["params"] == summary["params"] + head
    dho = summary["dho"]
    assert (dho["alpha"], dho["beta"]) == (0.5, 1.0) and set(dho["top1_by_alpha"]) == {f"{i / 10:.1f}"
                                                                                         for i in range(11)}
    assert dho["top1_by_alpha"]["1.0"] == dho["ce_head_top1"]
    # the run evaluates the deployed combination: its last top-1 is the sweep's at the recipe's alpha
    assert summary["last_top1"] == pytest.approx(dho["top1_by_alpha"]["0.5"], abs=1e-4)
    rows = json.loads((Path(tiny_kd["output"]["dir"]) / "metrics.json").read_text())
    assert all("train_dho" in r and "train_ce" in r for r in rows)


@pytest.mark.slow
def test_dho_resumes_exactly(tiny_kd: dict, tmp_path: Path) -> None:
    straight, broken = straight_and_resumed(dho_recipe(tiny_kd), tmp_path, 8)
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((broken / "metrics.json").read_text())
    assert [(r["train_loss"], r["test_top1"]) for r in a] == [(r["train_loss"], r["test_top1"]) for r in b]


def test_the_semi_supervised_suite_is_a_benchmark_suite_with_its_baselines_first() -> None:
    assert "semi_supervised" in suites()
    assert method_recipes("semi_supervised") == ["student_ce", "kd", "dho", "distill_nearest", "distill_weighted",
                                                "label_free"]
