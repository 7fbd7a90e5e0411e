"""``coco``: COCO instance annotations (``instances_*.json``) and their images, with boxes and masks.

Layout (COCO's own)::

    root/annotations/instances_<train>.json      e.g. instances_train2017.json
    root/annotations/instances_<test>.json       e.g. instances_val2017.json
    root/<train>/<file_name>                     the images each file lists
    root/<test>/<file_name>

Conversion to the dense targets of :mod:`kdkit.data.dense` (the scenes' layout):

* **Classes.** The category ids, ascending, map to the labels ``0..C-1`` (COCO's 80 ids 1..90 become 0..79);
  ``classes`` are their names. Both files must list the same categories.
* **Objects.** Each non-crowd annotation of an image, in the file's order, is object ``j``: its ``bbox``
  ``[x, y, w, h]`` becomes ``x0, y0, x1, y1 = x, y, x + w, y + h``, and its ``segmentation`` (polygons, or RLE,
  compressed or not, decoded by pycocotools' mask API) is painted ``j + 1`` into ``instances`` and ``k + 1`` into
  ``semantic``, a later annotation over an earlier one. An annotation without a segmentation is a box only.
* **Crowd.** An ``iscrowd`` annotation is no object: its region is painted ``k + 1`` into ``semantic`` and
  :data:`~kdkit.data.dense.IGNORE` into ``instances``, and it has no box.
* **Size.** Each image is fitted to ``image_size`` (:func:`kdkit.data.dense.fit`: longer side scaled to it, then
  padded at the right and bottom), its boxes and masks with it.

Bad input: a missing, empty or malformed file, duplicate ids, a missing image, or an image whose size differs from
the ``width``/``height`` the file gives it stops the load (:class:`KdkitError`). A bad annotation (a box outside the
image or with ``x2 < x1``, a category id missing from ``categories``, a mask whose size differs from its image, a
malformed segmentation, an unknown image id) is skipped and counted, per file and reason, in
:attr:`ImageData.warnings`. A box overhanging its image by at most 1 px is clipped to it (and counted).

:func:`write_coco` writes any dataset with these dense targets (e.g. ``fashion_mnist_scenes``) in this layout, so
the same data can round-trip: scenes -> COCO files -> this reader -> the same targets.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from kdkit.data.base import ImageData
from kdkit.data.dense import (
    IGNORE,
    MAX_OBJECTS,
    DenseImage,
    SkipLog,
    atomic_write_bytes,
    box_problem,
    cached,
    check_image_size,
    clip_box,
    dense_image_data,
    fit,
    read_image,
)
from kdkit.data.registry import register_dataset
from kdkit.errors import KdkitError

_LAYOUT = ("set data.root to a folder holding annotations/instances_<split>.json and one image folder <split>/ per "
           "split (COCO's layout), and data.params.train / data.params.test to the split names")


def mask_api() -> ModuleType:
    """pycocotools' mask module (polygon and RLE decoding).

    Raises:
        KdkitError: If pycocotools is not installed.
    """
    try:
        from pycocotools import mask
    except ImportError:
        raise KdkitError("reading COCO masks needs pycocotools, which is not installed",
                         fix="pip install 'kdkit[dense]' (or pip install pycocotools)", where="data.dataset") from None
    return mask


def _file_problem(path: Path, message: str, fix: str) -> KdkitError:
    return KdkitError(message, fix=fix, where=str(path))


def read_coco_json(path: Path) -> dict[str, Any]:
    """Read a COCO instances file and check its whole-file structure.

    Checks: the file exists and is not empty; it is JSON holding lists ``images``, ``annotations`` and
    ``categories``; it lists at least one image and one category; every image has an int ``id``, a ``file_name``
    and int ``width``/``height``; every category an int ``id`` and a ``name``; no id is listed twice.

    Args:
        path: The ``instances_*.json`` file.

    Returns:
        The parsed file.

    Raises:
        KdkitError: On any of those problems, naming the file and the value.
    """
    if not path.is_file():
        raise _file_problem(path, "COCO annotation file not found", _LAYOUT)
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise _file_problem(path, "the annotation file is empty", "re-export the annotations (COCO instances JSON)")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise _file_problem(path, f"not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}",
                            "re-export the annotations (COCO instances JSON)") from None
    if not isinstance(doc, dict):
        raise _file_problem(path, f"holds a JSON {type(doc).__name__}, not an object with images, annotations and "
                            "categories", "give a COCO instances file")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            got = "missing" if key not in doc else f"a {type(doc[key]).__name__}"
            raise _file_problem(path, f"{key!r} is {got}; a COCO instances file has a list of {key}",
                                "give a COCO instances file (images, annotations, categories)")
    for key in ("images", "categories"):
        if not doc[key]:
            raise _file_problem(path, f"the file lists no {key}", f"add the {key}, or point data.root elsewhere")
    _check_entries(path, doc["images"], "image", {"id": "id", "file_name": "text", "width": "size", "height": "size"})
    _check_entries(path, doc["categories"], "category", {"id": "id", "name": "text"})
    return doc


def _check_entries(path: Path, entries: list[Any], kind: str, fields: dict[str, str]) -> None:
    """Each entry must have every field of ``fields`` (name -> ``"id"``, ``"size"`` or ``"text"``), ids unique."""
    checks = {"id": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
              "text": lambda v: isinstance(v, str) and bool(v)}
    wanted = {"id": "an integer", "size": "a positive integer", "text": "a non-empty string"}
    seen: set[int] = set()
    for i, entry in enumerate(entries):
        for name, kind_of in fields.items():
            value = entry.get(name) if isinstance(entry, dict) else None
            if not checks[kind_of](value):
                raise _file_problem(path, f"{kind} #{i} has {name}={value!r}; every {kind} needs {wanted[kind_of]} "
                                    f"{name!r}", f"fix that {kind} entry")
        if entry["id"] in seen:
            raise _file_problem(path, f"{kind} id {entry['id']} is listed twice", f"give each {kind} its own id")
        seen.add(entry["id"])


def _categories(doc: dict[str, Any]) -> tuple[list[int], tuple[str, ...]]:
    """Category ids ascending and their names (label ``k`` is the ``k``-th smallest id)."""
    ordered = sorted(doc["categories"], key=lambda c: c["id"])
    return [c["id"] for c in ordered], tuple(c["name"] for c in ordered)


def _decode(seg: Any, height: int, width: int, api: ModuleType) -> tuple[np.ndarray | None, str | None]:
    """An annotation's mask as ``bool (H, W)`` (``None`` without a segmentation), or the reason it is bad."""
    if seg is None or (isinstance(seg, list) and not seg):
        return None, None
    try:
        if isinstance(seg, list):  # polygons [[x0, y0, x1, y1, ...], ...]
            if not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                       and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               for v in p) for p in seg):
                return None, "malformed polygons (each needs an even number >= 6 of finite coordinates)"
            rle = api.merge(api.frPyObjects(seg, height, width))
        elif isinstance(seg, dict):
            size, counts = seg.get("size"), seg.get("counts")
            if size != [height, width]:
                return None, f"masks whose size differs from their image (RLE size vs [{height}, {width}])"
            if isinstance(counts, list):  # uncompressed RLE: run lengths, column-major, starting with zeros
                if (not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
                        or sum(counts) != height * width):
                    return None, f"malformed RLE (uncompressed counts must be >= 0 and sum to {height}x{width})"
                rle = api.frPyObjects(seg, height, width)
            elif isinstance(counts, str):
                rle = {"size": [height, width], "counts": counts.encode("ascii")}
            else:
                return None, "malformed RLE (counts must be a list or a string)"
        else:
            return None, "malformed segmentation (neither polygons nor RLE)"
        mask = np.asarray(api.decode(rle), dtype=bool)
    except (ValueError, TypeError, UnicodeEncodeError) as e:  # pycocotools raises on undecodable RLE strings
        return None, f"malformed segmentation ({type(e).__name__})"
    if mask.shape != (height, width):
        return None, f"masks whose size differs from their image ({mask.shape[1]}x{mask.shape[0]})"
    return mask, None


