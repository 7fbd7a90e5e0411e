"""``image_folder``: an ImageNet-style folder tree of image files, read into memory.

Layout::

    root/
      train/<class_name>/*.png|jpg|jpeg|bmp|webp
      val/<class_name>/...        (or test/)

Class names are the sorted sub-folder names of ``train/``; the test split must have the same classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kdkit.data.base import ImageData, channel_stats
from kdkit.data.registry import register_dataset
from kdkit.errors import KdkitError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_FIX = ("set data.root to a folder with train/ and val/ (or test/) sub-folders, each holding one folder of "
        "images per class")


def _list_split(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Sorted class names and ``(file, label)`` pairs under one split folder (files found recursively)."""
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise KdkitError(f"{split_dir} has no class sub-folders", fix=_FIX, where="data.root")
    items: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (split_dir / name).rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith("."))
        if not files:
            raise KdkitError(f"class folder {split_dir / name} has no images ({', '.join(IMAGE_EXTENSIONS)})",
                             fix="add images or remove the empty folder", where="data.root")
        items.extend((f, label) for f in files)
    return classes, items


def load_image(path: Path, image_size: int, grayscale: bool = False) -> np.ndarray:
    """Read one image, resize its shorter side to ``image_size`` and centre-crop it to a square.

    Args:
        path: Image file.
        image_size: Output height and width.
        grayscale: Convert to 1-channel ``L`` instead of 3-channel ``RGB``.

    Returns:
        ``uint8`` array ``(image_size, image_size, C)``.

    Raises:
        KdkitError: If the file cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if grayscale else "RGB")
            w, h = im.size
            scale = image_size / min(w, h)
            nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), getattr(Image, "Resampling", Image).BILINEAR)  # Resampling: Pillow >= 9.1
            left, top = (nw - image_size) // 2, (nh - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise KdkitError(f"cannot read the image ({e})", fix="remove or replace the corrupt file",
                         where=str(path)) from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _read_split(items: list[tuple[Path, int]], image_size: int, grayscale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    c = 1 if grayscale else 3
    out = np.empty((len(items), image_size, image_size, c), dtype=np.uint8)
    for i, (path, _) in enumerate(items):
        out[i] = load_image(path, image_size, grayscale)
    images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    return images, labels


@register_dataset("image_folder", help="ImageNet-style folder tree root/{train,val}/<class>/*.png|jpg (needs "
                                       "data.root)")
def image_folder(root: str | Path | None = None, image_size: int = 32, grayscale: bool = False) -> ImageData:
    """Images in ``root/train/<class>/`` and ``root/val/<class>/`` (or ``test/``), read into memory.

    Each image is converted to RGB (or L with ``grayscale``), its shorter side resized to ``image_size``
    (bilinear) and centre-cropped to a square. Everything is held in memory as ``uint8``, so this suits
    small datasets; mean/std are computed from the train split.

    Args:
        root: Folder holding ``train/`` and ``val/`` or ``test/``.
        image_size: Output height and width.
        grayscale: Read 1-channel images instead of RGB.

    Returns:
        The dataset; class names are the sorted folder names.

    Raises:
        KdkitError: If folders are missing or empty, the test classes differ from the train classes,
            or an image cannot be read.
    """
    if root is None:
        raise KdkitError("dataset 'image_folder' needs data.root", fix=_FIX, where="data.root")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise KdkitError(f"image_folder image_size must be a positive integer, got {image_size!r}",
                         fix="use e.g. image_size: 32", where="data.image_size")
    root = Path(root)
    if not root.is_dir():
        raise KdkitError(f"image folder {root} does not exist", fix=_FIX, where="data.root")
    train_dir = root / "train"
    test_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if test_dir is None or not train_dir.is_dir():
        missing = [str(train_dir)] if not train_dir.is_dir() else []
        missing += [] if test_dir else [f"{root / 'val'} (or {root / 'test'})"]
        raise KdkitError(f"missing folder(s): {', '.join(missing)}", fix=_FIX, where="data.root")
    classes, train_items = _list_split(train_dir)
    test_classes, test_items = _list_split(test_dir)
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise KdkitError(f"class folders differ between {train_dir} and {test_dir}: only in train {only_train}, "
                         f"only in {test_dir.name} {only_test}",
                         fix="give both splits the same class folders", where="data.root")
    train_images, train_labels = _read_split(train_items, image_size, grayscale)
    test_images, test_labels = _read_split(test_items, image_size, grayscale)
    mean, std = channel_stats(train_images)
    if any(s == 0 for s in std):  # constant images: avoid dividing by zero when normalising
        std = tuple(s if s > 0 else 1.0 for s in std)
    return ImageData(
        name="image_folder",
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        classes=tuple(classes),
        mean=mean,
        std=std,
        source=f"{root} (image folder, {image_size}x{image_size} {'L' if grayscale else 'RGB'})",
    )
