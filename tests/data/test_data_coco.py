"""The coco reader on tiny COCO files the tests write: boxes, labels and masks exactly as written; bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_recipe
from kdkit.cli import main
from kdkit.data import load_dataset
from kdkit.data.dense import IGNORE
from kdkit.errors import KdkitError

pycocotools_mask = pytest.importorskip("pycocotools.mask")

S = 16


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE, written here without pycocotools: run lengths of the column-major pixels, zeros
    first."""
    flat = mask.T.ravel().astype(bool)
    counts, value, run = [], False, 0
    for pixel in flat:
        if pixel == value:
            run += 1
        else:
            counts.append(run)
            value, run = pixel, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = pycocotools_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}


def rect(h: int, w: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[rows, cols] = True
    return mask


# object masks of the fixture, by name
DOG_A = rect(S, S, slice(3, 9), slice(2, 8))  # polygon (2,3)-(8,9): rows 3..8, columns 2..7
CAT_A = rect(S, S, slice(7, 12), slice(6, 11))  # overlaps DOG_A at rows 7..8, columns 6..7; painted later
CAT_A[9, 8] = False  # a hole: RLE keeps any shape
CAT_B = rect(S, S, slice(0, 4), slice(0, 16))
CROWD_B = rect(S, S, slice(10, 16), slice(0, 5))
# L-shape polygon with corners on pixel boundaries: rows 1..6 x columns 1..2, plus rows 5..6 x columns 3..6
DOG_C = rect(S, S, slice(1, 7), slice(1, 3)) | rect(S, S, slice(5, 7), slice(3, 7))


def write_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def pixels(seed: int, h: int = S, w: int = S) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def coco_fixture(root: Path) -> dict[str, dict[str, Any]]:
    """Train images a, b and test image c with the objects above; categories listed out of id order."""
    categories = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]  # labels: cat (id 3) 0, dog (id 7) 1
    for split, names in (("train", ("a", "b")), ("val", ("c",))):
        for i, name in enumerate(names):
            write_image(root / split / f"{name}.png", pixels(ord(name) + i))
    train = {
        "images": [{"id": 10, "file_name": "a.png", "width": S, "height": S},
                   {"id": 11, "file_name": "b.png", "width": S, "height": S}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "iscrowd": 0, "bbox": [2, 3, 6, 6],
             "segmentation": [[2, 3, 8, 3, 8, 9, 2, 9]]},
            {"id": 2, "image_id": 10, "category_id": 3, "iscrowd": 0, "bbox": [6.0, 7.0, 5.0, 5.0],
             "segmentation": uncompressed_rle(CAT_A)},
            {"id": 3, "image_id": 11, "category_id": 3, "iscrowd": 0, "bbox": [0.5, 0.0, 15.5, 4.0],
             "segmentation": compressed_rle(CAT_B)},
            {"id": 4, "image_id": 11, "category_id": 7, "iscrowd": 1, "bbox": [0, 10, 5, 6],
             "segmentation": uncompressed_rle(CROWD_B)},
        ],
        "categories": categories,
    }
    val = {
        "images": [{"id": 1, "file_name": "c.png", "width": S, "height": S}],
        "annotations": [{"id": 9, "image_id": 1, "category_id": 7, "iscrowd": 0, "bbox": [1, 1, 5, 6],
                         "segmentation": [[1, 1, 3, 1, 3, 5, 7, 5, 7, 7, 1, 7]]}],
        "categories": categories,
    }
    docs = {"train": train, "val": val}
    write_docs(root, docs)
    return docs


def write_docs(root: Path, docs: dict[str, dict[str, Any]]) -> None:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, doc in docs.items():
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))


def load(root: Path, **params: Any) -> Any:
    return load_dataset("coco", root=root, train="train", test="val", **{"image_size": S, **params})


