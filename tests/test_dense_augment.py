"""Aligned geometric augmentation for the dense tasks (issue #14): masks, boundary maps and boxes follow each
image's random crop and flip exactly; what cannot follow is refused (tests/test_segmentation.py, test_detection.py).

Expected values come from independent numpy code: ``np.pad`` + slicing for the maps, the bounding box of the
moved object's pixels for the boxes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import edit_recipe, tiny_seg
from kdkit.data.augment import MIN_BOX_VISIBLE, AugmentConfig, follow_boxes, follow_maps, random_crop, random_hflip
from kdkit.data.base import UNLABELLED, ImageData
from kdkit.data.loader import BatchLoader
from kdkit.models import build_model
from kdkit.task import TASKS
from kdkit.tasks.detection import unpack_targets
from kdkit.tasks.seg_boundary import balanced_bce

H, W, PAD = 8, 10, 2
VOID = UNLABELLED


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An 8x10 class map with two objects (class 4 in the top-right corner, class 2 in the middle), their boxes
    (exclusive ends) and labels, plus one padding row; the image is the class map + 1 (no pixel is 0)."""
    mask = np.zeros((H, W), dtype=np.int64)
    mask[0:2, 8:10] = 5  # object 0: class 4, rows 0..1, columns 8..9
    mask[2:5, 1:4] = 3  # object 1: class 2, rows 2..4, columns 1..3
    mask[6, 6] = VOID  # a void pixel keeps being void
    boxes = np.array([[8, 0, 10, 2], [1, 2, 4, 5], [0, 0, 0, 0]], dtype=np.float32)
    return mask, boxes, np.array([4, 2, -1])


def _expected_map(mask: np.ndarray, dy: int, dx: int, flip: int) -> np.ndarray:
    """Crop of the void-padded map at offset (PAD + dy, PAD + dx), then the flip: the numpy definition."""
    out = np.pad(mask, PAD, constant_values=VOID)[PAD + dy:PAD + dy + H, PAD + dx:PAD + dx + W]
    return out[:, ::-1] if flip else out


