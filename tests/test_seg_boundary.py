"""The seg_boundary task: boundary maps derived exactly from instance masks, CE + balanced BCE, mIoU and boundary F
against loops written here; refusals of the multi-task losses before training; a distillation run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import edit_recipe, write_recipe
from kdkit.bench.methods import method_recipes, suites
from kdkit.cli import main
from kdkit.data import DATASETS, ImageData
from kdkit.data.base import UNLABELLED
from kdkit.distributed import DistContext
from kdkit.models import build_model
from kdkit.recipe import find_recipe, load_recipe, recipe_from_dict
from kdkit.runner import run_recipe
from kdkit.task import TASKS
from kdkit.tasks.seg_boundary import boundary_map

SIZE, CLASSES = 16, 3


def squares(root: object = None, n_train: int = 64, n_test: int = 24) -> ImageData:
    """Two filled squares per 16x16 image (they may overlap: the later one on top), grey level = class."""
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> tuple[torch.Tensor, ...]:
        images = torch.zeros(n, 1, SIZE, SIZE, dtype=torch.uint8)
        semantic = torch.zeros(n, SIZE, SIZE, dtype=torch.uint8)
        instances = torch.zeros(n, SIZE, SIZE, dtype=torch.uint8)
        labels = torch.randint(0, CLASSES, (n,), generator=gen)
        for i in range(n):
            for j, cls in enumerate((int(labels[i]), int(torch.randint(0, CLASSES, (1,), generator=gen)))):
                side = int(torch.randint(3, 7, (1,), generator=gen))
                y, x = (int(v) for v in torch.randint(0, SIZE - side + 1, (2,), generator=gen))
                images[i, 0, y:y + side, x:x + side] = 80 * (cls + 1)
                semantic[i, y:y + side, x:x + side] = cls + 1
                instances[i, y:y + side, x:x + side] = j + 1
        return images, labels, semantic, instances

    tr_images, tr_labels, tr_sem, tr_inst = split(n_train)
    te_images, te_labels, te_sem, te_inst = split(n_test)
    return ImageData("squares2", tr_images, tr_labels, te_images, te_labels, ("dark", "grey", "light"), (0.1,), (0.3,),
                     "squares2 (test)", train_targets={"semantic": tr_sem, "instances": tr_inst},
                     test_targets={"semantic": te_sem, "instances": te_inst})


def reference_boundary(instances: np.ndarray) -> np.ndarray:
    n, h, w = instances.shape
    out = np.zeros_like(instances)
    for i in range(n):
        for y in range(h):
            for x in range(w):
                for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and instances[i, yy, xx] != instances[i, y, x]:
                        out[i, y, x] = 1
    return out


def test_the_boundary_map_marks_both_sides_of_every_instance_edge() -> None:
    instances = squares().train_targets["instances"]
    assert np.array_equal(boundary_map(instances).numpy(), reference_boundary(instances.numpy()))
    one = torch.zeros(1, 5, 5, dtype=torch.uint8)
    one[0, 1:3, 1:3] = 1  # a 2x2 object: all of it and its 4-neighbours in the background are boundary
    expected = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    assert torch.equal(boundary_map(one)[0].long(), expected)


def test_targets_loss_and_an_unlabelled_sample() -> None:
    data = squares()
    bound = TASKS.get("seg_boundary").bind(data, torch.device("cpu"))
    assert TASKS.get("seg_boundary").outputs(CLASSES) == CLASSES + 2
    index = torch.tensor([4, 0, 7])
    labels = data.train_labels[index].clone()
    labels[1] = UNLABELLED
    targets = bound.targets(labels, index, "train")
    assert targets.shape == (3, 2, SIZE, SIZE) and (targets[1] == UNLABELLED).all()
    assert torch.equal(targets[0, 0], data.train_targets["semantic"][4].long())
    assert torch.equal(targets[2, 1], boundary_map(data.train_targets["instances"][7:8])[0].long())
    logits = torch.randn(3, CLASSES + 2, SIZE, SIZE, dtype=torch.float64, requires_grad=True)
    ce = torch.nn.functional.cross_entropy(logits[[0, 2], :CLASSES + 1], targets[[0, 2], 0])
    bce = 0.0
    for i in (0, 2):  # class-balanced BCE written out: boundary pixels weigh 0.5 / rho, the others 0.5 / (1 - rho)
        y, z = targets[i, 1].double(), logits[i, -1].detach()
        rho = float(y.mean())
        p = torch.sigmoid(z)
        terms = -(0.5 / rho) * y * torch.log(p) - (0.5 / (1 - rho)) * (1 - y) * torch.log(1 - p)
        bce += float(terms.mean()) / 2
    assert bound.loss(logits, targets).item() == pytest.approx(ce.item() + bce, rel=1e-10)
    none = bound.loss(logits, torch.full_like(targets, UNLABELLED))
    none.backward()
    assert none.item() == 0.0 and torch.isfinite(logits.grad).all()


def reference_bf(logits: np.ndarray, boundary: np.ndarray) -> float:
    predicted = logits[:, -1] > 0
    true = boundary == 1

    def near(mask: np.ndarray, y: int, x: int, i: int) -> bool:
        return bool(mask[i, max(y - 1, 0):y + 2, max(x - 1, 0):x + 2].any())

    n, h, w = true.shape
    right = sum(near(true, y, x, i) for i in range(n) for y in range(h) for x in range(w) if predicted[i, y, x])
    found = sum(near(predicted, y, x, i) for i in range(n) for y in range(h) for x in range(w) if true[i, y, x])
    precision, recall = right / predicted.sum(), found / true.sum()
    return 100 * 2 * precision * recall / (precision + recall)


def test_miou_and_boundary_f_match_loops_over_every_test_pixel() -> None:
    data = squares()
    bound = TASKS.get("seg_boundary").bind(data, torch.device("cpu"))
    targets = bound.targets(data.test_labels, torch.arange(len(data.test_labels)), "test")
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(len(targets), CLASSES + 2, SIZE, SIZE, generator=gen)
    logits[:, :CLASSES + 1] += 2.0 * torch.nn.functional.one_hot(targets[:, 0], CLASSES + 1).permute(0, 3, 1, 2)
    logits[:, -1] += 1.5 * (2 * targets[:, 1] - 1)  # better than chance
    evaluator = bound.evaluator(DistContext())
    for part in (slice(0, 10), slice(10, None)):
        evaluator.update(logits[part], targets[part])
    got = evaluator.compute()
    predicted, truth = logits[:, :CLASSES + 1].argmax(1).numpy().ravel(), targets[:, 0].numpy().ravel()
    ious = []
    for k in range(CLASSES + 1):
        tp = np.sum((predicted == k) & (truth == k))
        union = np.sum((predicted == k) | (truth == k))
        if union:
            ious.append(tp / union)
    assert got["miou"] == pytest.approx(100 * np.mean(ious), abs=1e-4)
    assert got["pixel_acc"] == pytest.approx(100 * np.mean(predicted == truth), abs=1e-4)
    assert got["bf"] == pytest.approx(reference_bf(logits.numpy(), targets[:, 1].numpy()), abs=1e-9)
    assert 0 < got["bf"] < 100


@pytest.fixture
def multitask(tiny: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """The tiny recipe on ``squares2`` with the seg_boundary task, a segnet pair and the CS loss."""
    monkeypatch.setitem(DATASETS._entries, "squares2", squares)
    torch.manual_seed(3)
    teacher = build_model("segnet_teacher", num_classes=CLASSES + 2, in_channels=1, params={"width": 4})
    save_file(dict(teacher.state_dict()), str(tmp_path / "t.safetensors"))
    tiny["task"] = "seg_boundary"
    tiny["model"] = {"arch": "segnet_student", "params": {"width": 4}}
    tiny["teacher"] = {"arch": "segnet_teacher", "params": {"width": 4}, "checkpoint": str(tmp_path / "t.safetensors")}
    tiny["data"] = {"dataset": "squares2"}
    tiny["distill"] = [{"loss": "cs_multitask", "weight": 1.0}]
    tiny["train"]["batch_size"] = 16
    return tiny


def validate(recipe: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))])
    return code, capsys.readouterr().err


def test_the_multitask_recipe_validates(multitask: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = validate(multitask, tmp_path, capsys)
    assert code == 0, err


@pytest.mark.parametrize("loss", ["cs_multitask", "multitask_kd"])
def test_a_multitask_loss_on_a_single_task_output_is_refused(multitask: dict, tmp_path: Path, loss: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    edit_recipe(multitask, {"task": "segmentation", "distill.0.loss": loss})
    multitask["teacher"]["checkpoint"] = None
    multitask["teacher"]["recipe"] = "nowhere.yaml"  # refused before the teacher is even looked for
    code, err = validate(multitask, tmp_path, capsys)
    assert code == 2 and loss in err and "per-pixel class scores (B, K, H, W)" in err and "pixel_kd" in err
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("loss", ["cs_multitask", "multitask_kd"])
def test_a_wrong_channel_split_is_refused(multitask: dict, tmp_path: Path, loss: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    edit_recipe(multitask, {"distill.0.loss": loss, "distill.0.seg_channels": CLASSES})
    code, err = validate(multitask, tmp_path, capsys)
    assert code == 2 and "seg_channels" in err and str(CLASSES + 1) in err


def test_the_task_needs_instance_masks(multitask: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    def semantic_only(root: object = None) -> ImageData:
        data = squares()
        data.train_targets.pop("instances")
        data.test_targets.pop("instances")
        return data

    monkeypatch.setitem(DATASETS._entries, "squares2", semantic_only)
    code, err = validate(multitask, tmp_path, capsys)
    assert code == 2 and "instances" in err


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["cs_multitask", "multitask_kd"])
def test_multitask_distillation_runs_end_to_end(multitask: dict, loss: str) -> None:
    multitask["distill"][0]["loss"] = loss
    summary = run_recipe(recipe_from_dict(multitask))
    assert summary["task"] == "seg_boundary" and summary["metric"] == "miou"
    rows = json.loads((Path(multitask["output"]["dir"]) / "metrics.json").read_text())
    assert summary["best_miou"] == max(r["test_miou"] for r in rows)
    assert {"train_ce_bce", f"train_{loss}", "test_bf", "test_miou", "test_pixel_acc", "test_loss"} <= set(rows[-1])
    assert all(math.isfinite(r["train_loss"]) and r[f"train_{loss}"] > 0 for r in rows)


def test_the_multitask_recipes_are_a_suite_with_the_labels_only_baseline_first() -> None:
    assert "scenes_multitask" in suites()
    assert method_recipes("scenes_multitask") == ["student_ce", "kd", "cs"]
    data = load_recipe(find_recipe("scenes_multitask/student_ce")).data
    for name in method_recipes("scenes_multitask"):
        recipe = load_recipe(find_recipe(f"scenes_multitask/{name}"))
        assert recipe.task == "seg_boundary" and recipe.data == data
        assert recipe.teacher is None or recipe.teacher.recipe == "teacher.yaml"
