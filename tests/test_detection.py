"""The detection task: FCOS targets and loss (against torchvision's FCOS), decoding, COCO mAP (against pycocotools),
the refusal of augmentation that would misalign the boxes, and the detectors' dense output and taps."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kdkit.data.base import ImageData
from kdkit.distributed import DistContext
from kdkit.errors import KdkitError
from kdkit.models import build_model
from kdkit.models.detector import DenseSpec
from kdkit.task import TASKS
from kdkit.tasks.detection import assign, decode, fcos_loss, pack_targets, unpack_targets

#: torchvision's FCOS scale rule for strides 4, 8, 16: a level takes the largest distance in (4 s, 8 s].
TV_SPEC = DenseSpec(num_classes=3, strides=(4, 8, 16), size_ranges=((0.0, 32.0), (32.0, 64.0), (64.0, math.inf)))


def boxes_data(n: int = 4, size: int = 40) -> ImageData:
    """A tiny dataset with padded boxes: image i has box (4, 4, 20, 20) of class i % 3 (small), image 0 also a
    medium one (36 x 36 pixels)."""
    boxes = torch.zeros(n, 2, 4)
    labels = torch.full((n, 2), -1, dtype=torch.int64)
    boxes[:, 0] = torch.tensor([4.0, 4.0, 20.0, 20.0])
    labels[:, 0] = torch.arange(n) % 3
    boxes[0, 1] = torch.tensor([2.0, 2.0, 38.0, 38.0])
    labels[0, 1] = 2
    images = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    targets = {"boxes": boxes, "box_labels": labels}
    return ImageData("boxes", images, labels[:, 0].clone(), images, labels[:, 0].clone(), ("a", "b", "c"), (0.5,),
                     (0.25,), "test", train_targets=targets, test_targets=targets)


def test_targets_pack_the_padded_boxes_and_labels_of_the_batch_by_index() -> None:
    data = boxes_data()
    model = build_model("det_student", num_classes=3, in_channels=1, image_size=40, params={"width": 4})
    bound = TASKS.get("detection").bind(data, "cpu", model=model)
    targets = bound.targets(data.train_labels[[2, 0]], torch.tensor([2, 0]), "train")
    assert targets.shape == (2, 2, 5)
    boxes, labels = unpack_targets(targets, 40)
    assert torch.equal(boxes, data.train_targets["boxes"][[2, 0]])
    assert torch.equal(labels, data.train_targets["box_labels"][[2, 0]])
    assert torch.allclose(targets[0, 0, :4], torch.tensor([4, 4, 20, 20]) / 40)  # normalised by the image size


def test_assignment_center_sampling_scale_range_smallest_box_and_padding() -> None:
    spec = DenseSpec(num_classes=1, strides=(4,), size_ranges=((0.0, 12.0),))
    locations = spec.locations(16)  # centres 2, 6, 10, 14 on each axis
    big = [0.0, 0.0, 16.0, 16.0]  # centre (8, 8): locations within 1.5 * 4 = 6 of it on both axes
    small = [4.0, 4.0, 12.0, 12.0]
    boxes = torch.tensor([[big, small, [0.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[0, 0, -1]])
    matched = assign(locations, boxes, labels)[0].view(4, 4)
    expected = torch.full((4, 4), -1)
    # big box: every location whose largest distance is <= 12 (distances to the edges 2..14) and within 6 of
    # the centre on both axes (x, y in {6, 10}, and 2 / 14 are 6 away: not strictly inside)
    expected[1:3, 1:3] = 1  # the inner 2x2 also lie in the small box, which is smaller: it wins
    assert torch.equal(matched, expected)
    # the padding row (label -1) is never matched, even with a box that covers a location
    boxes[0, 2] = torch.tensor([0.0, 0.0, 16.0, 16.0])
    assert torch.equal(assign(locations, boxes, labels)[0].view(4, 4), expected)


def torchvision_fcos_loss(dense: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """torchvision's FCOS.compute_loss (matching + head loss) on the same predictions, summed over its terms."""
    from torchvision.models.detection.fcos import FCOS, FCOSHead

    locations = TV_SPEC.locations(32, dtype=dense.dtype)
    half = locations[:, 2:3] / 2
    anchors = torch.cat([locations[:, :2] - half, locations[:, :2] + half], dim=1)  # anchor size = stride
    cls, box, ctr = TV_SPEC.split(dense)
    # torchvision's box coder decodes ctr +- code * anchor size; kdkit's distances are exp(raw) * stride
    outputs = {"cls_logits": cls, "bbox_regression": torch.exp(box), "bbox_ctrness": ctr.unsqueeze(-1)}
    targets = [{"boxes": b[lab >= 0], "labels": lab[lab >= 0]} for b, lab in zip(boxes, labels, strict=True)]
    fake = SimpleNamespace(center_sampling_radius=1.5, head=FCOSHead(32, 1, TV_SPEC.num_classes))
    per_level = [s * s for s in TV_SPEC.grid_sizes(32)]
    parts = FCOS.compute_loss(fake, targets, outputs, [anchors] * len(boxes), per_level)
    return sum(parts.values())


