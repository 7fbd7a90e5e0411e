"""Chance level: each task says what a model that learned nothing scores; the engine warns when a run sits there."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

import kdkit
from kdkit.data.loader import BatchLoader
from kdkit.engine import CHANCE_EPOCHS, Engine
from kdkit.task import TASKS


def test_classification_chance_is_the_commonest_test_class_share() -> None:
    balanced = SimpleNamespace(test_labels=torch.arange(30) % 3, num_classes=3)
    assert TASKS.get("classification").bind(balanced, "cpu").chance() == pytest.approx({"top1": 100 / 3})
    skewed = SimpleNamespace(test_labels=torch.tensor([0] * 7 + [1] * 2 + [2]), num_classes=10)
    chance = TASKS.get("classification").bind(skewed, "cpu").chance()
    assert chance == pytest.approx({"top1": 70.0, "top5": 100.0})  # always answering class 0 scores 70 %


def test_multilabel_chance_is_the_mean_test_prevalence() -> None:
    targets = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.uint8)
    data = SimpleNamespace(train_targets={"multilabel": targets}, test_targets={"multilabel": targets})
    assert TASKS.get("multilabel").bind(data, "cpu").chance() == pytest.approx({"map": 100 * (3 + 1 + 1 + 0) / 16})


class Constant(nn.Module):
    """Trainable logits that ignore the image: every sample gets the same prediction."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits.expand(len(x), -1)


def engine_on_two_classes(model: nn.Module, run_dir: Path, epochs: int, eval_every: int = 1) -> Engine:
    """An engine on 32 1x4x4 images whose brightness gives their class (0: dark, 1: bright), test = train."""
    labels = torch.arange(32) % 2
    images = (labels * 200 + torch.arange(32) % 50).to(torch.uint8).view(32, 1, 1, 1).expand(32, 1, 4, 4).clone()
    norm = {"mean": (0.5,), "std": (0.25,)}
    train = BatchLoader(images, labels, batch_size=8, **norm)
    test = BatchLoader(images, labels, batch_size=32, shuffle=False, drop_last=False, **norm)
    task = TASKS.get("classification").bind(SimpleNamespace(test_labels=labels, num_classes=2), "cpu")
    spec = kdkit.TrainSpec(epochs=epochs, batch_size=8, optimizer={"lr": 0.5})
    return Engine(student=kdkit.Student(model), objective=kdkit.Objective(), train_loader=train, eval_loader=test,
                  epochs=epochs, make_optimizer=kdkit.optimizer_factory(spec), run_dir=run_dir, progress=False,
                  task=task, eval_every=eval_every)


def test_a_run_at_chance_level_warns_once_and_records_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    epochs = CHANCE_EPOCHS + 1
    result = engine_on_two_classes(Constant(2), tmp_path / "run", epochs).fit()
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["test_top1"] for r in rows] == [50.0] * epochs and [r["chance_top1"] for r in rows] == [50.0] * epochs
    err = capsys.readouterr().err
    assert err.count("warning: test top1 sat at chance level (50") == 1  # printed when the streak got long enough
    assert f"in {CHANCE_EPOCHS} consecutive evaluations (epochs 1-{CHANCE_EPOCHS})" in err
    assert len(result.warnings) == 1
    assert f"in {epochs} consecutive evaluations (epochs 1-{epochs})" in result.warnings[0]


def test_eval_every_evaluates_every_nth_and_the_last_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 7 epochs, every 3rd: epochs 3, 6 and 7 (the last) are evaluated; a streak counts evaluations, not epochs
    epochs = 7
    result = engine_on_two_classes(Constant(2), tmp_path / "run", epochs, eval_every=3).fit()
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["epoch"] for r in rows if "test_top1" in r] == [3, 6, 7]
    assert all("best_top1" not in r for r in rows[:2]) and all("train_loss" in r for r in rows)
    assert result.best_epoch == 3 and result.last["top1"] == 50.0
    err = capsys.readouterr().err
    assert err.count("sat at chance level") == 1 and "in 3 consecutive evaluations (epochs 3-7)" in err


