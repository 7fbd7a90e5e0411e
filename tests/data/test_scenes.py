"""Fashion-MNIST scenes: composition checked against an independent recomputation, the cache, the reader."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdkit.cli import main
from kdkit.data import ImageData, load_dataset, subset, write_idx
from kdkit.data import scenes as scenes_mod
from kdkit.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, fashion_mnist
from kdkit.data.scenes import FOREGROUND_THRESHOLD, MIN_VISIBLE, Scenes, compose_scenes, load_scene_splits
from kdkit.errors import KdkitError

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TRAIN_MAX = 140  # fake train objects have intensities in [60, 140], test objects in [180, 255]
TEST_MIN = 180


def fake_objects(n: int, low: int, high: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Filled rectangles and ellipses of random per-pixel intensities in [low, high] on faint noise (<= 20).

    The noise is below the foreground threshold and blurs into the objects' edges when resized, so the
    threshold decides which pixels belong to an object. Object 0 is blank (noise only): never placeable.
    """
    rng = np.random.default_rng(seed)
    images = rng.integers(0, FOREGROUND_THRESHOLD + 1, (n, 28, 28)).astype(np.uint8)
    yy, xx = np.mgrid[:28, :28]
    for i in range(1, n):
        y0, x0 = rng.integers(0, 12, 2)
        y1, x1 = y0 + rng.integers(6, 16), x0 + rng.integers(6, 16)
        if i % 2:
            mask = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
        else:
            cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) / 2, (x1 - x0) / 2
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        images[i][mask] = rng.integers(low, high + 1, int(mask.sum()))
    return images, (np.arange(n) % 10).astype(np.uint8)


def make_fashion_dir(root: Path, n_train: int = 41, n_test: int = 21) -> Path:
    train, train_labels = fake_objects(n_train, 60, TRAIN_MAX, seed=1)
    test, test_labels = fake_objects(n_test, TEST_MIN, 255, seed=2)
    for name, array in zip(FILES, (train, train_labels, test, test_labels), strict=True):
        write_idx(root / name, array)
    return root


def recompose(objects: torch.Tensor, placements: torch.Tensor, size: int) -> tuple[np.ndarray, np.ndarray,
                                                                                     list[int]]:
    """Paste one canvas's objects from its placement rows, independently of the generator's loop."""
    canvas = np.zeros((size, size), dtype=np.uint8)
    inst = np.zeros((size, size), dtype=np.uint8)
    totals = []
    for j, (obj, x0, y0, h, w) in enumerate(placements.tolist()):
        if obj < 0:
            break
        assert x0 >= 0 and x0 + w <= size and y0 >= 0 and y0 + h <= size, "object not fully inside the canvas"
        resized = F.interpolate(objects[obj][None, None].float(), size=(h, w), mode="bilinear",
                                align_corners=False, antialias=True)[0, 0].round().clamp(0, 255).byte().numpy()
        fg = resized > FOREGROUND_THRESHOLD
        canvas[y0:y0 + h, x0:x0 + w][fg] = resized[fg]
        inst[y0:y0 + h, x0:x0 + w][fg] = j + 1
        totals.append(int(fg.sum()))
    return canvas, inst, totals