def _read_image_entry(entry: dict[str, Any], image_dir: Path, grayscale: bool, path: Path) -> np.ndarray:
    file = image_dir / entry["file_name"]
    image = read_image(file, grayscale)
    h, w = image.shape[:2]
    if (w, h) != (entry["width"], entry["height"]):
        raise KdkitError(f"image {file} is {w}x{h} but {path.name} gives it width {entry['width']}, height "
                         f"{entry['height']}: its boxes and masks would not fit it", fix="use the images the "
                         "annotations were made on, or correct width/height in the file", where=str(path))
    return image


class _Split:
    """Reads one COCO file into :class:`DenseImage` items (one job per method; the skip log is shared)."""

    def __init__(self, path: Path, image_dir: Path, labels: dict[int, int], grayscale: bool, skips: SkipLog) -> None:
        self.path, self.image_dir, self.labels, self.grayscale, self.skips = path, image_dir, labels, grayscale, skips
        self.api = mask_api()

    def skip(self, reason: str, ann: dict[str, Any], detail: str = "") -> None:
        self.skips.add(self.path, reason, f"annotation id {ann.get('id')!r} of image id {ann.get('image_id')!r}"
                       + (f", {detail}" if detail else ""))

    def read(self, doc: dict[str, Any]) -> list[DenseImage]:
        by_image: dict[int, list[dict[str, Any]]] = {entry["id"]: [] for entry in doc["images"]}
        for ann in doc["annotations"]:
            if not isinstance(ann, dict):
                self.skips.add(self.path, "annotations that are not JSON objects", repr(ann)[:40])
            elif ann.get("image_id") not in by_image or isinstance(ann.get("image_id"), bool):
                self.skip("annotations of an image id missing from images", ann)
            else:
                by_image[ann["image_id"]].append(ann)
        return [self.image(entry, by_image[entry["id"]]) for entry in doc["images"]]

    def image(self, entry: dict[str, Any], anns: list[dict[str, Any]]) -> DenseImage:
        image = _read_image_entry(entry, self.image_dir, self.grayscale, self.path)
        h, w = image.shape[:2]
        semantic = np.zeros((h, w), dtype=np.uint8)
        instances = np.zeros((h, w), dtype=np.uint8)
        boxes: list[tuple[float, float, float, float]] = []
        labels: list[int] = []
        for ann in anns:
            category = ann.get("category_id")
            if isinstance(category, bool) or category not in self.labels:
                self.skip("annotations whose category id is missing from the categories", ann,
                          f"category_id {category!r}")
                continue
            mask, problem = _decode(ann.get("segmentation"), h, w, self.api)
            if problem is not None:
                self.skip(problem, ann)
                continue
            label = self.labels[category]
            if ann.get("iscrowd", 0):
                if mask is not None:
                    np.putmask(semantic, mask, label + 1)
                    np.putmask(instances, mask, IGNORE)
                continue
            box = self.box(ann, w, h)
            if box is None:
                continue
            if len(boxes) == MAX_OBJECTS:
                self.skip(f"objects past the {MAX_OBJECTS}th of an image (uint8 instance ids)", ann)
                continue
            boxes.append(box)
            labels.append(label)
            if mask is not None:
                np.putmask(semantic, mask, label + 1)  # putmask: several times faster than indexing
                np.putmask(instances, mask, len(boxes))
        return DenseImage(str(self.image_dir / entry["file_name"]), image,
                          np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64),
                          semantic, instances)

    def box(self, ann: dict[str, Any], width: int, height: int) -> tuple[float, float, float, float] | None:
        """The annotation's box as ``x0, y0, x1, y1`` (clipped if it overhangs by <= 1 px), or ``None`` (skipped)."""
        bbox = ann.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            self.skip("annotations without a bbox of 4 numbers", ann)
            return None
        x, y, bw, bh = (float(v) for v in bbox)
        box = (x, y, x + bw, y + bh)
        problem, clipped = box_problem(box, width, height)
        if problem is not None:
            self.skip(problem, ann, f"bbox {bbox}")
            return None
        if clipped:
            self.skips.add(self.path, "boxes clipped to their image (they overhung it by at most 1 px; kept)",
                           f"annotation id {ann.get('id')!r}")
            box = clip_box(box, width, height)
        return box