def test_fcos_loss_equals_torchvision_fcos_in_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[[2.0, 3.0, 30.0, 29.0], [5.0, 5.0, 15.0, 13.0], [0.0, 0.0, 0.0, 0.0]],
                          [[8.0, 1.0, 24.0, 31.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[2, 0, -1], [1, -1, -1]])
    dense = torch.randn(2, 64 + 16 + 4, TV_SPEC.channels, generator=gen, dtype=torch.float64, requires_grad=True)
    ours = fcos_loss(TV_SPEC, TV_SPEC.locations(32, dtype=torch.float64), dense, boxes, labels)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, torchvision_fcos_loss(dense, boxes, labels), rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(ours, dense)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_distribution_head_loss_adds_gfl_dfl_and_decodes_the_expectation() -> None:
    spec = DenseSpec(num_classes=3, strides=(4, 8, 16), size_ranges=TV_SPEC.size_ranges, box_bins=4)
    box = torch.full((1, 1, spec.box_channels), -30.0)
    box.view(1, 1, 4, 5)[..., 2] = 30.0  # every edge certain at 2 bins
    assert torch.allclose(spec.distances(box, torch.tensor([[4.0]])), torch.full((1, 1, 4), 8.0))
    # DFL: a target distance of 2.25 strides splits its mass 0.75 / 0.25 between bins 2 and 3
    from kdkit.tasks.detection import _distribution_focal_loss

    logits = torch.randn(1, 20, dtype=torch.float64)
    logp = logits.view(1, 4, 5).log_softmax(-1)
    expected = -(0.75 * logp[..., 2] + 0.25 * logp[..., 3]).sum()
    assert torch.allclose(_distribution_focal_loss(logits, torch.full((1, 4), 2.25, dtype=torch.float64), 4),
                          expected)


def test_decode_keeps_confident_boxes_and_suppresses_duplicates_per_class() -> None:
    spec = DenseSpec(num_classes=2, strides=(8,), size_ranges=((0.0, math.inf),))
    locations = spec.locations(16)  # 4 locations, centres (4, 4), (12, 4), (4, 12), (12, 12)
    dense = torch.full((1, 4, spec.channels), -20.0)
    dense[..., 2:6] = 0.0  # distances exp(0) * 8 = 8: boxes of 16 x 16 around each centre (clipped)
    dense[..., 6] = 20.0  # centerness ~1
    # location 1 (centre 12, 4) reaches 12 px left and ~0 right: its box (0, -4, 12, 12) clips to location 0's
    dense[0, 1, 2], dense[0, 1, 4] = math.log(1.5), -20.0
    dense[0, 0, 0], dense[0, 1, 0] = 5.0, 6.0  # class 0 at both (IoU 1): NMS keeps location 1's higher score
    dense[0, 1, 1] = 5.0  # class 1 at location 1: another class, not suppressed
    out = decode(spec, locations, dense, image_size=16)[0]
    assert sorted(out["labels"].tolist()) == [0, 1]
    class0 = out["boxes"][out["labels"] == 0][0]
    assert torch.allclose(class0, torch.tensor([0.0, 0.0, 12.0, 12.0]), atol=1e-4)
    assert out["scores"].max() == pytest.approx(math.sqrt(torch.sigmoid(torch.tensor(6.0)).item()), rel=1e-4)


