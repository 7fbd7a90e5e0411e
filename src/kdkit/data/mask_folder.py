"""``mask_folder``: a folder of images and class-index mask PNGs, one mask per image.

Layout::

    root/train/images/<name>.png|jpg|jpeg|bmp|webp
    root/train/masks/<name>.png          same stem as its image
    root/val/...                         (or test/)

A mask holds one index per pixel (an 8-bit grey ``L`` or palette ``P`` PNG): 0 background, ``k + 1`` class ``k``,
255 :data:`~kdkit.data.dense.IGNORE` (no truth). ``semantic`` is the mask as it is.

Objects (``boxes``, ``instances``) are the masks' connected regions: each 8-connected region of one class is an
object, boxed tightly (``x1 = last column + 1``, as the scenes' boxes). Objects are ordered by class, then by the
row-major position of their first pixel; ``instances`` numbers them so, and is
:data:`~kdkit.data.dense.IGNORE` where the mask is. Each image is fitted to ``image_size``
(:func:`kdkit.data.dense.fit`), its boxes and masks with it (the objects are found before, at full resolution).

Classes: ``classes`` names them in index order; without it they are named by their index (``"1"``, ``"2"``, ...)
up to the largest index any mask holds.

Bad input: a missing folder, an image without a mask or a mask without an image, a mask whose size differs from its
image, a mask that is not one index per pixel, or an index past ``classes`` stop the load (:class:`KdkitError`).
Regions past the 254th of an image are skipped and counted in :attr:`ImageData.warnings`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from kdkit.data.base import ImageData
from kdkit.data.dense import (
    IGNORE,
    MAX_OBJECTS,
    DenseImage,
    SkipLog,
    cached,
    check_image_size,
    check_same_size,
    dense_image_data,
    fit,
    read_image,
    read_index_png,
)
from kdkit.data.folder import IMAGE_EXTENSIONS
from kdkit.data.registry import register_dataset
from kdkit.errors import KdkitError

_LAYOUT = ("set data.root to a folder with train/ and val/ (or test/), each holding images/ and masks/ (one "
           "<name>.png mask of class indices per image <name>.*)")
_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity: diagonal neighbours belong to the same region


def _pairs(split_dir: Path) -> list[tuple[Path, Path]]:
    """``(image, mask)`` files of one split, sorted by name.

    Raises:
        KdkitError: If a folder is missing, a name is listed twice, or an image or a mask has no partner.
    """
    images_dir, masks_dir = split_dir / "images", split_dir / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise KdkitError(f"folder {folder} does not exist", fix=_LAYOUT, where="data.root")
    images: dict[str, Path] = {}
    for path in sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                       and not p.name.startswith(".")):
        if path.stem in images:
            raise KdkitError(f"two images named {path.stem!r}: {images[path.stem].name} and {path.name}",
                             fix="give each image its own name", where=str(images_dir))
        images[path.stem] = path
    masks = {p.stem: p for p in masks_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png"
             and not p.name.startswith(".")}
    if not images:
        raise KdkitError(f"{images_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})", fix=_LAYOUT,
                         where="data.root")
    for stem, image in images.items():
        if stem not in masks:
            raise KdkitError(f"image {image} has no mask {masks_dir / (stem + '.png')}",
                             fix="add its mask, or remove the image", where=str(image))
    for stem, mask in sorted(masks.items()):
        if stem not in images:
            raise KdkitError(f"mask {mask} has no image {images_dir / stem}.*", fix="add its image, or remove the mask",
                             where=str(mask))
    return [(images[stem], masks[stem]) for stem in images]


def regions(mask: np.ndarray) -> tuple[list[tuple[float, float, float, float]], list[int], np.ndarray]:
    """The objects of a class-index mask: 8-connected regions of one class, by class then first pixel.

    Args:
        mask: ``uint8 (H, W)``, 0 background, ``k + 1`` class ``k``, :data:`IGNORE` unknown.

    Returns:
        ``(boxes, labels, instances)``: tight boxes ``x0, y0, x1, y1`` (exclusive ends), classes, and the object map
        (0 background, ``j + 1`` object ``j``, :data:`IGNORE` where ``mask`` is). Every region is returned, even past
        :data:`MAX_OBJECTS` (the caller caps them); ``instances`` holds ids up to :data:`MAX_OBJECTS` only.
    """
    boxes: list[tuple[float, float, float, float]] = []
    labels: list[int] = []
    instances = np.where(mask == IGNORE, IGNORE, 0).astype(np.uint8)
    for value in np.unique(mask):
        if value in (0, IGNORE):
            continue
        # ndimage numbers regions in row-major order of their first pixel
        numbered, _ = ndimage.label(mask == value, structure=_EIGHT)
        for index, (rows, cols) in enumerate(ndimage.find_objects(numbered), 1):
            boxes.append((float(cols.start), float(rows.start), float(cols.stop), float(rows.stop)))
            labels.append(int(value) - 1)
            if len(boxes) <= MAX_OBJECTS:
                instances[numbered == index] = len(boxes)
    return boxes, labels, instances


def _read_pair(image_path: Path, mask_path: Path, grayscale: bool, skips: SkipLog) -> DenseImage:
    image = read_image(image_path, grayscale)
    mask = read_index_png(mask_path, "mask")
    check_same_size(image, mask, image_path, mask_path, "mask")
    boxes, labels, instances = regions(mask)
    if len(boxes) > MAX_OBJECTS:
        for j in range(MAX_OBJECTS, len(boxes)):
            skips.add(mask_path, f"regions past the {MAX_OBJECTS}th of an image (uint8 instance ids)",
                      f"region {j + 1} of class {labels[j]}")
        boxes, labels = boxes[:MAX_OBJECTS], labels[:MAX_OBJECTS]
        # the skipped regions' pixels are objects of unknown id
        instances[(instances == 0) & (mask != 0)] = IGNORE
    return DenseImage(str(image_path), image, np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                      np.asarray(labels, dtype=np.int64), mask, instances)


def _class_names(classes: list[str] | None, largest: int, where: str) -> tuple[str, ...]:
    if classes is None:
        if largest == 0:
            raise KdkitError("no mask holds a class index (every pixel is 0 or 255)",
                             fix="check the masks: index k + 1 marks class k", where=where)
        return tuple(str(v) for v in range(1, largest + 1))
    names = tuple(classes)
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise KdkitError(f"mask_folder classes must be distinct non-empty names, got {classes!r}",
                         fix="list each class once, in index order (index k + 1 is classes[k])",
                         where="data.params.classes")
    return names


@register_dataset("mask_folder", help="images/ + masks/ (class-index PNGs) per split; objects are the masks' "
                                      "connected regions (needs data.root)")
def mask_folder(root: str | Path | None = None, *, image_size: int = 64, classes: list[str] | None = None,
                grayscale: bool = False, max_objects: int | None = None,
                cache_dir: str | Path | None = None) -> ImageData:
    """Images and class-index masks from ``root/{train,val}/{images,masks}/``, fitted to ``image_size``.

    See the module docstring for the layout, the mask values and how objects are found.

    Args:
        root: Folder holding ``train/`` and ``val/`` (or ``test/``).
        image_size: Every image is fitted to ``image_size x image_size``.
        classes: Class names in index order (index ``k + 1`` is ``classes[k]``); default named by index.
        grayscale: Read one-channel images instead of RGB.
        max_objects: Object rows per image ``K`` (padded, or the first ``K`` kept); ``None``: the most of any image.
        cache_dir: Keep the loaded dataset in a cache file there (:func:`kdkit.data.dense.cached`), reused while
            the parameters and every file under the two split folders stay the same; ``None``: no cache.

    Returns:
        The dataset, with the dense targets of :mod:`kdkit.data.dense`.

    Raises:
        KdkitError: On a whole-file problem (see the module docstring) or a bad parameter.
    """
    if root is None:
        raise KdkitError("dataset 'mask_folder' needs data.root", fix=_LAYOUT, where="data.root")
    size = check_image_size(image_size, "mask_folder")
    root = Path(root)
    if not root.is_dir():
        raise KdkitError(f"mask folder {root} does not exist", fix=_LAYOUT, where="data.root")
    test_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if test_dir is None:
        raise KdkitError(f"missing folder {root / 'val'} (or {root / 'test'})", fix=_LAYOUT, where="data.root")
    params = {"root": str(root.resolve()), "image_size": size, "classes": classes, "grayscale": grayscale,
              "max_objects": max_objects}
    return cached("mask_folder", params, [root / "train", test_dir], cache_dir,
                  lambda: _read_folder(root, test_dir, size, classes, grayscale, max_objects))


def _read_folder(root: Path, test_dir: Path, size: int, classes: list[str] | None, grayscale: bool,
                 max_objects: int | None) -> ImageData:
    """:func:`mask_folder` without the cache."""
    skips = SkipLog("regions")
    read = {split: [_read_pair(i, m, grayscale, skips) for i, m in _pairs(folder)]
            for split, folder in (("train", root / "train"), ("test", test_dir))}
    largest = max(int(np.max(item.semantic, initial=0, where=item.semantic != IGNORE))
                  for items in read.values() for item in items)
    names = _class_names(classes, largest, str(root))
    if largest > len(names):
        item = next(item for items in read.values() for item in items
                    if int(np.max(item.semantic, initial=0, where=item.semantic != IGNORE)) == largest)
        raise KdkitError(f"the mask of image {item.name} holds index {largest}, but there are {len(names)} classes "
                         f"(indices 1..{len(names)}, 0 background, {IGNORE} ignore)",
                         fix="list every class in data.params.classes, in index order", where=item.name)
    splits = {split: [fit(item, size) for item in items] for split, items in read.items()}
    return dense_image_data("mask_folder", splits, names, f"{root} (images + masks, {test_dir.name} as test, "
                            f"{size}x{size} {'L' if grayscale else 'RGB'})", skips.messages(), max_objects)