def test_coco_targets_equal_what_was_written(tmp_path: Path) -> None:
    coco_fixture(tmp_path)
    data = load(tmp_path)
    assert data.classes == ("cat", "dog")  # ascending category id: 3 -> 0, 7 -> 1
    assert data.warnings == ()
    # images exactly as written (already 16x16: not resized)
    assert torch.equal(data.train_images[0], torch.from_numpy(pixels(ord("a"))).permute(2, 0, 1))
    assert torch.equal(data.test_images[0], torch.from_numpy(pixels(ord("c"))).permute(2, 0, 1))
    t = data.train_targets
    # K = 2 (image a has two objects); xywh -> x0, y0, x1, y1; the crowd annotation is no object
    assert t["boxes"].dtype == torch.float32 and t["boxes"].tolist() == [
        [[2, 3, 8, 9], [6, 7, 11, 12]], [[0.5, 0, 16, 4], [0, 0, 0, 0]]]
    assert t["box_labels"].dtype == torch.int64 and t["box_labels"].tolist() == [[1, 0], [0, -1]]
    # masks painted in annotation order: the cat (object 1) covers the dog where they overlap
    inst_a = np.zeros((S, S), np.uint8)
    inst_a[DOG_A], inst_a[CAT_A] = 1, 2
    sem_a = np.zeros((S, S), np.uint8)
    sem_a[DOG_A], sem_a[CAT_A] = 2, 1
    inst_b = np.zeros((S, S), np.uint8)
    inst_b[CAT_B], inst_b[CROWD_B] = 1, IGNORE  # a crowd region: of a known class, but no single object
    sem_b = np.zeros((S, S), np.uint8)
    sem_b[CAT_B], sem_b[CROWD_B] = 1, 2
    assert t["instances"].dtype == torch.uint8 and t["semantic"].dtype == torch.uint8
    assert np.array_equal(t["instances"].numpy(), np.stack([inst_a, inst_b]))
    assert np.array_equal(t["semantic"].numpy(), np.stack([sem_a, sem_b]))
    assert t["multilabel"].tolist() == [[1, 1], [1, 0]]
    # image a: dog shows 36 - 4 = 32 pixels, cat 24: the dog dominates
    assert data.train_labels.tolist() == [1, 0]
    inst_c = np.zeros((S, S), np.uint8)
    inst_c[DOG_C] = 1
    assert np.array_equal(data.test_targets["instances"][0].numpy(), inst_c)
    assert np.array_equal(data.test_targets["semantic"][0].numpy(), inst_c * 2)
    assert data.test_targets["boxes"].tolist() == [[[1, 1, 6, 7], [0, 0, 0, 0]]]
    assert data.test_labels.tolist() == [1]


def test_coco_fits_images_boxes_and_masks_to_image_size(tmp_path: Path) -> None:
    # a 20 x 10 (w x h) image fitted to 10: scaled by 1/2 to 10 x 5, then padded at the bottom
    write_image(tmp_path / "train" / "w.png", np.full((10, 20, 3), 200, np.uint8))
    mask = rect(10, 20, slice(2, 6), slice(4, 12))
    doc = {"images": [{"id": 1, "file_name": "w.png", "width": 20, "height": 10}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 2, 8, 4],
                            "segmentation": compressed_rle(mask)}],
           "categories": [{"id": 1, "name": "thing"}]}
    write_docs(tmp_path, {"train": doc, "val": {**doc, "images": doc["images"]}})
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "w.png").write_bytes((tmp_path / "train" / "w.png").read_bytes())
    data = load(tmp_path, image_size=10)
    assert data.train_images.shape == (1, 3, 10, 10)
    assert bool((data.train_images[0, :, :5] == 200).all()) and bool((data.train_images[0, :, 5:] == 0).all())
    assert data.train_targets["boxes"].tolist() == [[[2, 1, 6, 3]]]
    # nearest-exact: output pixel r takes input row 2r + 1, so rows 1..2 and columns 2..5 of the rectangle remain,
    # exactly the scaled box; the padding rows 5..9 are background
    expected = np.zeros((10, 10), np.uint8)
    expected[1:3, 2:6] = 1
    assert np.array_equal(data.train_targets["semantic"][0].numpy(), expected)
    assert np.array_equal(data.train_targets["instances"][0].numpy(), expected)