def _expected_box(moved: np.ndarray, value: int, area: int) -> list[float] | None:
    """The box of the pixels of ``value`` in a moved map (None when too little of the object is left)."""
    rows, cols = np.nonzero(moved == value)
    if len(rows) == 0 or len(rows) < MIN_BOX_VISIBLE * area:
        return None
    return [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


def test_every_crop_offset_and_flip_moves_a_known_mask_and_its_boxes_exactly() -> None:
    mask, boxes, labels = _scene()
    views = torch.tensor([(dy, dx, f) for dy in range(-PAD, PAD + 1) for dx in range(-PAD, PAD + 1) for f in (0, 1)])
    b = len(views)
    moved = follow_maps(torch.from_numpy(mask).expand(b, H, W), views, VOID)
    image = AugmentConfig(crop_padding=PAD, hflip=True).apply_view(torch.from_numpy(mask + 1).expand(b, 1, H, W),
                                                                  views)
    out_boxes, out_labels = follow_boxes(torch.from_numpy(boxes).expand(b, 3, 4), torch.from_numpy(labels).expand(b, 3),
                                         views, (H, W))
    dropped = 0
    for i, (dy, dx, flip) in enumerate(views.tolist()):
        expected = _expected_map(mask, dy, dx, flip)
        assert np.array_equal(moved[i].numpy(), expected), (dy, dx, flip)
        # the image moved the same way (its zero padding where the map is void)
        picture = np.pad(mask + 1, PAD)[PAD + dy:PAD + dy + H, PAD + dx:PAD + dx + W]
        assert np.array_equal(image[i, 0].numpy(), picture[:, ::-1] if flip else picture)
        want = [(box, label) for value, label, area in ((5, 4, 4), (3, 2, 9))
                if (box := _expected_box(expected, value, area)) is not None]
        dropped += 2 - len(want)
        rows = [(box, label) for box, label in zip(out_boxes[i].tolist(), out_labels[i].tolist(), strict=True)]
        assert rows == [*want, *[([0.0] * 4, -1)] * (3 - len(want))], (dy, dx, flip)
    assert dropped > 0  # the corner object leaves the image at some offsets: dropping and compaction are covered


def _dense_data(n: int = 4, size: int = 40) -> ImageData:
    """``n`` images with one square object each (class i % 3) and its masks and box."""
    semantic = torch.zeros(n, size, size, dtype=torch.uint8)
    instances = torch.zeros(n, size, size, dtype=torch.uint8)
    boxes = torch.zeros(n, 2, 4)
    box_labels = torch.full((n, 2), -1)
    for i in range(n):
        x0, y0 = 3 * i, 2 * i + 1  # object i: columns x0..x0+9, rows y0..y0+6
        semantic[i, y0:y0 + 7, x0:x0 + 10] = i % 3 + 1
        instances[i, y0:y0 + 7, x0:x0 + 10] = 1
        boxes[i, 0] = torch.tensor([x0, y0, x0 + 10, y0 + 7])
        box_labels[i, 0] = i % 3
    targets = {"semantic": semantic, "instances": instances, "boxes": boxes, "box_labels": box_labels}
    images = (semantic.unsqueeze(1) * 60).to(torch.uint8)
    labels = box_labels[:, 0].clone()
    return ImageData("squares", images, labels, images, labels, ("a", "b", "c"), (0.5,), (0.25,), "test",
                     train_targets=targets, test_targets=targets)


def test_each_dense_task_moves_its_own_targets_by_the_view() -> None:
    data, index = _dense_data(), torch.arange(4)
    view = torch.tensor([[-3, 2, 0], [0, 0, 1], [4, -4, 1], [0, -1, 0]])
    labels = data.train_labels
    seg = TASKS.get("segmentation").bind(data, torch.device("cpu"))
    expected = [_moved(data.train_targets["semantic"][i].long().numpy(), *view[i].tolist(), 4) for i in range(4)]
    assert np.array_equal(seg.follow(seg.targets(labels, index, "train"), view).numpy(), np.stack(expected))
    both = TASKS.get("seg_boundary").bind(data, torch.device("cpu"))
    planes = both.targets(labels, index, "train")
    moved = both.follow(planes, view)
    for i in range(4):
        for p in range(2):
            assert np.array_equal(moved[i, p].numpy(), _moved(planes[i, p].numpy(), *view[i].tolist(), 4))
    model = build_model("det_student", num_classes=3, in_channels=1, image_size=40, params={"width": 4})
    det = TASKS.get("detection").bind(data, "cpu", model=model)
    boxes, box_labels = unpack_targets(det.follow(det.targets(labels, index, "train"), view), 40)
    for i in range(4):
        # the box of the moved object's pixels (every object keeps more than MIN_BOX_VISIBLE of its area here)
        rows, cols = np.nonzero(expected[i] > 0)
        want = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
        assert boxes[i, 0].tolist() == pytest.approx(want, abs=1e-4) and box_labels[i].tolist() == [i % 3, -1]


def _moved(plane: np.ndarray, dy: int, dx: int, flip: int, pad: int) -> np.ndarray:
    h, w = plane.shape
    out = np.pad(plane, pad, constant_values=VOID)[pad + dy:pad + dy + h, pad + dx:pad + dx + w]
    return out[:, ::-1] if flip else out


def test_a_sliver_below_the_visible_share_is_dropped_and_one_above_is_kept() -> None:
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 1.0]]])  # 10 columns wide; a shift of 9 keeps 1 (0.1), of 10 none
    labels = torch.tensor([[7]])
    kept, kept_labels = follow_boxes(boxes, labels, torch.tensor([[0, 9, 0]]), (8, 10), min_visible=0.1)
    assert kept.tolist() == [[[0.0, 0.0, 1.0, 1.0]]] and kept_labels.tolist() == [[7]]
    gone, gone_labels = follow_boxes(boxes, labels, torch.tensor([[0, 9, 0]]), (8, 10), min_visible=0.11)
    assert gone.tolist() == [[[0.0] * 4]] and gone_labels.tolist() == [[-1]]
    _, none = follow_boxes(boxes, labels, torch.tensor([[0, 10, 0]]), (8, 10), min_visible=0.0)
    assert none.tolist() == [[-1]]  # zero area is dropped whatever the share