@register_dataset("coco", help="COCO instances JSON + images: boxes, instance and semantic masks (needs data.root; "
                               "params train, test, image_size)")
def coco(root: str | Path | None = None, *, train: str = "train2017", test: str = "val2017", image_size: int = 64,
         grayscale: bool = False, max_objects: int | None = None, cache_dir: str | Path | None = None) -> ImageData:
    """COCO instance annotations: boxes, instance masks and the semantic mask they make, fitted to ``image_size``.

    See the module docstring for the layout, the class order, how boxes and masks are converted and what bad
    input does.

    Args:
        root: Folder holding ``annotations/`` and the image folders.
        train: Name of the train split (``annotations/instances_<train>.json``, images in ``<train>/``).
        test: Name of the test split.
        image_size: Every image is fitted to ``image_size x image_size``.
        grayscale: Read one-channel images instead of RGB.
        max_objects: Object rows per image ``K`` (padded, or the first ``K`` kept); ``None``: the most of any image.
        cache_dir: Keep the loaded dataset in a cache file there (:func:`kdkit.data.dense.cached`), reused while
            the parameters and every file under ``annotations/``, ``<train>/`` and ``<test>/`` stay the same;
            ``None``: no cache.

    Returns:
        The dataset, with the dense targets of :mod:`kdkit.data.dense` and the skipped annotations in ``warnings``.

    Raises:
        KdkitError: On a whole-file problem (see the module docstring).
    """
    if root is None:
        raise KdkitError("dataset 'coco' needs data.root", fix=_LAYOUT, where="data.root")
    size = check_image_size(image_size, "coco")
    root = Path(root)
    files = {split: root / "annotations" / f"instances_{name}.json" for split, name in (("train", train),
                                                                                         ("test", test))}
    params = {"root": str(root.resolve()), "train": train, "test": test, "image_size": size, "grayscale": grayscale,
              "max_objects": max_objects}
    return cached("coco", params, [*files.values(), root / train, root / test], cache_dir,
                  lambda: _read_coco(root, files, train, test, size, grayscale, max_objects))