def test_eval_every_picks_the_best_among_evaluated_epochs(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    result = engine_on_two_classes(model, tmp_path / "run", 4, eval_every=2).fit()
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["epoch"] for r in rows if "test_top1" in r] == [2, 4] and result.best_epoch in (2, 4)
    assert result.warnings == []


def test_eval_every_below_one_is_refused() -> None:
    with pytest.raises(kdkit.KdkitError, match="eval_every must be at least 1"):
        engine_on_two_classes(Constant(2), None, 2, eval_every=0)


def test_a_run_that_learns_does_not_warn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    result = engine_on_two_classes(model, tmp_path / "run", CHANCE_EPOCHS).fit()
    assert result.best == 100.0 and result.warnings == [] and "chance" not in capsys.readouterr().err


def three_digit_folder(root: Path) -> Path:
    """The digits 0, 1 and 2 of scikit-learn's set as an image folder of 8x8 grayscale PNGs (430 train, 110 val)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for split, part in (("train", slice(0, 1200)), ("val", slice(1200, None))):
        for i, (image, label) in enumerate(zip(digits.images[part], digits.target[part], strict=True)):
            if label < 3:
                folder = root / split / f"digit{label}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray((image * 16).clip(0, 255).astype("uint8")).save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_dkd_on_three_classes_warms_up_by_default_and_learns(tmp_path: Path) -> None:
    # Issue #10: `{loss: dkd, weight: 1.0}` on a 3-class folder gave exactly chance accuracy. At full weight from
    # the first step DKD's logit gradient is ~8x the CE's; the first SGD steps killed the student (constant
    # predictions). The reference DKD always ramps its weight over 20 epochs, which a dkd term now does by default.
    from kdkit.recipe import recipe_from_dict
    from kdkit.runner import run_recipe

    recipe = {"name": "three", "model": {"arch": "cnn_teacher"},
              "data": {"dataset": "image_folder", "root": str(three_digit_folder(tmp_path / "data")),
                       "params": {"image_size": 8, "grayscale": True}, "augment": {"hflip": False, "crop_padding": 1}},
              "train": {"epochs": 3, "batch_size": 32, "eval_batch_size": 256, "seed": 0,
                        "schedule": {"name": "cosine", "warmup_steps": 10}},
              "output": {"progress": False, "dir": str(tmp_path / "teacher")}}
    assert run_recipe(recipe_from_dict(recipe))["best_top1"] > 90
    recipe.update({"model": {"arch": "cnn_student"}, "teacher": {"arch": "cnn_teacher", "checkpoint": str(tmp_path /
                   "teacher")}, "distill": [{"loss": "dkd", "weight": 1.0}]})
    recipe["train"].update({"epochs": 2, "ce_weight": 1.0, "schedule": {"name": "cosine"}})
    default = recipe_from_dict(recipe, [f"output.dir={tmp_path / 'default'}"])
    assert default.distill[0].warmup_epochs == 20.0  # the resolved recipe shows it
    summary = run_recipe(default)
    assert summary["last_top1"] > 80 and summary["warnings"] == []
    # without the ramp the same run collapses, and the summary says so
    unramped = run_recipe(recipe_from_dict(recipe, [f"output.dir={tmp_path / 'unramped'}",
                                                    "distill.0.warmup_epochs=0"]))
    assert unramped["last_top1"] < 45 and "sat at chance level" in unramped["warnings"][0]


def test_a_loss_without_a_reference_warm_up_keeps_none(tiny_kd: dict) -> None:
    from kdkit.recipe import recipe_from_dict

    tiny_kd["distill"].append({"loss": "dkd", "weight": 1.0, "warmup_epochs": 5})
    recipe = recipe_from_dict(tiny_kd)
    assert [t.warmup_epochs for t in recipe.distill] == [0.0, 5.0]  # kd: none; an explicit value is kept