def _class_images(n: int, classes: int, seed: int) -> torch.Tensor:
    """uint8 images ``(n, 1, 12, 12)`` whose pixel value is the pixel's class + 1 (so 0 marks the crop padding)."""
    return torch.randint(1, classes + 1, (n, 1, 12, 12), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


@pytest.mark.parametrize(("padding", "hflip"), [(3, True), (0, True), (4, False)])
def test_the_moved_mask_is_the_mask_of_the_loaders_augmented_image(padding: int, hflip: bool) -> None:
    images = _class_images(40, 6, 0)
    masks = images[:, 0].long() - 1
    # mean 0, std 1/255: the normalised batch is the uint8 image itself, exactly
    loader = BatchLoader(images, torch.zeros(40, dtype=torch.int64), batch_size=16, mean=(0.0,), std=(1 / 255,),
                         augment=AugmentConfig(crop_padding=padding, hflip=hflip), seed=3)
    batches = 0
    for x, _, index, view in loader.epoch_views(2):
        seen = x[:, 0].round().long()
        assert torch.equal(follow_maps(masks[index], view, VOID), torch.where(seen == 0, VOID, seen - 1))
        batches += 1
        assert view[:, 2].any() == hflip and bool((view[:, :2] != 0).any()) == (padding > 0)
    assert batches == 2
    plain = BatchLoader(images, torch.zeros(40, dtype=torch.int64), batch_size=16, mean=(0.0,), std=(1 / 255,))
    assert all(view is None for *_, view in plain.epoch_views(0))


def test_the_loaders_images_are_those_of_the_classification_augmentation() -> None:
    images = _class_images(32, 200, 1)
    augment = AugmentConfig(crop_padding=2, hflip=True)
    loader = BatchLoader(images, torch.zeros(32, dtype=torch.int64), batch_size=8, mean=(0.0,), std=(1 / 255,),
                         augment=augment, seed=5)
    for b, (x, _, index) in enumerate(loader.epoch(1)):
        gen = torch.Generator().manual_seed((5 * 1_000_003 + 1) * 100_003 + b)  # the loader's per-batch seed
        # the classification path's calls (crop, then flip): runs without dense targets see the same batches
        expected = random_hflip(random_crop(images[index], 2, gen), 0.5, gen)
        assert torch.equal(x.round().to(torch.uint8), expected)


def test_boxes_of_a_random_batch_stay_inside_the_image_with_positive_size() -> None:
    gen = torch.Generator().manual_seed(0)
    corner = torch.randint(-1, 30, (64, 6, 2), generator=gen).float()
    size = torch.randint(1, 12, (64, 6, 2), generator=gen).float()
    boxes = torch.cat([corner, corner + size], -1).clamp(0, 32)
    labels = torch.randint(-1, 5, (64, 6), generator=gen)
    view = AugmentConfig(crop_padding=6, hflip=True).draw(64, gen)
    out, out_labels = follow_boxes(boxes, labels, view, (32, 32))
    kept = out_labels >= 0
    assert kept.any() and (~kept).any()
    assert bool((out[kept] >= 0).all() and (out[kept] <= 32).all())
    assert bool((out[kept][:, 2] > out[kept][:, 0]).all() and (out[kept][:, 3] > out[kept][:, 1]).all())
    assert bool((out[~kept] == 0).all())
    # kept boxes first in every image, as the datasets pad
    assert bool((kept[:, 1:] <= kept[:, :-1]).all())
    assert int(kept.sum()) <= int((labels >= 0).sum())


def test_views_are_a_function_of_the_seed() -> None:
    images = _class_images(32, 5, 2)

    def views(seed: int) -> list[torch.Tensor]:
        loader = BatchLoader(images, torch.zeros(32, dtype=torch.int64), batch_size=8, mean=(0.0,), std=(1.0,),
                             augment=AugmentConfig(crop_padding=3, hflip=True), seed=seed)
        return [view for *_, view in loader.epoch_views(0)]

    assert all(torch.equal(a, b) for a, b in zip(views(1), views(1), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(views(1), views(2), strict=True))
    resumed = BatchLoader(images, torch.zeros(32, dtype=torch.int64), batch_size=8, mean=(0.0,), std=(1.0,),
                          augment=AugmentConfig(crop_padding=3, hflip=True), seed=1)
    assert all(torch.equal(a, b) for a, (*_, b) in zip(views(1)[2:], resumed.epoch_views(0, start=2), strict=True))


def test_the_boundary_loss_skips_void_pixels_one_by_one() -> None:
    gen = torch.Generator().manual_seed(0)
    logit = torch.randn(3, 6, 6, generator=gen, dtype=torch.float64)
    boundary = torch.randint(0, 2, (3, 6, 6), generator=gen)
    padded = boundary.clone()
    padded[0, :, :2] = VOID  # image 0: two void columns (a crop's padding); image 2 wholly unlabelled
    padded[2] = VOID
    expected = []
    for i in range(2):
        pairs = [(float(logit[i, r, c]), int(padded[i, r, c])) for r in range(6) for c in range(6)
                 if padded[i, r, c] != VOID]
        rho = sum(t for _, t in pairs) / len(pairs)
        terms = [(0.5 / rho if t else 0.5 / (1 - rho)) * (math.log1p(math.exp(-z)) if t else math.log1p(math.exp(z)))
                 for z, t in pairs]
        expected.append(sum(terms) / len(terms))
    assert float(balanced_bce(logit, padded)) == pytest.approx(sum(expected) / 2, rel=1e-12)
    whole = balanced_bce(logit, boundary)  # nothing void: the mean over every pixel, as before
    target = boundary.double()
    rho = target.flatten(1).mean(1).view(-1, 1, 1)
    weight = torch.where(target > 0, 0.5 / rho, 0.5 / (1 - rho))
    old = torch.nn.functional.binary_cross_entropy_with_logits(logit, target, weight=weight, reduction="none")
    assert float(whole) == pytest.approx(float(old.flatten(1).mean(1).mean()), rel=1e-12)


@pytest.mark.slow
def test_a_segmentation_recipe_with_crop_and_flip_trains_on_tiny_scenes(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from kdkit.recipe import recipe_from_dict
    from kdkit.runner import run_recipe
    from kdkit.tasks.segmentation import BoundSegmentation

    followed: list[tuple[torch.Tensor, torch.Tensor]] = []
    follow = BoundSegmentation.follow

    def spy(self: BoundSegmentation, targets: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        moved = follow(self, targets, view)
        followed.append((view, moved))
        return moved

    monkeypatch.setattr(BoundSegmentation, "follow", spy)
    # pixel_kd: the teacher runs on the same augmented batch as the student
    recipe = edit_recipe(tiny_seg(tmp_path, "scenes_seg/pixel_kd"), {"data.augment.crop_padding": 4,
                                                                     "data.augment.hflip": True})
    summary = run_recipe(recipe_from_dict(recipe))
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["task"] == "segmentation" and math.isfinite(rows[-1]["train_loss"])
    # every training step (48 scenes / 16: 3) moved its masks by its batch's views; the padding is void
    assert len(followed) == 3 and all(v.shape == (16, 3) for v, _ in followed)
    assert any(bool((v[:, :2] != 0).any() and v[:, 2].any()) for v, _ in followed)
    assert any(bool((m == VOID).any()) for _, m in followed)


@pytest.mark.parametrize(("overrides", "named"), [(["data.augment.hflip=true"], "data.augment.hflip"),
                                                  (["data.augment.crop_padding=2"], "data.augment.crop_padding")])
def test_a_method_making_its_own_batches_with_crop_or_flip_exits_2(capsys: pytest.CaptureFixture[str],
                                                                   overrides: list[str], named: str) -> None:
    from kdkit.cli import main
    from kdkit.recipe import find_recipe

    # TST's [A(x); x] and policy passes read the boxes by sample index, without the batch's views
    assert main(["validate", str(find_recipe("scenes_det/tst")), *overrides]) == 2
    err = capsys.readouterr().err
    assert f"- {named}: method 'tst' makes training images of its own" in err and "would not follow" in err
    assert "leave method 'tst' out" in err
    assert main(["validate", str(find_recipe("scenes_det/tst"))]) == 0  # as shipped: no crop, no flip
