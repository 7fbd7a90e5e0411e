"""The segmentation task: per-pixel targets, loss and metrics; networks with background + K outputs; no augmentation
that would move the image but not its mask; a distillation run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import write_recipe
from kdkit.bench.methods import METRIC_HEADERS, method_recipes, suites
from kdkit.build import plan
from kdkit.cli import main
from kdkit.data import DATASETS, ImageData
from kdkit.data.base import UNLABELLED
from kdkit.distributed import DistContext
from kdkit.models import build_model
from kdkit.recipe import find_recipe, load_recipe, recipe_from_dict, set_by_path
from kdkit.runner import run_recipe
from kdkit.task import TASKS

SIZE, CLASSES = 16, 3


def squares(root: object = None, n_train: int = 96, n_test: int = 32) -> ImageData:
    """One filled square per 16x16 image, its grey level telling its class (3 classes); the mask is ``class + 1`` on
    the square and 0 elsewhere. The label is the square's class."""
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = torch.zeros(n, 1, SIZE, SIZE, dtype=torch.uint8)
        masks = torch.zeros(n, SIZE, SIZE, dtype=torch.uint8)
        labels = torch.randint(0, CLASSES, (n,), generator=gen)
        for i in range(n):
            side = int(torch.randint(4, 8, (1,), generator=gen))
            y, x = (int(v) for v in torch.randint(0, SIZE - side + 1, (2,), generator=gen))
            images[i, 0, y:y + side, x:x + side] = 80 * (int(labels[i]) + 1)
            masks[i, y:y + side, x:x + side] = int(labels[i]) + 1
        return images, labels, masks

    train_images, train_labels, train_masks = split(n_train)
    test_images, test_labels, test_masks = split(n_test)
    return ImageData("squares", train_images, train_labels, test_images, test_labels, ("dark", "grey", "light"),
                     (0.1,), (0.3,), "squares (test)", train_targets={"semantic": train_masks},
                     test_targets={"semantic": test_masks})