def test_coco_skips_bad_annotations_and_counts_them_per_file(tmp_path: Path) -> None:
    docs = coco_fixture(tmp_path)
    bad = [
        {"id": 20, "image_id": 10, "category_id": 3, "bbox": [30, 30, 5, 5], "segmentation": []},  # outside
        {"id": 21, "image_id": 10, "category_id": 3, "bbox": [8, 2, -3, 4], "segmentation": []},  # x2 < x1
        {"id": 22, "image_id": 10, "category_id": 99, "bbox": [1, 1, 2, 2], "segmentation": []},  # no category 99
        {"id": 23, "image_id": 11, "category_id": 3, "bbox": [1, 1, 2, 2],
         "segmentation": compressed_rle(np.ones((8, 8), bool))},  # an 8x8 mask on a 16x16 image
        {"id": 24, "image_id": 77, "category_id": 3, "bbox": [1, 1, 2, 2], "segmentation": []},  # no image 77
        {"id": 25, "image_id": 11, "category_id": 3, "bbox": [1, 1, 2, 2], "segmentation": [[1, 2, 3]]},
        {"id": 26, "image_id": 11, "category_id": 3, "bbox": [10, 5, 6.5, 3], "segmentation": []},  # 0.5 px over
    ]
    docs["train"]["annotations"] += bad
    write_docs(tmp_path, docs)
    data = load(tmp_path)
    (message,) = data.warnings
    path = str(tmp_path / "annotations" / "instances_train.json")
    assert message.startswith(f"{path}: skipped 7 annotations: ")
    for part in ("1 boxes outside the 16x16 image (by more than 1 px) (first: annotation id 20 of image id 10",
                 "1 boxes with x2 < x1 or y2 < y1 (first: annotation id 21",
                 "1 annotations whose category id is missing from the categories (first: annotation id 22 of image "
                 "id 10, category_id 99)",
                 "1 masks whose size differs from their image (RLE size vs [16, 16]) (first: annotation id 23",
                 "1 annotations of an image id missing from images (first: annotation id 24",
                 "1 malformed polygons", "1 boxes clipped to their image"):
        assert part in message, (part, message)
    # the clipped box is kept (clipped); no skipped one is
    assert data.train_targets["boxes"][1].tolist() == [[0.5, 0, 16, 4], [10, 5, 16, 8]]
    assert data.train_targets["box_labels"].tolist() == [[1, 0], [0, 0]]


def test_coco_leaves_out_images_without_objects_with_a_warning(tmp_path: Path) -> None:
    docs = coco_fixture(tmp_path)
    write_image(tmp_path / "train" / "e.png", pixels(5))
    docs["train"]["images"].append({"id": 12, "file_name": "e.png", "width": S, "height": S})
    write_docs(tmp_path, docs)
    data = load(tmp_path)
    assert len(data.train_labels) == 2
    assert data.warnings == (f"coco train split: left out 1 image(s) without an object (an image's label is its "
                             f"dominant object's class; first: {tmp_path / 'train' / 'e.png'})",)


def test_coco_max_objects_pads_or_caps(tmp_path: Path) -> None:
    coco_fixture(tmp_path)
    padded = load(tmp_path, max_objects=4)
    assert padded.train_targets["boxes"].shape == (2, 4, 4) and padded.train_targets["box_labels"][0].tolist() == \
        [1, 0, -1, -1]
    capped = load(tmp_path, max_objects=1)
    assert capped.train_targets["box_labels"].tolist() == [[1], [0]]
    inst = capped.train_targets["instances"][0].numpy()
    assert set(np.unique(inst[CAT_A]).tolist()) == {IGNORE}  # the capped cat is an object of unknown id
    assert "1 image(s) hold more than 1 objects" in capped.warnings[0]


@pytest.mark.parametrize(("content", "match"), [
    ("", "the annotation file is empty"),
    ("   \n", "the annotation file is empty"),
    ("{\"images\": [", "not valid JSON"),
    ("[]", "holds a JSON list"),
    ("{\"images\": [], \"annotations\": [], \"categories\": []}", "the file lists no images"),
    ("{\"images\": [{\"id\": 1, \"file_name\": \"a.png\", \"width\": 16, \"height\": 16}], \"categories\": []}",
     "'annotations' is missing"),
])
def test_coco_whole_file_problems(tmp_path: Path, content: str, match: str) -> None:
    coco_fixture(tmp_path)
    path = tmp_path / "annotations" / "instances_train.json"
    path.write_text(content)
    with pytest.raises(KdkitError, match=match) as info:
        load(tmp_path)
    assert info.value.where == str(path) and info.value.fix


def test_coco_duplicate_ids_and_bad_entries(tmp_path: Path) -> None:
    docs = coco_fixture(tmp_path)
    docs["train"]["images"][1]["id"] = 10
    write_docs(tmp_path, docs)
    with pytest.raises(KdkitError, match="image id 10 is listed twice"):
        load(tmp_path)
    docs = coco_fixture(tmp_path)
    docs["train"]["categories"][0]["name"] = 5
    write_docs(tmp_path, docs)
    with pytest.raises(KdkitError, match="category #0 has name=5; every category needs a non-empty string"):
        load(tmp_path)


def test_coco_missing_image(tmp_path: Path) -> None:
    coco_fixture(tmp_path)
    (tmp_path / "train" / "b.png").unlink()
    with pytest.raises(KdkitError, match="image file not found") as info:
        load(tmp_path)
    assert info.value.where == str(tmp_path / "train" / "b.png")


