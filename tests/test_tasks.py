"""Tasks: what a batch's targets are, the supervised loss, the metrics (by name) and what picks the best epoch."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from conftest import write_recipe
from kdkit.cli import main
from kdkit.data import DATASETS, ImageData, load_dataset
from kdkit.distributed import DistContext
from kdkit.models import build_model
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe
from kdkit.task import TASKS


def multilabel_digits(root: object = None) -> ImageData:
    """Digits with multi-hot targets: the digit, plus the next digit for every other image (1-2 labels)."""
    data = load_dataset("digits")

    def hot(labels: torch.Tensor) -> torch.Tensor:
        targets = torch.nn.functional.one_hot(labels, 10).to(torch.uint8)
        extra = torch.nn.functional.one_hot((labels + 1) % 10, 10).to(torch.uint8)
        targets[::2] |= extra[::2]
        return targets

    return ImageData("digits_multilabel", data.train_images, data.train_labels, data.test_images, data.test_labels,
                     data.classes, data.mean, data.std, "digits + multi-hot targets (test)",
                     train_targets={"multilabel": hot(data.train_labels)},
                     test_targets={"multilabel": hot(data.test_labels)})


@pytest.fixture
def multilabel(tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setitem(DATASETS._entries, "digits_multilabel", multilabel_digits)  # a test-only dataset
    torch.manual_seed(5)
    teacher = build_model("cnn_teacher", num_classes=10, in_channels=1, image_size=8, params={"head": "queries"})
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp_path / "t.safetensors"))
    tiny["task"] = "multilabel"
    tiny["data"]["dataset"] = "digits_multilabel"
    tiny["model"]["params"] = {"head": "queries"}
    tiny["teacher"] = {"arch": "cnn_teacher", "params": {"head": "queries"},
                       "checkpoint": str(tmp_path / "t.safetensors")}
    tiny["distill"] = [{"loss": "multilabel_kd", "weight": 10.0}, {"loss": "label_relation", "weight": 1.0}]
    return tiny


@pytest.mark.slow
def test_multilabel_distillation_runs_in_its_setting(multilabel: dict) -> None:
    summary = run_recipe(recipe_from_dict(multilabel))
    assert summary["task"] == "multilabel" and summary["metric"] == "map"
    rows = json.loads((Path(multilabel["output"]["dir"]) / "metrics.json").read_text())
    assert summary["best_map"] == max(r["test_map"] for r in rows)
    assert {"train_bce", "train_multilabel_kd", "train_label_relation", "train_label_acc", "test_f1"} <= set(rows[-1])
    assert "test_top1" not in rows[-1]  # the engine knows no top-1: it reports the task's metrics


def test_multilabel_targets_are_the_multi_hot_rows_of_the_batch(multilabel: dict) -> None:
    data = multilabel_digits()
    bound = TASKS.get("multilabel").bind(data, "cpu")
    index = torch.tensor([3, 0, 7])
    targets = bound.targets(data.train_labels[index], index, "train")
    assert torch.equal(targets, data.train_targets["multilabel"][index].float())
    assert torch.equal(bound.targets(data.test_labels[:2], torch.arange(2), "test"),
                       data.test_targets["multilabel"][:2].float())


def test_multilabel_metrics_match_scikit_learn() -> None:
    gen = torch.Generator().manual_seed(0)
    targets = (torch.rand(64, 10, generator=gen) < 0.3).float()
    targets[0] = 1.0  # every label has a positive
    logits = torch.randn(64, 10, generator=gen) + 2 * targets
    bound = TASKS.get("multilabel").bind(multilabel_digits(), "cpu")
    evaluator = bound.evaluator(DistContext())
    for part in (slice(0, 30), slice(30, 64)):  # accumulated over batches
        evaluator.update(logits[part], targets[part])
    metrics = evaluator.compute()
    y, scores = targets.numpy().astype(int), logits.numpy()
    assert metrics["map"] == pytest.approx(100 * average_precision_score(y, scores, average="macro"), abs=1e-4)
    predicted = (1 / (1 + np.exp(-scores)) > 0.5).astype(int)
    assert metrics["f1"] == pytest.approx(100 * f1_score(y, predicted, average="macro", zero_division=0), abs=1e-4)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert metrics["loss"] == pytest.approx(float(bce), rel=1e-6)


def test_classification_metrics_are_counted_exactly() -> None:
    bound = TASKS.get("classification").bind(None, "cpu")
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    evaluator = bound.evaluator(DistContext())
    evaluator.update(logits, torch.tensor([1, 5]))  # second best for the first, best for the second
    metrics = evaluator.compute()
    assert metrics["top1"] == 50.0 and metrics["top5"] == 100.0
    assert metrics["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, torch.tensor([1, 5]))))


def test_a_task_the_data_cannot_serve_fails_before_training(tiny: dict, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    tiny["task"] = "multilabel"
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", tiny))]) == 2
    err = capsys.readouterr().err
    assert "'multilabel'" in err and "does not provide" in err and "classification" in err
    tiny["task"] = "multilabell"
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", tiny))]) == 2
    assert "valid choices: multilabel" in capsys.readouterr().err  # the closest registered task, first


@pytest.mark.parametrize(("override", "expected"), [
    ("train.best_metric=top3", "top1"),          # no such metric: the choices are listed
    ("train.best_metric=loss", "top1"),          # lower is better: not a way to pick the best epoch
])
def test_the_best_metric_is_one_the_task_reports(tiny: dict, tmp_path: Path, override: str, expected: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", tiny)), override]) == 2
    err = capsys.readouterr().err
    assert "train.best_metric" in err and expected in err


@pytest.mark.slow
def test_best_metric_picks_the_best_epoch(tiny: dict) -> None:
    summary = run_recipe(recipe_from_dict(copy.deepcopy(tiny), ["train.best_metric=top5"]))
    assert summary["metric"] == "top5" and "best_top5" in summary


def test_label_smoothing_is_refused_for_multilabel(multilabel: dict) -> None:
    from kdkit.errors import KdkitError

    with pytest.raises(KdkitError, match="label_smoothing"):
        run_recipe(recipe_from_dict(multilabel, ["train.label_smoothing=0.1"]))


def three_digits(root: object = None) -> ImageData:
    """Digits 0, 1 and 2 only: a 3-class dataset, where top-5 accuracy is 100 % by construction."""
    data = load_dataset("digits")
    train, test = data.train_labels < 3, data.test_labels < 3
    return ImageData("digits_3", data.train_images[train], data.train_labels[train], data.test_images[test],
                     data.test_labels[test], data.classes[:3], data.mean, data.std, "digits 0-2 (test)")


def test_top5_is_reported_only_with_more_than_five_classes() -> None:
    task = TASKS.get("classification")
    assert task.bind(load_dataset("digits"), "cpu").metrics == ("top1", "top5", "loss")
    bound = task.bind(three_digits(), "cpu")
    assert bound.metrics == ("top1", "loss")
    evaluator = bound.evaluator(DistContext())
    evaluator.update(torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]), torch.tensor([0, 1]))
    assert evaluator.compute() == {"loss": pytest.approx(0.9076, abs=1e-4), "top1": 50.0}


@pytest.mark.slow
def test_a_run_on_three_classes_shows_no_top5(tiny: dict, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(DATASETS._entries, "digits_3", three_digits)  # a test-only dataset
    tiny["data"] = {"dataset": "digits_3", "augment": {"hflip": False, "crop_padding": 1}}
    summary = run_recipe(recipe_from_dict(tiny, ["train.epochs=1", "output.progress=true"]))
    rows = json.loads((Path(tiny["output"]["dir"]) / "metrics.json").read_text())
    assert "test_top1" in rows[-1] and "test_top5" not in rows[-1] and "last_top5" not in summary
    printed = capsys.readouterr().out
    assert "test top1" in printed and "top5" not in printed
    # nor can it pick the best epoch: refused before training, the choices named
    assert main(["validate", str(write_recipe(Path(tiny["output"]["dir"]).parent / "r.yaml", tiny)),
                 "train.best_metric=top5"]) == 2
    err = capsys.readouterr().err
    assert "'top5'" in err and "digits_3" in err and "top1" in err


def test_a_task_declares_how_its_outputs_become_probabilities() -> None:
    from kdkit.task import Task, register_task

    assert {name: task.probabilities for name, task in TASKS.items()} == {"classification": "softmax",
                                                                         "multilabel": "sigmoid",
                                                                         "segmentation": "softmax", "detection": "",
                                                                         "seg_boundary": ""}

    class Scores(Task):
        """Outputs that are probabilities some other way."""

        name, metrics, best, probabilities = "scores", ("top1",), "top1", "relu"

    with pytest.raises(TypeError, match="probabilities is 'relu'; use one of"):
        register_task(Scores)
    assert "scores" not in TASKS


def shipped_with_terms(suite: str, terms: list[dict], tmp_path: Path) -> Path:
    """The labels-only student recipe of ``recipes/<suite>/`` with ``terms`` and a (missing) teacher file, written to
    ``tmp_path``."""
    import yaml

    folder = Path(__file__).parents[1] / "recipes" / suite
    recipe = yaml.safe_load((folder / "teacher.yaml").read_text())
    student = yaml.safe_load(next(folder.glob("student_*.yaml")).read_text())
    student["teacher"] = {**recipe["model"], "checkpoint": str(tmp_path / "teacher.safetensors")}
    student["distill"] = terms
    return write_recipe(tmp_path / "recipe.yaml", student)


@pytest.mark.parametrize(("suite", "loss", "layout", "choices"), [
    ("scenes_det", "kd", "dense per-location detector outputs", "valid choices: bckd, old_det_kd, ld, iod"),
    ("scenes_det", "dkd", "dense per-location detector outputs", "valid choices: bckd, old_det_kd, ld, iod"),
    ("scenes_seg", "kd", "per-pixel class scores (B, K, H, W)", "valid choices: old_kd, pixel_kd"),
    ("scenes", "dist", "independent per-class scores (B, K)", "valid choices: multilabel_kd"),
    ("scenes_multitask", "kd", "per-pixel class scores and a boundary score (B, K + 2, H, W)",
     "valid choices: multitask_kd, cs_multitask"),
])
def test_a_classification_loss_on_another_tasks_logits_is_refused_naming_the_losses_made_for_them(
        suite: str, loss: str, layout: str, choices: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = shipped_with_terms(suite, [{"loss": loss}], tmp_path)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"distill.0.loss: loss {loss!r} reads class scores (B, K)" in err and layout in err and choices in err
    assert "add a `bridge:`" in err


@pytest.mark.parametrize(("suite", "terms"), [
    # a distance reads any tensor; LD reads detections
    ("scenes_det", [{"loss": "mse", "student": "logits", "teacher": "logits"}, {"loss": "ld"}]),
    ("scenes_seg", [{"loss": "pixel_kd"}, {"loss": "cwd"}]),
    ("scenes", [{"loss": "multilabel_kd"}]),
    ("scenes_multitask", [{"loss": "cs_multitask"}, {"loss": "multitask_kd"}]),
])
def test_losses_that_read_a_dense_tasks_logits_validate(suite: str, terms: list[dict], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(shipped_with_terms(suite, terms, tmp_path))]) == 0, capsys.readouterr().err


def test_a_dense_loss_on_class_logits_is_refused(tiny_kd: dict, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    tiny_kd["distill"] = [{"loss": "pixel_kd"}]
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", tiny_kd))]) == 2
    err = capsys.readouterr().err
    assert "loss 'pixel_kd' reads per-pixel class scores" in err and "task 'classification' are class scores" in err
    listed = err.split("valid choices: ")[1].split("; fix")[0].split(", ")
    assert {"kd", "dkd"} <= set(listed) and "pixel_kd" not in listed  # the losses that read class scores
