"""RetinaNet on task detection: anchors, matching, loss and decoding against torchvision's own RetinaNet functions on
the same inputs; the model's dense tensor and taps; training it; the FCOS-layout logit losses refused on it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kdkit.models import build_model
from kdkit.models.retinanet import AnchorSpec
from kdkit.task import TASKS
from kdkit.tasks.anchors import decode, match, retinanet_loss
from test_detection import boxes_data

SPEC = AnchorSpec(num_classes=3, strides=(4, 8, 16), sizes=((12.0, 15.1, 19.0), (24.0, 30.2, 38.1), (48.0, 60.5, 76.2)))


def torchvision_anchors(spec: AnchorSpec, image_size: int) -> torch.Tensor:
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    generator = AnchorGenerator(spec.sizes, (spec.aspect_ratios,) * len(spec.sizes))
    images = ImageList(torch.zeros(1, 1, image_size, image_size), [(image_size, image_size)])
    features = [torch.zeros(1, 1, side, side) for side in spec.grid_sizes(image_size)]
    return generator(images, features)[0]


def test_anchors_equal_torchvision_anchor_generator() -> None:
    ours = SPEC.anchors(48)
    assert ours.shape == (sum(SPEC.level_sizes(48)), 4) and SPEC.anchors_per_location == 9
    assert torch.equal(ours, torchvision_anchors(SPEC, 48))
    # the first anchor: ratio 0.5, size 12 at (0, 0): w = 12 / sqrt(.5), h = 12 sqrt(.5), halves rounded
    assert ours[0].tolist() == [-8.0, -4.0, 8.0, 4.0]


def scene_boxes() -> tuple[torch.Tensor, torch.Tensor]:
    """Three images: two boxes and padding; one box; no box (padding only)."""
    boxes = torch.tensor([[[4.0, 6.0, 20.0, 30.0], [22.0, 20.0, 46.0, 44.0], [0.0, 0.0, 0.0, 0.0]],
                          [[10.0, 10.0, 21.0, 19.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
                          [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[2, 0, -1], [1, -1, -1], [-1, -1, -1]])
    return boxes, labels


def torchvision_matches(anchors: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    from torchvision.models.detection._utils import Matcher
    from torchvision.ops import box_iou

    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
    out = []
    for b, lab in zip(boxes, labels, strict=True):
        real = b[lab >= 0]
        out.append(torch.full((len(anchors),), -1, dtype=torch.int64) if real.numel() == 0
                   else matcher(box_iou(real, anchors)))
    return out


def test_matching_equals_torchvision_matcher_with_low_quality_matches_padding_and_empty_images() -> None:
    anchors = SPEC.anchors(48, dtype=torch.float64)
    boxes, labels = scene_boxes()
    ours = match(anchors, boxes, labels)
    theirs = torchvision_matches(anchors, boxes, labels)
    for i in range(3):
        assert torch.equal(ours[i], theirs[i])
    assert (ours[0] >= 0).any() and (ours[0] == -2).any() and (ours[2] == -1).all()
    # the small box of image 1 (11 x 9 pixels) overlaps no anchor by 0.5: its best anchors are kept all the same
    assert (ours[1] == 0).any()


def torchvision_loss(dense: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from torchvision.models.detection.retinanet import RetinaNetHead

    anchors = SPEC.anchors(48, dtype=dense.dtype)
    head = RetinaNetHead(8, SPEC.anchors_per_location, SPEC.num_classes)
    targets = [{"boxes": b[lab >= 0], "labels": lab[lab >= 0]} for b, lab in zip(boxes, labels, strict=True)]
    outputs = {"cls_logits": dense[..., :3], "bbox_regression": dense[..., 3:]}
    parts = head.compute_loss(targets, outputs, [anchors] * len(boxes), torchvision_matches(anchors, boxes, labels))
    return parts["classification"] + parts["bbox_regression"]


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e-6])
def test_loss_equals_torchvision_retinanet_in_float64(scale: float) -> None:
    gen = torch.Generator().manual_seed(0)
    boxes, labels = scene_boxes()
    dense = (scale * torch.randn(3, sum(SPEC.level_sizes(48)), SPEC.channels, generator=gen,
                                 dtype=torch.float64)).requires_grad_()
    ours = retinanet_loss(SPEC, SPEC.anchors(48, dtype=torch.float64), dense, boxes, labels)
    theirs = torchvision_loss(dense, boxes, labels)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    grad_ours, = torch.autograd.grad(ours, dense)
    grad_theirs, = torch.autograd.grad(theirs, dense)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-10, atol=1e-12)


def test_a_perfect_prediction_costs_only_the_focal_floor_and_half_precision_is_upcast() -> None:
    boxes, labels = scene_boxes()
    anchors = SPEC.anchors(48, dtype=torch.float64)
    from torchvision.models.detection._utils import BoxCoder

    matched = match(anchors, boxes, labels)
    dense = torch.full((3, len(anchors), SPEC.channels), -40.0, dtype=torch.float64)
    fg = matched >= 0
    rows = fg.nonzero(as_tuple=True)
    dense[..., 3:][rows] = BoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(
        boxes.gather(1, matched.clamp(min=0).unsqueeze(-1).expand(-1, -1, 4))[rows], anchors[rows[1]])
    cls = dense[..., :3]
    cls[(*rows, labels.gather(1, matched.clamp(min=0))[rows])] = 40.0
    assert retinanet_loss(SPEC, anchors, dense, boxes, labels).item() < 1e-12
    assert retinanet_loss(SPEC, anchors.float(), dense.to(torch.bfloat16), boxes.float(), labels).dtype == torch.float32


def test_decode_equals_torchvision_postprocess_detections() -> None:
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.models.detection.retinanet import RetinaNet

    gen = torch.Generator().manual_seed(1)
    dense = torch.randn(2, sum(SPEC.level_sizes(48)), SPEC.channels, generator=gen)
    dense[..., :3] -= 3.0  # a few hundred candidates above 0.05, as a trained detector gives
    anchors = SPEC.anchors(48)
    ours = decode(SPEC, anchors, dense, 48)
    sizes = SPEC.level_sizes(48)
    fake = SimpleNamespace(score_thresh=0.05, topk_candidates=1000, nms_thresh=0.5, detections_per_img=300,
                           box_coder=BoxCoder((1.0, 1.0, 1.0, 1.0)))
    outputs = {"cls_logits": list(dense[..., :3].split(sizes, dim=1)),
               "bbox_regression": list(dense[..., 3:].split(sizes, dim=1))}
    theirs = RetinaNet.postprocess_detections(fake, outputs, [list(anchors.split(sizes))] * 2, [(48, 48)] * 2)
    for a, b in zip(ours, theirs, strict=True):
        assert len(a["boxes"]) > 10
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[key], b[key])


def test_the_model_gives_one_dense_tensor_named_taps_and_a_trainable_loss() -> None:
    from kdkit.taps import tap_shapes

    torch.manual_seed(0)
    model = build_model("tv_retinanet", num_classes=3, in_channels=1, image_size=40, params={"width": 4})
    shapes = tap_shapes(model, ["logits", "p2", "p3", "p4", "stage2"], (1, 40, 40))
    assert shapes["logits"] == ((10 * 10 + 5 * 5 + 3 * 3) * 9, 3 + 4)
    assert shapes["p2"] == (32, 10, 10) and shapes["p4"] == (32, 3, 3)
    data = boxes_data()
    bound = TASKS.get("detection").bind(data, "cpu", model=model)
    targets = bound.targets(data.train_labels, torch.arange(4), "train")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    images = torch.rand(4, 1, 40, 40, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(30):
        loss = bound.loss(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]  # the focal and box terms fall on a fixed batch (1.81 -> 1.40 here)
    assert model.head.regression_head.bbox_reg.weight.grad.abs().sum() > 0
    evaluator = bound.evaluator(__import__("kdkit.distributed", fromlist=["DistContext"]).DistContext())
    evaluator.update(model(images).detach(), targets)
    scores = evaluator.compute()
    assert {"map", "map50", "loss"} <= set(scores) and math.isfinite(scores["loss"])


def retinanet_recipe(tmp_path, distill: list[dict]) -> dict:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    teacher = build_model("det_teacher", num_classes=10, in_channels=1, image_size=48, params={"width": 4})
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp_path / "t.safetensors"))
    return {
        "name": "retina_tiny", "task": "detection",
        "model": {"arch": "tv_retinanet", "params": {"width": 4}},
        "teacher": {"arch": "det_teacher", "params": {"width": 4}, "checkpoint": str(tmp_path / "t.safetensors")},
        "data": {"dataset": "fashion_mnist_scenes",
                 "params": {"size": 48, "train_scenes": 32, "test_scenes": 16, "cache_dir": str(tmp_path / "cache")}},
        "distill": distill,
        "train": {"epochs": 1, "batch_size": 16, "optimizer": {"name": "adamw", "lr": 0.002}, "seed": 0},
        "output": {"dir": str(tmp_path / "run"), "progress": False},
    }


def need_fashion_mnist() -> None:
    from pathlib import Path

    from kdkit.data.idx import FASHION_MNIST_ROOT

    if not Path(FASHION_MNIST_ROOT).is_dir():
        pytest.skip("the Fashion-MNIST files are not installed")


@pytest.mark.parametrize("loss", ["ld", "bckd", "old_det_kd"])
def test_fcos_layout_logit_losses_are_refused_on_retinanet_outputs_before_training(tmp_path, loss: str) -> None:
    from kdkit.errors import KdkitError
    from kdkit.recipe import recipe_from_dict
    from kdkit.runner import run_recipe

    need_fashion_mnist()
    recipe = recipe_from_dict(retinanet_recipe(tmp_path, [{"loss": loss, "weight": 1.0}]))
    with pytest.raises(KdkitError) as info:
        run_recipe(recipe)
    message = str(info.value)
    assert "per-anchor" in message and loss in message and "with these networks" in message
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_an_fcos_teacher_distils_a_retinanet_student_on_fpn_levels(tmp_path) -> None:
    import json

    from kdkit.recipe import recipe_from_dict
    from kdkit.runner import run_recipe

    need_fashion_mnist()
    recipe = retinanet_recipe(tmp_path, [{"loss": "fitnets", "student": ["p2", "p3"], "teacher": ["p2", "p3"],
                                          "weight": 1.0}])
    summary = run_recipe(recipe_from_dict(recipe))
    assert summary["metric"] == "map"
    row = json.loads((tmp_path / "run" / "metrics.json").read_text())[-1]
    assert math.isfinite(row["train_det"]) and row["train_fitnets"] > 0 and math.isfinite(row["test_map"])
