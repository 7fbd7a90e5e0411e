"""The report's predictions section: what a dense task draws over test images, and the figure on finished runs."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import TINY_SCENES, edit_recipe
from kdkit.data.dense import IGNORE
from kdkit.data.idx import FASHION_MNIST_ROOT
from kdkit.deployment import SAMPLES_FILE, read_sample_targets, read_samples
from kdkit.export.gallery import GALLERY_INDICES, MASK_ALPHA, overlay, predictions_section
from kdkit.models import build_model
from kdkit.report import load_run, write_report
from kdkit.task import TASKS
from kdkit.tasks.detection import DRAWN_PER_IMAGE, DRAWN_SCORE, decode
from kdkit.tasks.segmentation import class_drawings


class Declares(nn.Module):
    """A stand-in for a trained detector: only its declared output layout is read."""

    def __init__(self, spec: Any) -> None:
        super().__init__()
        self.dense_spec = spec


def test_detection_draws_exactly_the_decoded_boxes_scoring_at_least_the_threshold() -> None:
    spec = build_model("det_student", num_classes=3, in_channels=1, image_size=48, params={"width": 4}).dense_spec
    locations = spec.locations(48, torch.device("cpu"))
    outputs = torch.randn(3, len(locations), spec.channels, generator=torch.Generator().manual_seed(0))
    outputs[..., :3] = outputs[..., :3] * 2 - 4  # class logits: a few scores above the threshold, most below
    outputs[2, :, :3] += 2  # the third image: more boxes above the threshold than are drawn
    drawings = TASKS.get("detection").drawn_outputs(outputs, Declares(spec), 48)
    above = []
    for drawing, found in zip(drawings, decode(spec, locations, outputs, 48), strict=True):
        candidates = [(float(score), box, int(label)) for box, label, score
                      in zip(found["boxes"].tolist(), found["labels"], found["scores"], strict=True)]
        expected = sorted((c for c in candidates if c[0] >= DRAWN_SCORE), key=lambda c: -c[0])
        above.append((len(expected), len(candidates)))
        expected = expected[:DRAWN_PER_IMAGE]
        assert drawing.boxes.tolist() == [box for _, box, _ in expected]
        assert drawing.classes.tolist() == [label for _, _, label in expected]
        assert drawing.scores.tolist() == pytest.approx([score for score, _, _ in expected])
        assert drawing.mask is None
    # the threshold was exercised both ways, and the cap on one image
    assert any(0 < kept < found for kept, found in above[:2]) and above[2][0] > DRAWN_PER_IMAGE


def test_segmentation_draws_the_argmax_class_and_the_overlay_colours_it() -> None:
    outputs = torch.randn(1, 4, 6, 7, generator=torch.Generator().manual_seed(1))  # background + 3 classes
    (drawing,) = TASKS.get("segmentation").drawn_outputs(outputs, None, 6)
    argmax = outputs[0].argmax(0)
    assert torch.equal(drawing.mask, argmax - 1) and drawing.boxes.shape == (0, 4)
    rgba = overlay(drawing.mask, num_classes=3)
    tab10 = matplotlib.colormaps["tab10"]
    for y in range(6):
        for x in range(7):
            channel = int(argmax[y, x])
            want = (0.0, 0.0, 0.0, 0.0) if channel == 0 else (*tab10(channel - 1)[:3], MASK_ALPHA)
            assert tuple(rgba[y, x]) == pytest.approx(want)
    assert {int(v) for v in argmax.unique()} >= {0, 1}  # background and a class both drawn


def test_seg_boundary_draws_the_class_channels_not_the_boundary() -> None:
    outputs = torch.randn(1, 5, 4, 4, generator=torch.Generator().manual_seed(2))  # background, 3 classes, boundary
    outputs[:, -1] = 100.0  # an argmax over every channel would pick the boundary everywhere
    (drawing,) = TASKS.get("seg_boundary").drawn_outputs(outputs, None, 4)
    assert torch.equal(drawing.mask, outputs[0, :4].argmax(0) - 1)


def test_ground_truth_masks_leave_background_and_void_uncoloured() -> None:
    maps = torch.tensor([[[0, 1, 3], [IGNORE, 2, 0]]], dtype=torch.uint8)
    (drawing,) = class_drawings(maps)
    assert drawing.mask.tolist() == [[-1, 0, 2], [-1, 1, -1]]
    assert TASKS.get("classification").drawn == "" and TASKS.get("classification").drawn_targets({}) is None


def test_a_classification_report_is_unchanged(tmp_path: Path) -> None:
    from kdkit.deployment import DEPLOY_FILE, Deployment

    run = fake_run(tmp_path / "run")
    record = Deployment("classification", "softmax", "logits", 1, 8, (0.5,), (0.25,), ("a", "b"))
    (run / DEPLOY_FILE).write_text(json.dumps(record.to_dict()))
    assert predictions_section({"tiny": [load_run(run)]}, tmp_path) == ""
    plain = write_report([run], tmp_path / "a").read_text()
    drawn = write_report([run], tmp_path / "b", sections=[predictions_section]).read_text()
    assert plain == drawn and not list((tmp_path / "b").glob("predictions*"))


def fake_run(folder: Path) -> Path:
    """A run folder with what a report reads (metrics, summary), no network."""
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps([{"epoch": 1, "test_top1": 50.0, "train_loss": 1.0}]))
    (folder / "summary.json").write_text(json.dumps({"name": "tiny", "best_top1": 50.0, "seed": 0}))
    return folder


def shipped_on_tiny(name: str, folder: Path) -> dict[str, Any]:
    """The shipped labels-only recipe ``name`` on :data:`TINY_SCENES`, one epoch, in ``folder/run``."""
    from kdkit.recipe import find_recipe, load_recipe

    if not Path(FASHION_MNIST_ROOT).is_dir():
        pytest.skip("the Fashion-MNIST files are not installed")
    recipe = load_recipe(find_recipe(name)).model_dump(mode="json")
    return edit_recipe(recipe, {
        "data.subset": None, "data.params": TINY_SCENES | {"cache_dir": str(folder / "cache")},
        "output.dir": str(folder / "run"), "output.progress": False, "train.epochs": 1, "train.batch_size": 16})


@pytest.fixture(scope="module")
def dense_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One finished tiny run per dense task (student_ce, one epoch on the tiny scenes), shared by the tests."""
    from kdkit.recipe import recipe_from_dict
    from kdkit.runner import run_recipe

    runs = {}
    for task, name, narrow in (("detection", "scenes_det/student_ce", {"model.params.width": 4}),
                               ("segmentation", "scenes_seg/student_ce", {})):
        folder = tmp_path_factory.mktemp(task)
        run_recipe(recipe_from_dict(edit_recipe(shipped_on_tiny(name, folder), narrow)))
        runs[task] = folder / "run"
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_kdkit_report_draws_a_dense_run_next_to_its_ground_truth(dense_runs: dict[str, Path], task: str,
                                                                  tmp_path: Path) -> None:
    from kdkit.cli import main

    run = dense_runs[task]
    targets = read_sample_targets(run)
    images, _ = read_samples(run)
    assert set(targets) >= ({"boxes", "box_labels"} if task == "detection" else {"semantic"})
    assert all(len(t) == len(images) for t in targets.values())
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.html").read_text()
    figure = tmp_path / "report" / f"predictions_{task}.png"
    assert figure.is_file() and f"href='{figure.name}'" in page
    assert "Predictions on test images" in page and html.escape(TASKS.get(task).drawn) in page
    assert f"Test images {', '.join(map(str, GALLERY_INDICES))}" in page
    assert page.count("data:image/png") == 3  # curves, comparison, predictions
    width, height = matplotlib.image.imread(figure).shape[1::-1]
    assert width > height  # two rows (ground truth, the run) of six images


