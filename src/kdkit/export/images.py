"""Image files as the deployed network's input: read, converted when that is safe (and said), refused otherwise.

Safe, and done with a note: another square size (resized, bilinear, antialiased when shrinking -- what the
``digits`` reader does); grayscale to RGB (replicated) and RGB to grayscale (luma) when the network takes the
other; a palette, bilevel, CMYK or other 8-bit colour image converted to RGB or grayscale; an alpha channel that is
fully opaque, dropped. Refused (exit code 2): a non-square image (which part to keep is a guess), transparent
pixels (what lies behind them is a guess), 16-bit or float pixels (their scale is a guess).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from kdkit.data.digits import resize_uint8
from kdkit.deployment import Deployment
from kdkit.errors import KdkitError

#: Files a folder given to ``kdkit predict`` contributes.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm", ".pbm")
#: Pillow modes whose pixels are not 8-bit: their scale relative to the training images is unknown.
_WIDE_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")


@dataclass
class ImageInput:
    """One image file as the network's input.

    Attributes:
        path: The file.
        pixels: ``uint8`` ``(C, H, W)`` of the network's channels and size.
        notes: What was converted, in words (empty when the file was used as it is).
    """

    path: Path
    pixels: Tensor
    notes: list[str] = field(default_factory=list)


def image_files(items: Sequence[str | Path]) -> list[Path]:
    """The image files named by ``items``: files as given, folders' image files (by suffix, sorted, not recursive).

    Raises:
        KdkitError: A path that does not exist, a folder without image files, or nothing given.
    """
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise KdkitError(f"folder {str(path)!r} holds no image files", choices=IMAGE_SUFFIXES,
                                 fix="pass image files, or a folder holding files with one of these suffixes",
                                 where=str(path))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise KdkitError(f"no file or folder {str(path)!r}", fix="check the path", where=str(path))
    if not files:
        raise KdkitError("no image given", fix="kdkit predict RUN_OR_EXPORT IMAGE_OR_FOLDER ...")
    return files


def read_image(path: Path, deployment: Deployment) -> ImageInput:
    """Read ``path`` into the input ``deployment`` takes (module docstring).

    Raises:
        KdkitError: The file is not an image, or converting it is not safe.
    """
    try:
        with Image.open(path) as opened:
            opened.load()
            image = opened.copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise KdkitError(f"cannot read image {str(path)!r} ({exc})", fix="pass PNG, JPEG or another image file "
                         "Pillow reads", where=str(path)) from None
    notes: list[str] = []
    image = _eight_bit(image, path, notes)
    image = _channels(image, deployment.channels, path, notes)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    pixels = (pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1)).contiguous()
    return ImageInput(path, _sized(pixels, deployment.size, path, notes), notes)


def _eight_bit(image: Image.Image, path: Path, notes: list[str]) -> Image.Image:
    """``image`` as 8-bit ``L``, ``RGB`` or (still to check) ``LA``/``RGBA``."""
    mode = image.mode
    if mode in _WIDE_MODES:
        raise KdkitError(f"image {str(path)!r} has {mode!r} pixels (16-bit or float): their scale relative to the "
                         "8-bit images the network was trained on is unknown",
                         fix="convert it to an 8-bit image with the scaling you mean first", where=str(path))
    if mode == "P":
        target = "RGBA" if "transparency" in image.info else "RGB"
        return _opaque(image.convert(target), path, notes)
    if mode in ("LA", "PA", "RGBA", "La", "RGBa"):
        return _opaque(image.convert("LA" if mode in ("LA", "La") else "RGBA"), path, notes)
    if mode == "1":
        notes.append("bilevel (1-bit) image read as 8-bit grayscale")
        return image.convert("L")
    if mode not in ("L", "RGB"):
        notes.append(f"{mode} image converted to RGB")
        return image.convert("RGB")
    return image


def _opaque(image: Image.Image, path: Path, notes: list[str]) -> Image.Image:
    """Drop a fully opaque alpha channel; refuse transparent pixels."""
    alpha = np.asarray(image.getchannel("A"))
    if alpha.min() < 255:
        share = float((alpha < 255).mean())
        raise KdkitError(f"image {str(path)!r} has transparent pixels ({share:.0%} of them): what the network should "
                         "see behind them is unknown", fix="flatten it onto the background your images have, then "
                         "predict", where=str(path))
    notes.append("fully opaque alpha channel dropped")
    return image.convert("L" if image.mode == "LA" else "RGB")


def _channels(image: Image.Image, channels: int, path: Path, notes: list[str]) -> Image.Image:
    """``image`` with the network's number of channels (grayscale <-> RGB)."""
    mode = image.mode
    if channels == 1 and mode == "RGB":
        notes.append("RGB converted to grayscale (ITU-R 601-2 luma), as the network takes 1 channel")
        return image.convert("L")
    if channels == 3 and mode == "L":
        notes.append("grayscale replicated to 3 channels, as the network takes RGB")
        return image.convert("RGB")
    if channels not in (1, 3):
        raise KdkitError(f"the network takes {channels}-channel images; image files give 1 (grayscale) or 3 (RGB)",
                         fix="feed such images as tensors through kdkit.load_deployed", where=str(path))
    return image


def _sized(pixels: Tensor, size: int, path: Path, notes: list[str]) -> Tensor:
    """``pixels`` ``(C, H, W)`` resized to ``size`` x ``size`` when square; refused otherwise."""
    h, w = pixels.shape[1:]
    if (h, w) == (size, size):
        return pixels
    if h != w:
        raise KdkitError(f"image {str(path)!r} is {w}x{h}, not square: the network takes {size}x{size} images and "
                         "which part of this one to keep is a guess", fix=f"crop it to a square (it is then resized "
                         f"to {size}x{size}), or resize it to {size}x{size} yourself", where=str(path))
    notes.append(f"resized from {w}x{h} to {size}x{size} (bilinear{', antialiased' if w > size else ''})")
    return resize_uint8(pixels[None], size)[0]
