"""``voc``: Pascal VOC (XML boxes, palette PNG masks, ImageSets splits).

Layout (one year's folder, e.g. ``VOCdevkit/VOC2012``)::

    root/ImageSets/Segmentation/{train,val}.txt   ids of the images of each split (or ImageSets/Main/)
    root/Annotations/<id>.xml                     objects: name, difficult, bndbox (1-based, inclusive)
    root/JPEGImages/<id>.jpg                      (or .png, .jpeg, .bmp, .webp)
    root/SegmentationClass/<id>.png               palette indices: 0 background, k + 1 class k, 255 void
    root/SegmentationObject/<id>.png              palette indices: i for the i-th <object> of the XML, 255 void

Conversion to the dense targets of :mod:`kdkit.data.dense` (the scenes' layout):

* **Classes.** ``classes`` (default the 20 VOC classes in their palette order, aeroplane .. tvmonitor): class ``k``
  is palette index ``k + 1``, so ``semantic`` holds the class map's indices as they are, and 255 (void) stays 255,
  :data:`~kdkit.data.dense.IGNORE`.
* **Boxes.** VOC's ``xmin, ymin, xmax, ymax`` count pixels from 1, ends included: ``x0, y0, x1, y1 =
  xmin - 1, ymin - 1, xmax, ymax`` (0-based, ends excluded, as the scenes' boxes).
* **Objects.** The XML's objects in order; ``difficult: drop`` leaves out those marked difficult (``keep``, the
  default, keeps them as ordinary objects). ``instances`` renumbers the object map to the kept objects; the pixels
  of an object left out (difficult, or skipped) and the void border are :data:`~kdkit.data.dense.IGNORE`.
* **Missing masks.** With ``sets: Segmentation`` each image's class map must exist. With ``sets: Main`` (detection
  splits) an image without one gets a ``semantic`` map all :data:`~kdkit.data.dense.IGNORE`; an image without an
  object map gets an ``instances`` map all :data:`~kdkit.data.dense.IGNORE`.
* **Size.** Each image is fitted to ``image_size`` (:func:`kdkit.data.dense.fit`), its boxes and masks with it.

Bad input: a missing split list, XML, image or (``Segmentation``) class map, unparsable XML, an image whose size
differs from the XML's ``<size>`` or from its masks', a mask index that names no class or object stop the load
(:class:`KdkitError`). A bad object (a box outside the image or with ``xmax < xmin``, a class missing from
``classes``, no numeric ``bndbox``) is skipped and counted, per file and reason, in :attr:`ImageData.warnings`.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Literal

import numpy as np

from kdkit.data.base import ImageData
from kdkit.data.dense import (
    IGNORE,
    DenseImage,
    SkipLog,
    box_problem,
    cached,
    check_image_size,
    check_same_size,
    clip_box,
    dense_image_data,
    fit,
    read_image,
    read_index_png,
)
from kdkit.data.folder import IMAGE_EXTENSIONS
from kdkit.data.registry import register_dataset
from kdkit.errors import KdkitError

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
"""The 20 Pascal VOC classes; class ``k`` is palette index ``k + 1`` of the class maps."""
SETS = ("Segmentation", "Main")
_LAYOUT = ("set data.root to a VOC year folder (e.g. VOCdevkit/VOC2012) holding ImageSets/, Annotations/, "
           "JPEGImages/ and SegmentationClass/")


def read_split_ids(path: Path) -> list[str]:
    """The image ids of an ``ImageSets/*/<split>.txt`` file (first word of each non-blank line).

    Raises:
        KdkitError: If the file is missing or lists no id.
    """
    if not path.is_file():
        raise KdkitError("split list not found", fix=_LAYOUT + ", or set data.params.train / test to the list names",
                         where=str(path))
    ids = [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise KdkitError("the split list is empty", fix="list one image id per line", where=str(path))
    return ids


class _VocObject:
    """One ``<object>`` of an annotation file."""

    def __init__(self, name: str, difficult: bool, box: tuple[float, float, float, float] | None) -> None:
        self.name, self.difficult, self.box = name, difficult, box


def read_annotation(path: Path) -> tuple[tuple[int, int] | None, list[_VocObject]]:
    """The ``(width, height)`` of a VOC annotation's ``<size>`` (``None`` without one) and its objects in order.

    A box is converted to 0-based exclusive ends (``xmin - 1, ymin - 1, xmax, ymax``); ``None`` when the object has
    no ``bndbox`` of four numbers.

    Raises:
        KdkitError: If the file is missing or not XML with an ``<annotation>`` root.
    """
    if not path.is_file():
        raise KdkitError("VOC annotation file not found", fix="add it, or leave its id out of the split list",
                         where=str(path))
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise KdkitError(f"not valid XML ({e})", fix="re-export the annotation", where=str(path)) from None
    if root.tag != "annotation":
        raise KdkitError(f"the XML root is <{root.tag}>, not <annotation>", fix="give a Pascal VOC annotation file",
                         where=str(path))
    size = None
    width, height = root.findtext("size/width"), root.findtext("size/height")
    if width is not None and height is not None:
        try:
            size = (int(width), int(height))
        except ValueError:
            raise KdkitError(f"<size> is not two integers (width {width!r}, height {height!r})",
                             fix="correct <size>, or remove it", where=str(path)) from None
    objects = []
    for obj in root.findall("object"):
        box = None
        try:
            xmin, ymin, xmax, ymax = (float(obj.findtext(f"bndbox/{k}") or "")
                                      for k in ("xmin", "ymin", "xmax", "ymax"))
            box = (xmin - 1, ymin - 1, xmax, ymax)
        except ValueError:
            pass  # skipped and counted by the caller
        objects.append(_VocObject((obj.findtext("name") or "").strip(),
                                  (obj.findtext("difficult") or "0").strip() == "1", box))
    return size, objects


def _image_file(root: Path, image_id: str) -> Path:
    for ext in IMAGE_EXTENSIONS:
        path = root / "JPEGImages" / f"{image_id}{ext}"
        if path.is_file():
            return path
    raise KdkitError(f"no image for id {image_id!r} ({', '.join(IMAGE_EXTENSIONS)})",
                     fix="add the image, or leave its id out of the split list", where=str(root / "JPEGImages"))


class _Reader:
    """Reads the images of one VOC folder into :class:`DenseImage` items."""

    def __init__(self, root: Path, sets: str, classes: tuple[str, ...], difficult: str, grayscale: bool,
                 skips: SkipLog) -> None:
        self.root, self.sets, self.classes, self.grayscale, self.skips = root, sets, classes, grayscale, skips
        self.drop_difficult = difficult == "drop"
        self.labels = {name: k for k, name in enumerate(classes)}

    def image(self, image_id: str) -> DenseImage:
        xml = self.root / "Annotations" / f"{image_id}.xml"
        size, objects = read_annotation(xml)
        image_path = _image_file(self.root, image_id)
        image = read_image(image_path, self.grayscale)
        h, w = image.shape[:2]
        if size is not None and size != (w, h):
            raise KdkitError(f"<size> is {size[0]}x{size[1]} but the image {image_path} is {w}x{h}: its boxes would "
                             "not fit it", fix="use the image the annotation was made on, or correct <size>",
                             where=str(xml))
        boxes, labels, ids = self.objects(xml, objects, w, h)
        semantic = self.semantic(image_id, image, image_path)
        instances = self.instances(image_id, image, image_path, ids, len(objects))
        return DenseImage(str(image_path), image, np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                          np.asarray(labels, dtype=np.int64), semantic, instances)

    def objects(self, xml: Path, objects: list[_VocObject], width: int,
                height: int) -> tuple[list[tuple[float, float, float, float]], list[int], dict[int, int]]:
        """Kept boxes and labels, and ``{XML index (1-based): kept object id (1-based)}``."""
        boxes, labels, ids = [], [], {}
        for i, obj in enumerate(objects, 1):
            example = f"object {i} ({obj.name!r})"
            if obj.name not in self.labels:
                self.skips.add(xml, "objects whose class is missing from the class list", example)
                continue
            if obj.difficult and self.drop_difficult:
                continue  # asked for (difficult: drop), so not a warning
            if obj.box is None:
                self.skips.add(xml, "objects without a bndbox of four numbers", example)
                continue
            problem, clipped = box_problem(obj.box, width, height)
            if problem is not None:
                self.skips.add(xml, problem, f"{example}, box {[round(v, 2) for v in obj.box]}")
                continue
            if clipped:
                self.skips.add(xml, "boxes clipped to their image (they overhung it by at most 1 px; kept)", example)
            boxes.append(clip_box(obj.box, width, height))
            labels.append(self.labels[obj.name])
            ids[i] = len(boxes)
        return boxes, labels, ids

    def semantic(self, image_id: str, image: np.ndarray, image_path: Path) -> np.ndarray:
        path = self.root / "SegmentationClass" / f"{image_id}.png"
        if self.sets == "Main" and not path.is_file():
            return np.full(image.shape[:2], IGNORE, dtype=np.uint8)
        mask = read_index_png(path, "class map")
        check_same_size(image, mask, image_path, path, "class map")
        bad = np.unique(mask[(mask > len(self.classes)) & (mask != IGNORE)])
        if bad.size:
            raise KdkitError(f"class map holds index {int(bad[0])}, but there are {len(self.classes)} classes "
                             f"(indices 1..{len(self.classes)}, 0 background, {IGNORE} void)",
                             fix="set data.params.classes to every class of the masks, in palette order",
                             where=str(path))
        return mask

    def instances(self, image_id: str, image: np.ndarray, image_path: Path, ids: dict[int, int],
                  count: int) -> np.ndarray:
        path = self.root / "SegmentationObject" / f"{image_id}.png"
        if not path.is_file():
            return np.full(image.shape[:2], IGNORE, dtype=np.uint8)
        mask = read_index_png(path, "object map")
        check_same_size(image, mask, image_path, path, "object map")
        bad = np.unique(mask[(mask > count) & (mask != IGNORE)])
        if bad.size:
            raise KdkitError(f"object map holds index {int(bad[0])}, but its XML lists {count} objects",
                             fix="index i of the object map must be the i-th <object> of the XML", where=str(path))
        lut = np.full(256, IGNORE, dtype=np.uint8)  # objects left out and the void border: unknown
        lut[0] = 0
        for index, kept in ids.items():
            lut[index] = kept
        return lut[mask]


@register_dataset("voc", help="Pascal VOC: XML boxes + palette PNG class/object maps, ImageSets splits (needs "
                              "data.root; params sets, difficult, image_size)")
def voc(root: str | Path | None = None, *, sets: Literal["Segmentation", "Main"] = "Segmentation",
        train: str = "train", test: str = "val", image_size: int = 64, difficult: Literal["keep", "drop"] = "keep",
        classes: list[str] | None = None, grayscale: bool = False, max_objects: int | None = None,
        cache_dir: str | Path | None = None) -> ImageData:
    """Pascal VOC boxes, class maps and object maps, fitted to ``image_size``.

    See the module docstring for the layout and the conversions.

    Args:
        root: The VOC year folder (holding ``ImageSets/``, ``Annotations/``, ``JPEGImages/``...).
        sets: Which ``ImageSets`` lists give the splits: ``Segmentation`` (images with masks) or ``Main``.
        train: Name of the train list (``ImageSets/<sets>/<train>.txt``).
        test: Name of the test list.
        image_size: Every image is fitted to ``image_size x image_size``.
        difficult: ``keep`` objects marked difficult as ordinary objects, or ``drop`` them.
        classes: Class names in palette order (index ``k + 1`` is ``classes[k]``); default the 20 VOC classes.
        grayscale: Read one-channel images instead of RGB.
        max_objects: Object rows per image ``K`` (padded, or the first ``K`` kept); ``None``: the most of any image.
        cache_dir: Keep the loaded dataset in a cache file there (:func:`kdkit.data.dense.cached`), reused while
            the parameters and every file the reader reads stay the same; ``None``: no cache.

    Returns:
        The dataset, with the dense targets of :mod:`kdkit.data.dense` and the skipped objects in ``warnings``.

    Raises:
        KdkitError: On a whole-file problem (see the module docstring) or a bad parameter.
    """
    if root is None:
        raise KdkitError("dataset 'voc' needs data.root", fix=_LAYOUT, where="data.root")
    size = check_image_size(image_size, "voc")
    if sets not in SETS:
        raise KdkitError(f"voc sets {sets!r} is not a VOC split folder", choices=SETS, bad=str(sets),
                         fix="use sets: Segmentation (images with masks) or sets: Main (detection)",
                         where="data.params.sets")
    if difficult not in ("keep", "drop"):
        raise KdkitError(f"voc difficult {difficult!r} is not a choice", choices=("keep", "drop"), bad=str(difficult),
                         fix="use difficult: keep or difficult: drop", where="data.params.difficult")
    names = VOC_CLASSES if classes is None else tuple(classes)
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise KdkitError(f"voc classes must be distinct non-empty names, got {classes!r}",
                         fix="list each class once, in palette order", where="data.params.classes")
    root = Path(root)
    if not root.is_dir():
        raise KdkitError(f"VOC folder {root} does not exist", fix=_LAYOUT, where="data.root")
    params = {"root": str(root.resolve()), "sets": sets, "train": train, "test": test, "image_size": size,
              "difficult": difficult, "classes": list(names), "grayscale": grayscale, "max_objects": max_objects}
    inputs = [root / "ImageSets" / sets, *(root / d for d in ("Annotations", "JPEGImages", "SegmentationClass",
                                                              "SegmentationObject"))]
    return cached("voc", params, inputs, cache_dir,
                  lambda: _read_voc(root, sets, train, test, size, difficult, names, grayscale, max_objects))


def _read_voc(root: Path, sets: str, train: str, test: str, size: int, difficult: str, names: tuple[str, ...],
              grayscale: bool, max_objects: int | None) -> ImageData:
    """:func:`voc` without the cache."""
    skips = SkipLog("objects")
    reader = _Reader(root, sets, names, difficult, grayscale, skips)
    splits = {split: [fit(reader.image(i), size) for i in read_split_ids(root / "ImageSets" / sets / f"{name}.txt")]
              for split, name in (("train", train), ("test", test))}
    return dense_image_data("voc", splits, names, f"{root} (Pascal VOC {sets} {train}/{test}, difficult {difficult}, "
                            f"{size}x{size} {'L' if grayscale else 'RGB'})", skips.messages(), max_objects)