def coco_reference(detections: list[dict], truths: list[dict]) -> dict[str, float]:
    """pycocotools' COCOeval on the same images (areas = box areas, as torchmetrics gives them)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(box: list[float]) -> list[float]:
        return [box[0], box[1], box[2] - box[0], box[3] - box[1]]

    gt = COCO()
    anns, dets = [], []
    for image, truth in enumerate(truths):
        for box, label in zip(truth["boxes"].tolist(), truth["labels"].tolist(), strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append({"id": len(anns) + 1, "image_id": image, "category_id": label, "bbox": xywh(box),
                         "area": w * h, "iscrowd": 0})
    for image, det in enumerate(detections):
        for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(),
                                     strict=True):
            dets.append({"image_id": image, "category_id": label, "bbox": xywh(box), "score": score})
    gt.dataset = {"images": [{"id": i} for i in range(len(truths))], "annotations": anns,
                  "categories": [{"id": c} for c in range(3)]}
    gt.createIndex()
    evaluation = COCOeval(gt, gt.loadRes(dets), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    s = evaluation.stats
    return {"map": 100 * s[0], "map50": 100 * s[1], "map75": 100 * s[2], "map_small": 100 * s[3],
            "map_medium": 100 * s[4]}


def test_map_equals_pycocotools_cocoeval_on_a_hand_made_case() -> None:
    pytest.importorskip("pycocotools")
    data = boxes_data()
    model = build_model("det_student", num_classes=3, in_channels=1, image_size=32, params={"width": 4})
    bound = TASKS.get("detection").bind(data, "cpu", model=model)
    t = torch.tensor
    truths = [{"boxes": t([[2.0, 2.0, 12.0, 14.0], [10.0, 5.0, 50.0, 45.0]]), "labels": t([0, 1])},
              {"boxes": t([[0.0, 0.0, 8.0, 8.0]]), "labels": t([2])},
              {"boxes": t([[5.0, 5.0, 25.0, 25.0], [30.0, 30.0, 38.0, 36.0]]), "labels": t([0, 0])}]
    detections = [
        # image 0: a good class-0 box, a loose class-1 box (IoU ~0.66: a hit at 0.5, a miss at 0.75)
        {"boxes": t([[2.0, 2.5, 12.0, 14.0], [10.0, 5.0, 50.0, 32.0]]), "scores": t([0.9, 0.8]), "labels": t([0, 1])},
        # image 1: the right box with the wrong class (a false positive; the class-2 box is missed)
        {"boxes": t([[0.0, 0.0, 8.0, 8.0]]), "scores": t([0.7]), "labels": t([1])},
        # image 2: one exact hit, one false positive far away; the small object at (30, 30) is missed
        {"boxes": t([[5.0, 5.0, 25.0, 25.0], [0.0, 30.0, 6.0, 38.0]]), "scores": t([0.95, 0.6]),
         "labels": t([0, 0])},
    ]
    evaluator = bound.evaluator(DistContext())
    evaluator.add(detections, truths)
    ours = evaluator.compute()
    reference = coco_reference(detections, truths)
    for name, value in reference.items():
        assert ours[name] == pytest.approx(value, abs=1e-4), name  # torchmetrics returns float32
    assert 0 < ours["map"] < 100


def test_metrics_drop_size_ranges_without_test_boxes() -> None:
    data = boxes_data()  # small boxes and one medium, none over 96² pixels
    assert TASKS.get("detection").metrics_for(data) == ("map", "map50", "map75", "map_small", "map_medium", "loss")
    data.test_targets["box_labels"][0, 1] = -1  # the medium box becomes padding
    assert TASKS.get("detection").metrics_for(data) == ("map", "map50", "map75", "map_small", "loss")


def test_detection_needs_a_dense_detector() -> None:
    model = build_model("cnn_student", num_classes=3, in_channels=1, image_size=32)
    with pytest.raises(KdkitError, match="dense_spec") as info:
        TASKS.get("detection").bind(boxes_data(), "cpu", model=model)
    assert "det_student" in str(info.value)


@pytest.mark.parametrize("arch", ["det_student", "det_teacher"])
@pytest.mark.parametrize("bins", [0, 4])
def test_detectors_output_one_dense_tensor_and_expose_levels_as_taps(arch: str, bins: int) -> None:
    from kdkit.taps import tap_shapes

    model = build_model(arch, num_classes=10, in_channels=1, image_size=48, params={"box_bins": bins})
    spec = model.dense_spec
    assert spec.strides == (4, 8, 16)
    shapes = tap_shapes(model, ["logits", "p2", "p3", "p4", "stage1", "stage4"], (1, 48, 48))
    assert shapes["logits"] == (12 * 12 + 6 * 6 + 3 * 3, 10 + spec.box_channels + 1)
    assert spec.box_channels == (4 * (bins + 1) if bins else 4)
    width = shapes["p2"][0]
    assert shapes["p2"] == (width, 12, 12) and shapes["p3"] == (width, 6, 6) and shapes["p4"] == (width, 3, 3)
    assert shapes["stage1"][1:] == (24, 24) and shapes["stage4"][1:] == (3, 3)


@pytest.mark.slow
def test_the_task_trains_the_detector_on_its_boxes() -> None:
    torch.manual_seed(0)
    data = boxes_data(n=8)
    model = build_model("det_student", num_classes=3, in_channels=1, image_size=40, params={"width": 4})
    bound = TASKS.get("detection").bind(data, "cpu", model=model)
    x = torch.randn(8, 1, 40, 40)
    y = bound.targets(data.train_labels, torch.arange(8), "train")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = bound.loss(model(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first
    score, count = bound.train_score(model(x), y)
    assert count == 8 and 0 <= float(score) <= 8


def _recipe(augment: dict, views: int = 1) -> dict:
    return {"name": "det", "task": "detection", "model": {"arch": "det_student"},
            "data": {"dataset": "fashion_mnist_scenes", "params": {"size": 48, "train_scenes": 100, "test_scenes": 20},
                     "augment": augment, "views": views},
            "train": {"epochs": 1, "batch_size": 8}}


def test_a_strong_view_is_refused_for_detection_but_crop_and_flip_are_not(tmp_path) -> None:
    from kdkit.build import geometry_problems
    from kdkit.recipe import recipe_from_dict

    recipe = recipe_from_dict({**_recipe({}, 2), "output": {"dir": str(tmp_path)}})
    assert TASKS.get("detection").pixel_targets and not TASKS.get("multilabel").pixel_targets  # labels do not move
    problems = geometry_problems(recipe, TASKS.get("detection"))
    assert len(problems) == 1 and "data.views" in str(problems[0]) and "would not follow" in str(problems[0])
    for augment in ({}, {"hflip": True, "crop_padding": 4}):  # the boxes follow (tests/test_dense_augment.py)
        plain = recipe_from_dict({**_recipe(augment), "output": {"dir": str(tmp_path)}})
        assert geometry_problems(plain, TASKS.get("detection")) == []


def test_a_detection_recipe_with_a_strong_view_exits_2_before_training(tmp_path, capsys) -> None:
    import yaml

    from kdkit.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**_recipe({"hflip": True}, 2), "output": {"dir": str(tmp_path / "run")}}))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "data.views" in err and "'boxes' targets with the random crop and flip of data.augment only" in err
    assert "- data.views: " in err and "- data.augment.hflip: " not in err  # the flip itself is accepted
    assert not (tmp_path / "run").exists()


def test_packed_targets_round_trip() -> None:
    boxes = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    labels = torch.tensor([[7]])
    b, lab = unpack_targets(pack_targets(boxes, labels, 48), 48)
    assert torch.allclose(b, boxes) and torch.equal(lab, labels)



def test_torchvision_fcos_parts_give_the_dense_tensor_taps_and_a_trainable_loss() -> None:
    from kdkit.taps import tap_shapes

    torch.manual_seed(0)
    model = build_model("tv_fcos", num_classes=3, in_channels=1, image_size=40)
    shapes = tap_shapes(model, ["logits", "p2", "p3", "p4", "stage2"], (1, 40, 40))
    assert shapes["logits"] == (10 * 10 + 5 * 5 + 3 * 3, 3 + 4 + 1)
    assert shapes["p2"] == (32, 10, 10) and shapes["p4"] == (32, 3, 3)
    data = boxes_data()
    bound = TASKS.get("detection").bind(data, "cpu", model=model)
    out = model(torch.randn(4, 1, 40, 40))
    loss = bound.loss(out, bound.targets(data.train_labels, torch.arange(4), "train"))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.head.regression_head.bbox_reg.weight.grad.abs().sum() > 0  # the box loss reaches torchvision's head
    # linear coding: torchvision's ReLU'd regression r at stride s is a distance r * s
    spec = model.dense_spec
    assert torch.equal(spec.distances(torch.full((1, 4), 2.0), torch.tensor([8.0])), torch.full((1, 4), 16.0))


@pytest.mark.slow
def test_a_tiny_detection_distillation_runs_end_to_end(tmp_path) -> None:
    """FGD on the FPN levels (reading the GT boxes) plus LD on the dense outputs, one epoch on a few real scenes."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from kdkit.data.idx import FASHION_MNIST_ROOT
    from kdkit.recipe import recipe_from_dict
    from kdkit.runner import run_recipe

    if not Path(FASHION_MNIST_ROOT).is_dir():
        pytest.skip("the Fashion-MNIST files are not installed")
    torch.manual_seed(0)
    teacher = build_model("det_teacher", num_classes=10, in_channels=1, image_size=48,
                          params={"box_bins": 4, "width": 8})
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp_path / "t.safetensors"))
    recipe = {
        "name": "det_tiny", "task": "detection",
        "model": {"arch": "det_student", "params": {"box_bins": 4, "width": 4}},
        "teacher": {"arch": "det_teacher", "params": {"box_bins": 4, "width": 8},
                    "checkpoint": str(tmp_path / "t.safetensors")},
        "data": {"dataset": "fashion_mnist_scenes",
                 "params": {"size": 48, "train_scenes": 48, "test_scenes": 16, "cache_dir": str(tmp_path / "cache")}},
        "distill": [{"loss": "fgd", "student": ["p2", "p3"], "teacher": ["p2", "p3"], "weight": 1.0},
                    {"loss": "ld", "bins": 4, "weight": 0.25}],
        "train": {"epochs": 1, "batch_size": 16, "optimizer": {"name": "adamw", "lr": 0.002}, "seed": 0},
        "output": {"dir": str(tmp_path / "run"), "progress": False},
    }
    summary = run_recipe(recipe_from_dict(recipe))
    assert summary["task"] == "detection" and summary["metric"] == "map"
    row = json.loads((tmp_path / "run" / "metrics.json").read_text())[-1]
    assert {"train_det", "train_fgd", "train_ld", "train_fg_acc", "test_map", "test_map50", "test_loss"} <= set(row)
    assert all(math.isfinite(row[k]) for k in ("train_det", "train_fgd", "train_ld", "test_map"))
    assert row["train_fgd"] > 0 and row["train_ld"] > 0