def check_scenes(sc: Scenes, objects: torch.Tensor, labels: torch.Tensor, size: int, max_objects: int,
                 scale: tuple[float, float] = (0.75, 1.5)) -> dict[str, int]:
    """Every target of every canvas against a recomputation from the object images; returns coverage stats."""
    m = len(sc)
    assert sc.images.shape == (m, 1, size, size) and sc.images.dtype == torch.uint8
    assert sc.boxes.shape == (m, max_objects, 4) and sc.box_labels.shape == (m, max_objects)
    stats = {"occluded": 0, "max_count": 0, "min_fraction_x1000": 1000}
    for i in range(m):
        canvas, inst, totals = recompose(objects, sc.placements[i], size)
        k = len(totals)
        stats["max_count"] = max(stats["max_count"], k)
        assert 1 <= k <= max_objects
        assert (sc.placements[i, k:] == -1).all() and (sc.box_labels[i, k:] == -1).all()
        assert (sc.boxes[i, k:] == 0).all()
        for j in range(k):
            h, w, s = int(sc.placements[i, j, 3]), int(sc.placements[i, j, 4]), float(sc.scales[i, j])
            assert scale[0] <= s <= scale[1] and h == w == int(np.floor(28 * s + 0.5))
        np.testing.assert_array_equal(sc.instances[i].numpy(), inst)
        np.testing.assert_array_equal(sc.images[i, 0].numpy(), canvas)
        assert (sc.images[i, 0][sc.instances[i] == 0] == 0).all(), "pixel outside every instance mask is not 0"
        obj_labels = [int(labels[o]) for o in sc.placements[i, :k, 0]]
        assert sc.box_labels[i, :k].tolist() == obj_labels
        expected_sem = np.zeros_like(inst)
        areas = []
        for j in range(k):
            mask = inst == j + 1
            areas.append(int(mask.sum()))
            expected_sem[mask] = obj_labels[j] + 1
            assert areas[j] >= MIN_VISIBLE * totals[j] > 0, f"object {j} of canvas {i} is hidden too much"
            stats["occluded"] += areas[j] < totals[j]
            stats["min_fraction_x1000"] = min(stats["min_fraction_x1000"], 1000 * areas[j] // totals[j])
            ys, xs = np.nonzero(mask)
            assert sc.boxes[i, j].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        np.testing.assert_array_equal(sc.semantic[i].numpy(), expected_sem)
        visible_classes = {obj_labels[j] for j in range(k) if areas[j] > 0}
        assert set(torch.nonzero(sc.multilabel[i]).flatten().tolist()) == visible_classes
        assert sc.multilabel[i].dtype == torch.uint8 and int(sc.multilabel[i].max()) == 1
        best = max(range(k), key=lambda j: (areas[j], -j))  # largest visible area, ties to the earliest
        assert int(sc.dominant[i]) == obj_labels[best]
    return stats


def fake_split(seed: int, n: int = 41) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = fake_objects(n, 60, TRAIN_MAX, seed)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def test_targets_agree_with_recomposed_pixels() -> None:
    objects, labels = fake_split(seed=1)
    sc = compose_scenes(objects, labels, 60, size=48, max_objects=4, seed=7)
    stats = check_scenes(sc, objects, labels, size=48, max_objects=4)
    # The checks above must have met occlusion and full canvases, or they prove little.
    assert stats["occluded"] >= 10 and stats["max_count"] == 4
    assert stats["min_fraction_x1000"] < 900
    assert 0 not in sc.placements[:, :, 0].tolist(), "the blank object 0 has no foreground and must never be placed"
    assert sc.instances.dtype == sc.semantic.dtype == torch.uint8 and sc.boxes.dtype == torch.float32
    assert sc.dominant.dtype == sc.box_labels.dtype == torch.int64


def test_min_objects_and_single_object_canvases() -> None:
    objects, labels = fake_split(seed=3)
    sc = compose_scenes(objects, labels, 15, size=42, min_objects=3, max_objects=3, scale=(1.0, 1.0), seed=0)
    check_scenes(sc, objects, labels, size=42, max_objects=3, scale=(1.0, 1.0))
    assert ((sc.placements[:, :, 0] >= 0).sum(1) == 3).all()
    one = compose_scenes(objects, labels, 5, size=30, max_objects=1, scale=(0.75, 1.0), seed=0)
    check_scenes(one, objects, labels, size=30, max_objects=1, scale=(0.75, 1.0))
    assert (one.instances.flatten(1).max(1).values == 1).all()


def test_dominant_ties_go_to_the_earliest_object() -> None:
    # Two copies of one 8x8 square with different labels, never scaled: separate squares tie on area.
    square = torch.zeros(28, 28, dtype=torch.uint8)
    square[10:18, 10:18] = 200
    objects, labels = square.expand(2, 28, 28).clone(), torch.tensor([3, 5])
    sc = compose_scenes(objects, labels, 40, size=64, min_objects=2, max_objects=2, scale=(1.0, 1.0), seed=0)
    check_scenes(sc, objects, labels, size=64, max_objects=2, scale=(1.0, 1.0))
    tied = (sc.instances == 1).sum((1, 2)) == (sc.instances == 2).sum((1, 2))
    assert tied.sum() >= 10
    assert torch.equal(sc.dominant[tied], sc.box_labels[tied, 0])
    assert set(sc.box_labels[tied, 0].tolist()) == {3, 5}  # both orders occur, so "earliest" is not "lowest"


def test_deterministic_by_seed_without_global_rng() -> None:
    objects, labels = fake_split(seed=1)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    a = compose_scenes(objects, labels, 20, size=48, seed=5)
    torch.manual_seed(99)  # the global RNGs must not matter
    np.random.seed(99)
    b = compose_scenes(objects, labels, 20, size=48, seed=5)
    c = compose_scenes(objects, labels, 20, size=48, seed=6)
    for name in ("images", "multilabel", "semantic", "instances", "boxes", "box_labels", "dominant", "placements",
                 "scales"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.images, c.images) and not torch.equal(a.placements, c.placements)
    torch.set_rng_state(torch_state)
    np.random.set_state(np_state)
    before = torch.get_rng_state()
    compose_scenes(objects, labels, 3, size=48, seed=5)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"size": 40}, "size 40"),  # a 1.5x object is 42 pixels
    ({"max_objects": 0}, "max_objects"),
    ({"min_objects": 3, "max_objects": 2}, "max_objects"),
    ({"scale": (1.5, 0.75)}, "scale"),
    ({"labels": torch.zeros(3, dtype=torch.int64)}, "labels"),
    ({"labels": torch.full((41,), 10, dtype=torch.int64)}, "labels span"),
    ({"objects": torch.zeros(41, 28, 28)}, "uint8"),
    ({"count": -1}, "count"),
])
def test_compose_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    objects, labels = fake_split(seed=1)
    args = {"objects": objects, "labels": labels, "count": 2, "size": 64, "seed": 0, **kwargs}
    with pytest.raises(KdkitError, match=match) as info:
        compose_scenes(**args)
    assert info.value.where == "data" and info.value.fix


