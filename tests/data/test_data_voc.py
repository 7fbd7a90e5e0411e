"""The voc reader on a tiny Pascal VOC folder the tests write: XML boxes, palette PNG masks, ImageSets splits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kdkit.data import load_dataset
from kdkit.data.dense import IGNORE
from kdkit.data.voc import VOC_CLASSES
from kdkit.errors import KdkitError

W, H = 16, 12
CAT, DOG, PERSON = VOC_CLASSES.index("cat"), VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")


def palette() -> list[int]:
    """VOC's colour map (bit-interleaved), so the PNGs look like the real ones; the reader reads indices only."""
    colours = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours += [r, g, b]
    return colours


def write_palette_png(path: Path, indices: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(indices.astype(np.uint8), mode="P")
    im.putpalette(palette())
    im.save(path, format="PNG")


def xml(objects: list[tuple[str, int, tuple[Any, Any, Any, Any]]], size: tuple[int, int] = (W, H)) -> str:
    parts = [f"<annotation><filename>x.jpg</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
             "<depth>3</depth></size>"]
    for name, difficult, (x0, y0, x1, y1) in objects:
        parts.append(f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin>"
                     f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


def pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def voc_fixture(root: Path) -> dict[str, Any]:
    """Train images 2007_000001 (cat + difficult dog) and 2007_000002 (person); val 2007_000003 (dog)."""
    objects = {
        "2007_000001": [("cat", 0, (3, 2, 8, 6)), ("dog", 1, (9, 5, 14, 11))],
        "2007_000002": [("person", 0, (1, 1, 16, 12))],
        "2007_000003": [("dog", 0, (2, 3, 5, 9))],
    }
    # class maps and object maps: each object fills its box; a void (255) border around the cat
    maps = {}
    for image_id, objs in objects.items():
        cls = np.zeros((H, W), np.uint8)
        obj = np.zeros((H, W), np.uint8)
        for i, (name, _, (x0, y0, x1, y1)) in enumerate(objs, 1):
            cls[y0 - 1:y1, x0 - 1:x1] = VOC_CLASSES.index(name) + 1
            obj[y0 - 1:y1, x0 - 1:x1] = i
        maps[image_id] = (cls, obj)
    cls, obj = maps["2007_000001"]
    cls[0, 1:9], obj[0, 1:9] = IGNORE, IGNORE
    for i, (image_id, objs) in enumerate(objects.items()):
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{image_id}.xml").write_text(xml(objs))
        (root / "JPEGImages").mkdir(exist_ok=True)
        Image.fromarray(pixels(i)).save(root / "JPEGImages" / f"{image_id}.png")
        write_palette_png(root / "SegmentationClass" / f"{image_id}.png", maps[image_id][0])
        write_palette_png(root / "SegmentationObject" / f"{image_id}.png", maps[image_id][1])
    for sets in ("Segmentation", "Main"):
        (root / "ImageSets" / sets).mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / sets / "train.txt").write_text("2007_000001\n2007_000002\n\n")
        (root / "ImageSets" / sets / "val.txt").write_text("2007_000003\n")
    return maps


def load(root: Path, **params: Any) -> Any:
    return load_dataset("voc", root=root, **{"image_size": W, **params})


def test_voc_targets_equal_what_was_written(tmp_path: Path) -> None:
    maps = voc_fixture(tmp_path)
    data = load(tmp_path)
    assert data.classes == VOC_CLASSES and data.warnings == ()
    # 16 x 12 images are already as wide as image_size: padded at the bottom only, pixels unchanged
    assert torch.equal(data.train_images[0, :, :H], torch.from_numpy(pixels(0)).permute(2, 0, 1))
    assert bool((data.train_images[:, :, H:] == 0).all())
    t = data.train_targets
    # 1-based inclusive VOC boxes -> 0-based, exclusive ends
    assert t["boxes"].tolist() == [[[2, 1, 8, 6], [8, 4, 14, 11]], [[0, 0, 16, 12], [0, 0, 0, 0]]]
    assert t["box_labels"].tolist() == [[CAT, DOG], [PERSON, -1]]
    # the class maps' indices as they are (255 void kept), padded with background rows
    for i, image_id in enumerate(("2007_000001", "2007_000002")):
        cls, obj = maps[image_id]
        assert np.array_equal(t["semantic"][i, :H].numpy(), cls)
        assert np.array_equal(t["instances"][i, :H].numpy(), obj)  # every object kept: ids unchanged
        assert not t["semantic"][i, H:].any() and not t["instances"][i, H:].any()
    assert IGNORE in t["semantic"][0].unique().tolist()
    assert t["multilabel"][0].nonzero().flatten().tolist() == [CAT, DOG]
    # image 1: the dog (6 x 7 = 42 pixels) shows more than the cat (6 x 5 = 30, less its void row)
    assert data.train_labels.tolist() == [DOG, PERSON] and data.test_labels.tolist() == [DOG]
    assert data.test_targets["boxes"].tolist() == [[[1, 2, 5, 9], [0, 0, 0, 0]]]


def test_voc_difficult_drop(tmp_path: Path) -> None:
    maps = voc_fixture(tmp_path)
    data = load(tmp_path, difficult="drop")
    t = data.train_targets
    assert t["box_labels"].tolist() == [[CAT], [PERSON]] and t["boxes"][0].tolist() == [[2, 1, 8, 6]]
    # the dropped dog is still a dog in the class map; in the object map its pixels are of no kept object: ignore
    cls, obj = maps["2007_000001"]
    assert np.array_equal(t["semantic"][0, :H].numpy(), cls)
    expected = np.where(obj == 2, IGNORE, obj)
    assert np.array_equal(t["instances"][0, :H].numpy(), expected)
    assert data.train_labels.tolist() == [CAT, PERSON] and data.warnings == ()


def test_voc_main_sets_without_masks_are_ignore(tmp_path: Path) -> None:
    voc_fixture(tmp_path)
    (tmp_path / "SegmentationClass" / "2007_000002.png").unlink()
    (tmp_path / "SegmentationObject" / "2007_000002.png").unlink()
    data = load(tmp_path, sets="Main")
    assert bool((data.train_targets["semantic"][1, :H] == IGNORE).all())
    assert bool((data.train_targets["instances"][1, :H] == IGNORE).all())
    assert data.train_labels.tolist() == [DOG, PERSON]  # no object map: the largest box
    with pytest.raises(KdkitError, match="class map not found"):
        load(tmp_path, sets="Segmentation")


def test_voc_skips_bad_objects_and_counts_them_per_file(tmp_path: Path) -> None:
    voc_fixture(tmp_path)
    path = tmp_path / "Annotations" / "2007_000002.xml"
    path.write_text(xml([("person", 0, (1, 1, 16, 12)), ("unicorn", 0, (1, 1, 3, 3)), ("cat", 0, (9, 2, 4, 6)),
                         ("cat", 0, (20, 2, 30, 6)), ("cat", 0, ("a", 2, 4, 6))]))
    data = load(tmp_path)
    (message,) = data.warnings
    assert message.startswith(f"{path}: skipped 4 objects: ")
    for part in ("1 objects whose class is missing from the class list (first: object 2 ('unicorn'))",
                 "1 boxes with x2 < x1 or y2 < y1 (first: object 3 ('cat'), box [8.0, 1.0, 4.0, 6.0])",
                 "1 boxes outside the 16x12 image (by more than 1 px) (first: object 4",
                 "1 objects without a bndbox of four numbers (first: object 5"):
        assert part in message, (part, message)
    assert data.train_targets["box_labels"][1].tolist() == [PERSON, -1]


def test_voc_mask_of_another_size(tmp_path: Path) -> None:
    voc_fixture(tmp_path)
    path = tmp_path / "SegmentationClass" / "2007_000003.png"
    write_palette_png(path, np.zeros((H, W + 1), np.uint8))
    with pytest.raises(KdkitError, match=r"class map is 17x12 .* but its image .* is 16x12") as info:
        load(tmp_path)
    assert info.value.where == str(path)


def test_voc_whole_file_problems(tmp_path: Path) -> None:
    voc_fixture(tmp_path)
    (tmp_path / "Annotations" / "2007_000001.xml").write_text("<annotation><object>")
    with pytest.raises(KdkitError, match="not valid XML"):
        load(tmp_path)
    voc_fixture(tmp_path)
    (tmp_path / "Annotations" / "2007_000001.xml").write_text(xml([("cat", 0, (3, 2, 8, 6))], size=(20, 12)))
    with pytest.raises(KdkitError, match="<size> is 20x12 but the image"):
        load(tmp_path)
    voc_fixture(tmp_path)
    (tmp_path / "JPEGImages" / "2007_000003.png").unlink()
    with pytest.raises(KdkitError, match="no image for id '2007_000003'"):
        load(tmp_path)
    voc_fixture(tmp_path)
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    with pytest.raises(KdkitError, match="the split list is empty"):
        load(tmp_path)
    voc_fixture(tmp_path)
    write_palette_png(tmp_path / "SegmentationClass" / "2007_000003.png", np.full((H, W), 21, np.uint8))
    with pytest.raises(KdkitError, match="class map holds index 21, but there are 20 classes"):
        load(tmp_path)
    voc_fixture(tmp_path)
    write_palette_png(tmp_path / "SegmentationObject" / "2007_000003.png", np.full((H, W), 2, np.uint8))
    with pytest.raises(KdkitError, match="object map holds index 2, but its XML lists 1 objects"):
        load(tmp_path)


@pytest.mark.parametrize(("params", "match"), [
    ({"sets": "Layout"}, "sets 'Layout' is not a VOC split folder; valid choices: Segmentation, Main"),
    ({"difficult": "maybe"}, "difficult 'maybe' is not a choice"),
    ({"classes": ["a", "a"]}, "distinct non-empty names"),
])
def test_voc_bad_parameters(tmp_path: Path, params: dict, match: str) -> None:
    voc_fixture(tmp_path)
    with pytest.raises(KdkitError, match=match):
        load(tmp_path, **params)


def test_voc_custom_classes(tmp_path: Path) -> None:
    root = tmp_path
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "Annotations" / "a.xml").write_text(xml([("weed", 0, (1, 1, 4, 4))]))
    Image.fromarray(pixels(3)).save(root / "JPEGImages" / "a.png")
    cls = np.zeros((H, W), np.uint8)
    cls[0:4, 0:4] = 2
    write_palette_png(root / "SegmentationClass" / "a.png", cls)
    for split in ("train", "val"):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("a\n")
    data = load(root, classes=["crop", "weed"])
    assert data.classes == ("crop", "weed") and data.train_targets["box_labels"].tolist() == [[1]]
    assert np.array_equal(data.train_targets["semantic"][0, :H].numpy(), cls)
    assert bool((data.train_targets["instances"][0, :H] == IGNORE).all())  # no object map