@pytest.mark.slow
def test_a_run_without_stored_targets_is_named_with_the_reason(dense_runs: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "old"
    shutil.copytree(dense_runs["segmentation"], run)
    images, labels = read_samples(run)
    save_file({"images": images, "labels": labels}, str(run / SAMPLES_FILE))  # as kdkit wrote it before
    page = write_report([run], tmp_path / "report", sections=[predictions_section]).read_text()
    assert "not drawn, its deploy_samples.safetensors stores no test targets" in page
    assert not list((tmp_path / "report").glob("predictions*"))
    assert json.loads((run / "summary.json").read_text())  # the run itself is untouched otherwise
    assert np.array_equal(read_samples(run)[0].numpy(), images.numpy())


@pytest.mark.slow
def test_runs_on_the_same_images_share_a_figure_extra_runs_first(dense_runs: dict[str, Path], tmp_path: Path) -> None:
    detection, segmentation = dense_runs["detection"], dense_runs["segmentation"]
    groups = {"det": [load_run(detection)], "seg": [load_run(segmentation)]}
    page = predictions_section(groups, tmp_path, extra=[("teacher", detection)])
    heights = {task: matplotlib.image.imread(tmp_path / f"predictions_{task}.png").shape[0]
               for task in ("detection", "segmentation")}
    assert heights["detection"] > heights["segmentation"]  # ground truth, teacher, det: one row more than seg's
    assert page.count("<figure>") == 2
    assert page.index(f"teacher: <code>{detection}</code>") < page.index(f"det: <code>{detection}</code>")


def test_a_folder_without_a_deploy_record_is_named_only_when_its_task_draws(tmp_path: Path) -> None:
    old_classification = fake_run(tmp_path / "cls")
    old_segmentation = fake_run(tmp_path / "seg")
    (old_segmentation / "recipe.yaml").write_text("task: segmentation\n")
    page = predictions_section({"cls": [load_run(old_classification)], "seg": [load_run(old_segmentation)]}, tmp_path)
    assert "seg (" in page and "no deploy.json" in page and "cls (" not in page