@pytest.fixture
def segmentation(tiny: dict, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The tiny recipe on ``squares`` with the segmentation task, the segnet student and no augmentation."""
    monkeypatch.setitem(DATASETS._entries, "squares", squares)  # a test-only dataset
    tiny["task"] = "segmentation"
    tiny["model"] = {"arch": "segnet_student", "params": {"width": 4}}
    tiny["data"] = {"dataset": "squares"}
    tiny["train"]["batch_size"] = 16
    return tiny


def test_targets_are_the_batch_masks_and_an_unlabelled_sample_is_ignored() -> None:
    data = squares()
    bound = TASKS.get("segmentation").bind(data, torch.device("cpu"))
    index = torch.tensor([5, 0, 9])
    labels = data.train_labels[index].clone()
    assert torch.equal(bound.targets(labels, index, "train"), data.train_targets["semantic"][index].long())
    assert torch.equal(bound.targets(data.test_labels[:2], torch.arange(2), "test"),
                       data.test_targets["semantic"][:2].long())
    labels[1] = UNLABELLED
    targets = bound.targets(labels, index, "train")
    assert (targets[1] == UNLABELLED).all() and torch.equal(targets[0], data.train_targets["semantic"][5].long())
    logits = torch.randn(3, CLASSES + 1, SIZE, SIZE, requires_grad=True)
    # the loss and the training score are those of the two labelled samples alone
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], targets[[0, 2]])
    torch.testing.assert_close(bound.loss(logits, targets), expected)
    score, scored = bound.train_score(logits, targets)
    right = (logits.detach()[[0, 2]].argmax(1) == targets[[0, 2]]).float().mean((1, 2)).sum()
    assert scored.item() == 2 and score.item() == pytest.approx(right.item())
    none = bound.loss(logits, torch.full_like(targets, UNLABELLED))
    none.backward()
    assert none.item() == 0.0 and torch.isfinite(logits.grad).all()


def reference_metrics(logits: np.ndarray, masks: np.ndarray, classes: int) -> dict[str, float]:
    """mIoU over the classes (a class absent from truth and prediction left out), pixel accuracy and mean per-pixel
    cross-entropy, from a confusion matrix and a log-sum-exp written out here."""
    predicted = logits.argmax(1).ravel()
    truth = masks.ravel()
    confusion = np.zeros((classes, classes))
    for t, p in zip(truth, predicted, strict=True):
        confusion[t, p] += 1
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    miou = float(np.mean(tp[union > 0] / union[union > 0]))
    flat = logits.transpose(0, 2, 3, 1).reshape(-1, classes)
    top = flat.max(1, keepdims=True)
    log_z = (top + np.log(np.exp(flat - top).sum(1, keepdims=True))).ravel()
    ce = float(np.mean(log_z - flat[np.arange(len(truth)), truth]))
    return {"miou": 100 * miou, "pixel_acc": 100 * float(tp.sum() / len(truth)), "loss": ce}


def test_metrics_match_a_confusion_matrix_over_every_test_pixel() -> None:
    data = squares()
    bound = TASKS.get("segmentation").bind(data, torch.device("cpu"))
    masks = data.test_targets["semantic"].long()
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(len(masks), CLASSES + 1, SIZE, SIZE, generator=gen)
    logits += 2.0 * torch.nn.functional.one_hot(masks, CLASSES + 1).permute(0, 3, 1, 2)  # better than chance
    evaluator = bound.evaluator(DistContext())
    for part in (slice(0, 10), slice(10, None)):  # accumulated over batches
        evaluator.update(logits[part], masks[part])
    got = evaluator.compute()
    expected = reference_metrics(logits.double().numpy(), masks.numpy(), CLASSES + 1)
    assert got["miou"] == pytest.approx(expected["miou"], abs=1e-4)
    assert got["pixel_acc"] == pytest.approx(expected["pixel_acc"], abs=1e-4)
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert 0 < got["miou"] < 100 and set(got) == set(bound.metrics) == {"miou", "pixel_acc", "loss"}


def test_chance_is_what_calling_every_pixel_background_scores() -> None:
    data = squares()
    bound = TASKS.get("segmentation").bind(data, torch.device("cpu"))
    masks = data.test_targets["semantic"].long()
    evaluator = bound.evaluator(DistContext())
    background = torch.zeros(len(masks), CLASSES + 1, SIZE, SIZE)
    background[:, 0] = 1.0
    evaluator.update(background, masks)
    got, chance = evaluator.compute(), bound.chance()
    share = float((masks == 0).double().mean())
    assert chance == pytest.approx({"miou": 100 * share / (CLASSES + 1), "pixel_acc": 100 * share})
    assert got["miou"] == pytest.approx(chance["miou"], abs=1e-4)
    assert got["pixel_acc"] == pytest.approx(chance["pixel_acc"], abs=1e-4)


def test_void_pixels_count_for_no_loss_score_or_metric() -> None:
    """IGNORE (255) marks pixels whose truth a dataset does not give (VOC's borders, COCO's crowds)."""
    from kdkit.data.dense import IGNORE

    data = squares()
    for masks in (data.train_targets["semantic"], data.test_targets["semantic"]):
        masks[:, 0, :] = IGNORE  # a void top row in every image, as VOC's object borders
    bound = TASKS.get("segmentation").bind(data, torch.device("cpu"))
    index = torch.arange(4)
    targets = bound.targets(data.train_labels[index], index, "train")
    assert (targets[:, 0, :] == UNLABELLED).all() and (targets[:, 1:, :] != UNLABELLED).all()
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, CLASSES + 1, SIZE, SIZE, generator=gen)
    kept_logits, kept = logits[:, :, 1:, :], targets[:, 1:, :]
    torch.testing.assert_close(bound.loss(logits, targets), torch.nn.functional.cross_entropy(kept_logits, kept))
    score, scored = bound.train_score(logits, targets)
    right = (kept_logits.argmax(1) == kept).float().mean((1, 2)).sum()
    assert scored.item() == 4 and score.item() == pytest.approx(right.item())
    test_masks = data.test_targets["semantic"].long()
    test_targets = bound.targets(data.test_labels, torch.arange(len(test_masks)), "test")
    test_logits = torch.randn(len(test_masks), CLASSES + 1, SIZE, SIZE, generator=gen)
    evaluator = bound.evaluator(DistContext())
    evaluator.update(test_logits, test_targets)
    got = evaluator.compute()
    expected = reference_metrics(test_logits[:, :, 1:, :].double().numpy(), test_masks[:, 1:, :].numpy(), CLASSES + 1)
    assert got == pytest.approx(expected, abs=1e-4, rel=1e-5)
    share = float((test_masks[:, 1:, :] == 0).double().mean())
    assert bound.chance() == pytest.approx({"miou": 100 * share / (CLASSES + 1), "pixel_acc": 100 * share})


def test_label_smoothing_reaches_the_per_pixel_cross_entropy() -> None:
    data = squares()
    bound = TASKS.get("segmentation").bind(data, torch.device("cpu"), label_smoothing=0.2)
    index = torch.arange(4)
    targets = bound.targets(data.train_labels[index], index, "train")
    logits = torch.randn(4, CLASSES + 1, SIZE, SIZE, dtype=torch.float64)
    log_p = torch.log_softmax(logits, 1)
    nll = -log_p.gather(1, targets[:, None]).squeeze(1)
    uniform = -log_p.mean(1)  # the smoothing's share spread evenly over the K + 1 classes
    expected = (0.8 * nll + 0.2 * uniform).mean()
    torch.testing.assert_close(bound.loss(logits, targets), expected)
    assert bound.loss(logits, targets).dtype == torch.float64


def test_a_segmentation_recipe_builds_networks_with_background_plus_the_classes(segmentation: dict) -> None:
    built = plan(recipe_from_dict(segmentation), training=True)
    x = torch.randn(2, 1, SIZE, SIZE)
    logits, _ = built.student(x)
    assert logits.shape == (2, CLASSES + 1, SIZE, SIZE)
    assert TASKS.get("segmentation").outputs(CLASSES) == CLASSES + 1
    assert TASKS.get("classification").outputs(CLASSES) == CLASSES


def test_data_without_masks_of_the_image_size_cannot_serve_segmentation() -> None:
    data = squares()
    task = TASKS.get("segmentation")
    assert task.check_data(data) is None
    bad = ImageData("squares", data.train_images, data.train_labels, data.test_images, data.test_labels,
                    data.classes, data.mean, data.std, "test", train_targets={"semantic": data.train_targets[
                        "semantic"][:, :8]}, test_targets=data.test_targets)
    assert "images' size" in task.check_data(bad)


MOVED = ("moves each image's 'semantic' targets with the random crop and flip of data.augment only, so they "
         "would not follow")


@pytest.mark.parametrize(("key", "value", "why", "fix"), [
    ("data.views", 2, MOVED, "views: 1"),
    ("tst", {"policy_epochs": [1]}, MOVED, "leave method 'tst' out"),
])
def test_what_would_move_the_image_but_not_its_mask_fails_before_training(
        segmentation: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: Any, why: str,
        fix: str) -> None:
    teacher = build_model("segnet_student", num_classes=CLASSES + 1, in_channels=1, params={"width": 4})
    save_file(dict(teacher.state_dict()), str(tmp_path / "t.safetensors"))
    segmentation["teacher"] = {"arch": "segnet_student", "params": {"width": 4},
                               "checkpoint": str(tmp_path / "t.safetensors")}
    segmentation["distill"] = [{"loss": "pixel_kd"}]
    set_by_path(segmentation, key, value)
    path = write_recipe(tmp_path / "seg.yaml", segmentation)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"- {key}: " in err and why in err and fix in err, err
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("augment", [{}, {"crop_padding": 2, "hflip": True}])
def test_the_same_recipe_without_a_strong_view_is_accepted_with_or_without_crop_and_flip(
        segmentation: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], augment: dict) -> None:
    segmentation["data"]["augment"] = augment  # the masks follow crops and flips (tests/test_dense_augment.py)
    path = write_recipe(tmp_path / "seg.yaml", segmentation)
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err


@pytest.mark.slow
def test_structured_and_channel_wise_distillation_run_end_to_end(segmentation: dict, tmp_path: Path) -> None:
    torch.manual_seed(3)
    teacher = build_model("segnet_teacher", num_classes=CLASSES + 1, in_channels=1, params={"width": 8})
    save_file(dict(teacher.state_dict()), str(tmp_path / "t.safetensors"))
    segmentation["teacher"] = {"arch": "segnet_teacher", "params": {"width": 8},
                               "checkpoint": str(tmp_path / "t.safetensors")}
    segmentation["distill"] = [{"loss": "pixel_kd", "weight": 10.0}, {"loss": "cwd", "weight": 5.0},
                               {"loss": "pairwise_kd", "student": "stage3", "teacher": "stage3", "weight": 0.5}]
    summary = run_recipe(recipe_from_dict(segmentation))
    assert summary["task"] == "segmentation" and summary["metric"] == "miou"
    rows = json.loads((Path(segmentation["output"]["dir"]) / "metrics.json").read_text())
    assert summary["best_miou"] == max(r["test_miou"] for r in rows)
    assert {"train_ce", "train_pixel_kd", "train_cwd", "train_pairwise_kd", "train_pixel_acc", "test_pixel_acc",
            "test_loss"} <= set(rows[-1])
    assert all(math.isfinite(r["train_loss"]) for r in rows) and "test_top1" not in rows[-1]


def test_the_segmentation_recipes_are_a_benchmark_suite_with_the_labels_only_baseline_first() -> None:
    assert "scenes_seg" in suites()
    assert method_recipes("scenes_seg") == ["student_ce", "acam", "ctcl", "cwd", "dml_cnn_vit", "mgd", "pixel_kd",
                                            "structured"]
    teacher = load_recipe(find_recipe("scenes_seg/teacher"))
    for name in method_recipes("scenes_seg"):
        recipe = load_recipe(find_recipe(f"scenes_seg/{name}"))
        assert recipe.task == "segmentation" and recipe.data == load_recipe(
            find_recipe("scenes_seg/student_ce")).data  # one subset and data for every method
        assert recipe.teacher is None or recipe.teacher.recipe == "teacher.yaml"
    assert teacher.data.augment.hflip is False and teacher.data.augment.crop_padding == 0
    assert METRIC_HEADERS["miou"] == "mIoU (%)"