@pytest.mark.parametrize("arch", ["det_student", "tv_fcos", "tv_retinanet"])
def test_ls_taps_lists_a_detectors_levels_and_skips_what_captures_no_tensor(arch: str, capsys) -> None:
    from kdkit.cli import main

    assert main(["ls", "taps", arch]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"logits", "p2", "p3", "p4", "stage1", "stage4"} <= set(listed)
    assert "stages" not in listed and "fpn" not in listed  # a ModuleList never called; torchvision's FPN gives a dict


def test_the_detection_recipes_are_their_own_benchmark_suite() -> None:
    from kdkit.bench.methods import method_recipes, suites
    from kdkit.recipe import find_recipe, load_recipe

    assert "scenes_det" in suites()
    assert method_recipes("scenes_det") == ["student_ce", "acam", "bckd", "cwd", "cwd_tuned", "fgd", "fitnets",
                                            "fmkt_feature", "ld", "mgd", "pcka", "pkd", "tst", "unikd", "unikd_hetero"]
    assert all(load_recipe(find_recipe(f"scenes/{n}")).task == "multilabel" for n in method_recipes("scenes"))
    data = load_recipe(find_recipe("scenes_det/student_ce")).data
    for name in method_recipes("scenes_det"):
        recipe = load_recipe(find_recipe(f"scenes_det/{name}"))
        assert recipe.task == "detection" and recipe.data == data  # one subset and data for every method
        # the suite's teacher, or UniKD's heterogeneous one (trained by its own recipe, teacher_tv_fcos.yaml)
        assert recipe.teacher is None or recipe.teacher.recipe in ("teacher.yaml", "teacher_tv_fcos.yaml")