def test_compose_fails_clearly_when_nothing_is_visible() -> None:
    blank = torch.full((4, 28, 28), FOREGROUND_THRESHOLD, dtype=torch.uint8)  # all at, none above, the threshold
    with pytest.raises(KdkitError, match="could not place") as info:
        compose_scenes(blank, torch.zeros(4, dtype=torch.int64), 1, size=64, seed=0)
    assert info.value.fix


def test_reader_uses_split_objects_and_builds_image_data(tmp_path: Path) -> None:
    root = make_fashion_dir(tmp_path / "fm", n_train=41, n_test=41)  # equal sizes: one seed would give equal draws
    params = {"size": 48, "train_scenes": 30, "test_scenes": 12, "max_objects": 3, "seed": 4,
              "cache_dir": tmp_path / "cache"}
    data = load_dataset("fashion_mnist_scenes", root=root, **params)
    assert data.train_images.shape == (30, 1, 48, 48) and data.test_images.shape == (12, 1, 48, 48)
    assert data.classes == FASHION_MNIST_CLASSES and data.num_classes == 10
    # Train canvases hold only train intensities (<= 140); test canvases show test objects (>= 180).
    assert int(data.train_images.max()) <= TRAIN_MAX
    assert all(int(img.max()) >= TEST_MIN for img in data.test_images)
    # Both splits recompose exactly from their own split's objects.
    source = fashion_mnist(root)
    splits = load_scene_splits(root, **params)
    for split, sc in (("train", splits.train), ("test", splits.test)):
        objects, labels = getattr(source, f"{split}_images")[:, 0], getattr(source, f"{split}_labels")
        check_scenes(sc, objects, labels, size=48, max_objects=3)
        assert torch.equal(getattr(data, f"{split}_images"), sc.images)
    # Train and test use different seeds derived from `seed`: with as many objects in each split, one
    # shared seed would draw the same first object, scale and position for both.
    assert not torch.equal(splits.train.placements[0, 0], splits.test.placements[0, 0])
    for split in ("train", "test"):
        targets = getattr(data, f"{split}_targets")
        assert set(targets) == {"multilabel", "semantic", "instances", "boxes", "box_labels"}
        # The label is the class of the object with the most visible pixels (ties: earliest).
        inst = targets["instances"]
        for i, label in enumerate(getattr(data, f"{split}_labels").tolist()):
            areas = torch.bincount(inst[i].flatten().long(), minlength=4)[1:]
            assert label == int(targets["box_labels"][i, int(torch.argmax(areas))])
    pixels = data.train_images.double() / 255
    assert data.mean[0] == pytest.approx(float(pixels.mean()), abs=1e-6)
    assert data.std[0] == pytest.approx(float(pixels.std(unbiased=False)), abs=1e-6)
    assert str(root) in data.source and str(splits.cache_file) in data.source
    assert splits.cache_file.parent == tmp_path / "cache"