def test_coco_image_of_another_size_than_the_file_says(tmp_path: Path) -> None:
    coco_fixture(tmp_path)
    write_image(tmp_path / "train" / "b.png", pixels(1, 12, S))
    with pytest.raises(KdkitError, match=r"is 16x12 but instances_train.json gives it width 16, height 16"):
        load(tmp_path)


def test_coco_split_categories_must_agree(tmp_path: Path) -> None:
    docs = coco_fixture(tmp_path)
    docs["val"]["categories"] = [{"id": 7, "name": "dog"}]
    write_docs(tmp_path, docs)
    with pytest.raises(KdkitError, match="lists other categories"):
        load(tmp_path)


def test_coco_all_annotations_bad_fails(tmp_path: Path) -> None:
    docs = coco_fixture(tmp_path)
    for ann in docs["train"]["annotations"]:
        ann["category_id"] = 42
    write_docs(tmp_path, docs)
    with pytest.raises(KdkitError, match="coco train split has no image with an object") as info:
        load(tmp_path)
    # what was skipped is in the error, since no dataset (and so no warning) comes back
    assert "skipped 4 annotations: 4 annotations whose category id is missing" in info.value.message


def test_coco_needs_root_and_a_valid_image_size(tmp_path: Path) -> None:
    with pytest.raises(KdkitError, match=r"needs data\.root"):
        load_dataset("coco")
    with pytest.raises(KdkitError, match="image_size must be a positive integer"):
        load(tmp_path, image_size=0)


def test_run_fails_with_exit_code_2_on_an_empty_annotation_file(tmp_path: Path, tiny: dict,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    coco_fixture(tmp_path / "coco")
    path = tmp_path / "coco" / "annotations" / "instances_train.json"
    path.write_text("")
    tiny["data"] = {"dataset": "coco", "root": str(tmp_path / "coco"),
                    "params": {"train": "train", "test": "val", "image_size": S}}
    code = main(["run", str(write_recipe(tmp_path / "recipe.yaml", tiny))])
    err = capsys.readouterr().err
    assert code == 2 and f"{path}: the annotation file is empty" in err and "fix:" in err
    assert not (Path(tiny["output"]["dir"]) / "checkpoints").exists()


def coco_recipe(tmp_path: Path, tiny: dict) -> dict:
    """The tiny recipe on the fixture with one annotation of an unknown category."""
    docs = coco_fixture(tmp_path / "coco")
    docs["train"]["annotations"].append({"id": 30, "image_id": 10, "category_id": 99, "bbox": [1, 1, 2, 2]})
    write_docs(tmp_path / "coco", docs)
    tiny["data"] = {"dataset": "coco", "root": str(tmp_path / "coco"),
                    "params": {"train": "train", "test": "val", "image_size": S}, "augment": {"crop_padding": 0}}
    tiny["train"].update(epochs=1, batch_size=2)
    return tiny


def test_skipped_annotations_are_plan_warnings(tmp_path: Path, tiny: dict) -> None:
    from kdkit.build import plan
    from kdkit.recipe import recipe_from_dict

    built = plan(recipe_from_dict(coco_recipe(tmp_path, tiny)), training=True)
    path = tmp_path / "coco" / "annotations" / "instances_train.json"
    assert built.warnings == [f"data: {path}: skipped 1 annotations: 1 annotations whose category id is missing "
                              "from the categories (first: annotation id 30 of image id 10, category_id 99)"]


@pytest.mark.slow
def test_skipped_annotations_are_recorded_by_the_run(tmp_path: Path, tiny: dict,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    tiny = coco_recipe(tmp_path, tiny)
    assert main(["run", str(write_recipe(tmp_path / "recipe.yaml", tiny))]) == 0
    err = capsys.readouterr().err
    assert "warning: data: " in err and "skipped 1 annotations" in err
    summary = json.loads((Path(tiny["output"]["dir"]) / "summary.json").read_text())
    assert any("annotations whose category id is missing from the categories" in w for w in summary["warnings"])


def test_root_under_params_is_refused_with_its_fix(tmp_path: Path, tiny: dict,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    coco_fixture(tmp_path / "coco")
    tiny["data"] = {"dataset": "coco", "params": {"root": str(tmp_path / "coco"), "train": "train", "test": "val"}}
    assert main(["validate", str(write_recipe(tmp_path / "recipe.yaml", tiny))]) == 2
    assert "data.params: Value error, the data folder is data.root, not data.params.root" in capsys.readouterr().err
    tiny["data"] = {"dataset": "coco", "root": str(tmp_path / "coco"), "params": {"train": "train", "test": "val"}}
    assert main(["validate", str(write_recipe(tmp_path / "recipe.yaml", tiny))]) == 0