def _read_coco(root: Path, files: dict[str, Path], train: str, test: str, size: int, grayscale: bool,
               max_objects: int | None) -> ImageData:
    """:func:`coco` without the cache."""
    docs = {split: read_coco_json(path) for split, path in files.items()}
    ids, classes = _categories(docs["train"])
    test_ids, test_classes = _categories(docs["test"])
    if (ids, classes) != (test_ids, test_classes):
        raise KdkitError(f"{files['test']} lists other categories than {files['train']}",
                         fix="give both splits the same categories (ids and names)", where=str(files["test"]))
    labels = {category: k for k, category in enumerate(ids)}
    skips = SkipLog()
    splits = {}
    for split, name in (("train", train), ("test", test)):
        reader = _Split(files[split], root / name, labels, grayscale, skips)
        splits[split] = [fit(item, size) for item in reader.read(docs[split])]
    return dense_image_data("coco", splits, classes, f"{root} (COCO instances {train}/{test}, {size}x{size} "
                            f"{'L' if grayscale else 'RGB'})", skips.messages(), max_objects)


# -- writing ------------------------------------------------------------------------------------------------------


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def _split_doc(data: ImageData, split: str, folder: Path, api: ModuleType) -> dict[str, Any]:
    """Write ``split``'s images as PNGs into ``folder`` and return its COCO document (RLE masks)."""
    images_t = getattr(data, f"{split}_images")
    targets = getattr(data, f"{split}_targets")
    images, annotations = [], []
    for i in range(images_t.shape[0]):
        name = f"{i:06d}.png"
        atomic_write_bytes(folder / name, _png(images_t[i].permute(1, 2, 0).numpy()))
        size = images_t.shape[2]
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        instances = targets["instances"][i].numpy()
        for j in np.flatnonzero(targets["box_labels"][i].numpy() >= 0):
            x0, y0, x1, y1 = (float(v) for v in targets["boxes"][i, j])
            mask = instances == j + 1
            rle = api.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": int(targets["box_labels"][i, j]) + 1, "iscrowd": 0,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(mask.sum()),
                                "segmentation": {"size": [size, size], "counts": rle["counts"].decode("ascii")}})
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(data.classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_coco(data: ImageData, root: str | Path, *, train: str = "train", test: str = "val") -> Path:
    """Write a dataset with dense targets (e.g. ``fashion_mnist_scenes``) as COCO files the ``coco`` reader reads.

    Writes ``root/<split>/NNNNNN.png`` (image ``i`` of the split, lossless) and
    ``root/annotations/instances_<split>.json``: category ``k + 1`` for class ``k``; object ``j`` of image ``i``
    as an annotation with ``bbox`` ``[x0, y0, x1 - x0, y1 - y0]`` and its pixels of ``instances`` (``== j + 1``) as
    compressed RLE. Every file is written atomically (images first, each JSON last). Reading it back with
    ``coco(root, train=train, test=test, image_size=S, grayscale=C == 1, max_objects=K)`` gives the same images,
    labels and targets when ``semantic`` is what ``instances`` implies (true of the scenes).

    Args:
        data: The dataset; needs ``boxes``, ``box_labels`` and ``instances`` targets.
        root: Output folder.
        train: Name of the train split.
        test: Name of the test split.

    Returns:
        ``root``.

    Raises:
        KdkitError: If ``data`` lacks those targets, or a file cannot be written.
    """
    missing = [key for key in ("boxes", "box_labels", "instances") if key not in data.train_targets]
    if missing:
        raise KdkitError(f"dataset {data.name!r} has no {', '.join(missing)} targets to write as COCO",
                         choices=sorted(data.train_targets), fix="export a dataset with dense targets, e.g. "
                         "fashion_mnist_scenes", where="write_coco")
    api = mask_api()
    root = Path(root)
    for split, name in (("train", train), ("test", test)):
        doc = _split_doc(data, split, root / name, api)
        atomic_write_bytes(root / "annotations" / f"instances_{name}.json", json.dumps(doc).encode())
    return root