def cache_files(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_cache_reused_keyed_rebuilt_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_fashion_dir(tmp_path / "fm")
    cache = tmp_path / "cache"
    params = {"size": 44, "train_scenes": 12, "test_scenes": 5, "cache_dir": cache}
    first = load_dataset("fashion_mnist_scenes", root=root, **params)
    (name,) = cache_files(cache)
    assert name.startswith("fashion_mnist_scenes-") and name.endswith(".npz")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("compose_scenes called although the cache should be read")

    def same(a: ImageData, b: ImageData) -> bool:
        return (torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
                and all(torch.equal(a.train_targets[k], b.train_targets[k]) for k in a.train_targets)
                and all(torch.equal(a.test_targets[k], b.test_targets[k]) for k in a.test_targets))

    monkeypatch.setattr(scenes_mod, "compose_scenes", refuse)
    assert same(load_dataset("fashion_mnist_scenes", root=root, **params), first)
    with pytest.raises(AssertionError, match="cache should be read"):  # another parameter: another file
        load_dataset("fashion_mnist_scenes", root=root, **{**params, "seed": 1})
    monkeypatch.undo()
    other = load_dataset("fashion_mnist_scenes", root=root, **{**params, "seed": 1})
    assert not torch.equal(other.train_images, first.train_images)
    assert len(cache_files(cache)) == 2 and name in cache_files(cache)
    # A file under another parameter set's name (as a hash-prefix clash would be) is not trusted.
    (other_name,) = set(cache_files(cache)) - {name}
    (cache / other_name).write_bytes((cache / name).read_bytes())
    assert same(load_dataset("fashion_mnist_scenes", root=root, **{**params, "seed": 1}), other)

    path = cache / name
    for damage in (path.read_bytes()[: path.stat().st_size // 2], b"", b"PK\x03\x04 not a zip", os.urandom(500)):
        path.write_bytes(damage)
        assert same(load_dataset("fashion_mnist_scenes", root=root, **params), first)
        assert path.stat().st_size > len(damage)
    monkeypatch.setattr(scenes_mod, "compose_scenes", refuse)  # the rebuilt file is complete and read as is
    assert same(load_dataset("fashion_mnist_scenes", root=root, **params), first)
    assert len(cache_files(cache)) == 2, f"temporary files left behind: {cache_files(cache)}"


def test_cache_write_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_fashion_dir(tmp_path / "fm")
    cache = tmp_path / "cache"

    def disk_full(file: object, *args: object, **kwargs: object) -> None:
        file.write(b"partial")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", disk_full)
    with pytest.raises(KdkitError, match="No space left") as info:
        load_dataset("fashion_mnist_scenes", root=root, size=44, train_scenes=3, test_scenes=2, cache_dir=cache)
    assert info.value.where == "data" and "cache_dir" in info.value.fix
    assert cache_files(cache) == []


def test_cache_dir_defaults_to_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_fashion_dir(tmp_path / "fm")
    monkeypatch.setenv("KDKIT_DATA_CACHE", str(tmp_path / "env-cache"))
    splits = load_scene_splits(root, size=44, train_scenes=3, test_scenes=2)
    assert splits.cache_file.parent == tmp_path / "env-cache" and splits.cache_file.is_file()


@pytest.mark.parametrize(("param", "value"), [("train_scenes", 0), ("test_scenes", -1), ("seed", -2),
                                              ("size", 30), ("max_objects", True)])
def test_reader_rejects_bad_parameters(tmp_path: Path, param: str, value: object) -> None:
    root = make_fashion_dir(tmp_path / "fm")
    with pytest.raises(KdkitError) as info:
        load_dataset("fashion_mnist_scenes", root=root, cache_dir=tmp_path / "c", **{"train_scenes": 3,
                                                                                      "test_scenes": 2, param: value})
    assert info.value.where == "data" and info.value.fix
    with pytest.raises(KdkitError, match="does not take"):
        load_dataset("fashion_mnist_scenes", root=root, scenes=3)


def test_ls_datasets_lists_scenes(capsys: pytest.CaptureFixture[str]) -> None:
    main(["ls", "datasets"])
    out = capsys.readouterr().out
    assert "fashion_mnist_scenes" in out


def make_targeted(n_train: int = 30, n_test: int = 6) -> ImageData:
    images = torch.arange(n_train, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).clone()
    labels = torch.arange(n_train, dtype=torch.int64) % 3
    # Each target row encodes its image's value, so misalignment after indexing shows.
    targets = {"semantic": images[:, 0].clone() + 1, "boxes": images.view(n_train, -1)[:, :4].float()}
    return ImageData(name="toy", train_images=images, train_labels=labels, test_images=images[:n_test],
                     test_labels=labels[:n_test], classes=("a", "b", "c"), mean=(0.5,), std=(0.25,), source="mem",
                     train_targets=targets, test_targets={"semantic": targets["semantic"][:n_test]})


def test_image_data_validates_targets_and_subset_keeps_them_aligned() -> None:
    data = make_targeted()
    kw = {"name": "bad", "train_images": data.train_images, "train_labels": data.train_labels,
          "test_images": data.test_images, "test_labels": data.test_labels, "classes": data.classes,
          "mean": data.mean, "std": data.std, "source": "x"}
    assert ImageData(**kw).train_targets == {} and ImageData(**kw).test_targets == {}
    with pytest.raises(KdkitError, match=r"train_targets\['semantic'\] has 29 entries .* 30 images"):
        ImageData(**kw, train_targets={"semantic": data.train_targets["semantic"][:-1]})
    with pytest.raises(KdkitError, match=r"test_targets\['boxes'\] has 30 entries .* 6 images"):
        ImageData(**kw, test_targets={"boxes": data.train_targets["boxes"]})
    with pytest.raises(KdkitError, match="test_targets"):
        ImageData(**kw, test_targets={"x": [1, 2, 3, 4, 5, 6]})
    small = subset(data, 9, seed=3)
    assert small.train_images.shape[0] == 9
    assert torch.equal(small.train_targets["semantic"], small.train_images[:, 0] + 1)
    assert torch.equal(small.train_targets["boxes"], small.train_images.view(9, -1)[:, :4].float())
    assert small.test_targets["semantic"] is data.test_targets["semantic"]
    assert not torch.equal(small.train_images, data.train_images[:9])  # the subset really reordered/picked


@pytest.mark.skipif(not (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").exists()
                    and not (FASHION_MNIST_ROOT / "train-images-idx3-ubyte").exists(),
                    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_scenes(tmp_path: Path) -> None:
    source = fashion_mnist()
    data = load_dataset("fashion_mnist_scenes", train_scenes=24, test_scenes=8, seed=2, cache_dir=tmp_path)
    splits = load_scene_splits(train_scenes=24, test_scenes=8, seed=2, cache_dir=tmp_path)
    assert data.train_images.shape == (24, 1, 64, 64) and data.test_images.shape == (8, 1, 64, 64)
    for split, sc in (("train", splits.train), ("test", splits.test)):
        check_scenes(sc, getattr(source, f"{split}_images")[:, 0], getattr(source, f"{split}_labels"),
                     size=64, max_objects=4)
        assert torch.equal(getattr(data, f"{split}_images"), sc.images)
        assert torch.equal(getattr(data, f"{split}_labels"), sc.dominant)
