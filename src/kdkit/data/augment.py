"""Batched augmentation on image tensors ``(B, C, H, W)``, on any device, without per-sample loops.

Random numbers come from an optional ``torch.Generator``, which may live on the CPU while the images
are on another device: draws are made on the generator's device and then moved. With the same
generator state the same augmentation is produced on every device.

Dense targets follow the images: :meth:`AugmentConfig.draw` gives each sample's *view* ``(dy, dx, flip)`` and
:meth:`AugmentConfig.apply_view` moves the images by it; :func:`follow_maps` moves per-pixel maps (masks, boundary
maps) and :func:`follow_boxes` moves boxes by the same view, so a segmentation or detection batch stays aligned.

Typical settings: ``crop_padding=2`` and ``hflip=True`` for 28x28 Fashion-MNIST (flipping clothes is
harmless; do not flip digits), ``crop_padding=4`` and ``hflip=True`` for 32x32 CIFAR.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.errors import KdkitError


def _check_batch(images: Tensor, what: str) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise KdkitError(f"{what} expects images of shape (B, C, H, W), got {shape}")


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def crop_offsets(batch: int, padding: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Random crop offsets as drawn by :func:`random_crop`.

    One call ``torch.randint(0, 2 * padding + 1, (2, batch), generator=generator)`` on the generator's
    device; row 0 holds the vertical offsets ``oy``, row 1 the horizontal offsets ``ox``.

    Args:
        batch: Number of samples ``B``.
        padding: Padding on each side.
        generator: Random source (CPU default generator if ``None``).

    Returns:
        ``(oy, ox)``, int64 tensors ``(B,)`` on the generator's device, values in ``[0, 2 * padding]``.
    """
    off = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator, device=_gen_device(generator))
    return off[0], off[1]


def crop(images: Tensor, padding: int, oy: Tensor, ox: Tensor) -> Tensor:
    """Zero-pad by ``padding`` and take, for sample ``i``, the crop at ``(oy[i], ox[i])`` of the original size.

    Equal to ``F.pad(img, [padding] * 4)[:, oy:oy + H, ox:ox + W]`` per sample, done with two gathers.

    Args:
        images: ``(B, C, H, W)`` tensor of any dtype.
        padding: Zero padding on each side.
        oy: Vertical offsets ``(B,)`` into the padded image, in ``[0, 2 * padding]``.
        ox: Horizontal offsets ``(B,)``, same range.

    Returns:
        Cropped images, same shape, dtype and device as ``images``.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, [padding] * 4)
    oy, ox = oy.to(images.device, torch.int64), ox.to(images.device, torch.int64)
    rows = (oy[:, None] + torch.arange(h, device=images.device)).view(b, 1, h, 1).expand(b, c, h, w + 2 * padding)
    cols = (ox[:, None] + torch.arange(w, device=images.device)).view(b, 1, 1, w).expand(b, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def random_crop(images: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero-pad each image by ``padding`` and take a random crop of the original size, per sample.

    Offsets are drawn with :func:`crop_offsets` (uniform in ``[0, 2 * padding]``), so the result is
    exactly the per-sample ``F.pad(img, [padding] * 4)[:, oy:oy + H, ox:ox + W]``.

    Args:
        images: ``uint8`` or float tensor ``(B, C, H, W)`` on any device.
        padding: Padding on each side; ``0`` returns ``images`` unchanged.
        generator: Random source; may be on a different device than ``images``.

    Returns:
        Augmented images of the same shape, dtype and device.

    Raises:
        KdkitError: If ``images`` is not 4-D or ``padding`` is negative.
    """
    _check_batch(images, "random_crop")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise KdkitError(f"crop padding must be a non-negative integer, got {padding!r}",
                         fix="use e.g. crop_padding: 2 for 28x28 images or 4 for 32x32", where="augment.crop_padding")
    if padding == 0:
        return images
    oy, ox = crop_offsets(images.shape[0], padding, generator)
    return crop(images, padding, oy, ox)


def random_hflip(images: Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image left-right with probability ``p``.

    One ``torch.rand(B, generator=generator)`` draw on the generator's device; sample ``i`` is flipped
    when its draw is ``< p``.

    Args:
        images: Tensor ``(B, C, H, W)`` of any dtype, on any device.
        p: Flip probability in ``[0, 1]``; ``0`` returns ``images`` unchanged (and draws nothing).
        generator: Random source; may be on a different device than ``images``.

    Returns:
        Augmented images of the same shape, dtype and device.

    Raises:
        KdkitError: If ``images`` is not 4-D or ``p`` is outside ``[0, 1]``.
    """
    _check_batch(images, "random_hflip")
    if not 0.0 <= p <= 1.0:
        raise KdkitError(f"flip probability must be in [0, 1], got {p!r}", where="augment.hflip")
    if p == 0.0:
        return images
    flip = torch.rand(images.shape[0], generator=generator, device=_gen_device(generator)) < p
    return torch.where(flip.to(images.device).view(-1, 1, 1, 1), images.flip(-1), images)


def normalize(images_uint8: Tensor, mean: Sequence[float], std: Sequence[float],
              dtype: torch.dtype = torch.float32) -> Tensor:
    """``(x / 255 - mean) / std`` per channel, computed as one ``addcmul`` on the converted images.

    Args:
        images_uint8: ``uint8`` tensor ``(B, C, H, W)``.
        mean: Per-channel mean in ``[0, 1]`` units (one value, or one per channel).
        std: Per-channel standard deviation in ``[0, 1]`` units.
        dtype: Floating dtype of the result.

    Returns:
        Normalised images of ``dtype`` on the input's device.

    Raises:
        KdkitError: If the input is not ``uint8`` (B, C, H, W) or mean/std do not match the channels.
    """
    _check_batch(images_uint8, "normalize")
    if images_uint8.dtype != torch.uint8:
        raise KdkitError(f"normalize expects uint8 images in 0..255, got {images_uint8.dtype}",
                         fix="normalise the uint8 images straight from the dataset, after augmentation")
    c = images_uint8.shape[1]
    m = torch.as_tensor(mean, dtype=torch.float64).flatten()
    s = torch.as_tensor(std, dtype=torch.float64).flatten()
    if m.numel() not in (1, c) or s.numel() not in (1, c):
        raise KdkitError(f"mean/std have {m.numel()}/{s.numel()} values but images have {c} channels",
                         fix="give one mean and one std per channel")
    scale = (1.0 / (255.0 * s)).to(images_uint8.device, dtype).view(1, -1, 1, 1)
    shift = (-m / s).to(images_uint8.device, dtype).view(1, -1, 1, 1)
    return torch.addcmul(shift, images_uint8.to(dtype), scale)


VIEW_COLUMNS = ("dy", "dx", "flip")
"""Columns of a view ``(B, 3)`` int64: output pixel ``(r, c)`` of the crop shows input pixel ``(r + dy, c + dx)``
(``dy = oy - padding``, ``dx = ox - padding``); then the image is flipped left-right when ``flip`` is 1."""

MIN_BOX_VISIBLE = 0.1
"""A box keeps at least this share of its area inside the cropped image, or it is dropped (a sliver of an object
at the border is no object to find; 0.1 is the area ratio YOLOv5/ultralytics' ``box_candidates`` keep)."""


def _check_view(view: Tensor, batch: int) -> Tensor:
    if view.shape != (batch, 3):
        raise KdkitError(f"a view is (B, 3) = (dy, dx, flip) per sample, got {tuple(view.shape)} for {batch} samples",
                         fix="draw the views with AugmentConfig.draw on the same batch")
    return view.to(torch.int64)


def follow_maps(maps: Tensor, view: Tensor, fill: int) -> Tensor:
    """Move per-pixel maps ``(B, H, W)`` or ``(B, P, H, W)`` by ``view`` exactly as :meth:`AugmentConfig.apply_view`
    moves the images, by nearest neighbour (pixels are moved, never mixed); pixels from outside the map (the
    padding) get ``fill``.

    Output pixel ``(r, c)`` takes input pixel ``(r + dy, c + dx)`` (before the flip), done with two clamped gathers and
    one fill, so no padded copy is made and the padding need not be known.

    Args:
        maps: Integer maps of any dtype that holds ``fill``.
        view: ``(B, 3)`` views ``(dy, dx, flip)`` (:data:`VIEW_COLUMNS`).
        fill: Value of the pixels that come from the padding, e.g. the ignore label.

    Returns:
        The moved maps, same shape, dtype and device.
    """
    view = _check_view(view, maps.shape[0]).to(maps.device)
    planes = maps if maps.ndim == 4 else maps.unsqueeze(1)
    b, p, h, w = planes.shape
    rows = view[:, 0:1] + torch.arange(h, device=maps.device)  # (B, H) source rows
    cols = view[:, 1:2] + torch.arange(w, device=maps.device)  # (B, W) source columns
    out = planes.gather(2, rows.clamp(0, h - 1).view(b, 1, h, 1).expand(b, p, h, w))
    out = out.gather(3, cols.clamp(0, w - 1).view(b, 1, 1, w).expand(b, p, h, w))
    outside = ((rows < 0) | (rows >= h)).view(b, 1, h, 1) | ((cols < 0) | (cols >= w)).view(b, 1, 1, w)
    out = out.masked_fill(outside, fill)
    out = torch.where(view[:, 2].bool().view(-1, 1, 1, 1), out.flip(-1), out)
    return out if maps.ndim == 4 else out.squeeze(1)


def follow_boxes(boxes: Tensor, labels: Tensor, view: Tensor, size: tuple[int, int],
                 min_visible: float = MIN_BOX_VISIBLE) -> tuple[Tensor, Tensor]:
    """Move pixel boxes by ``view`` as the images move: translate, clip to the image, drop the boxes that keep less
    than ``min_visible`` of their area (or none), flip ``x0, x1`` to ``W - x1, W - x0``.

    Boxes are ``x0, y0, x1, y1`` with exclusive ends (:mod:`kdkit.data.dense`), so a box on columns ``3..5`` of a
    ``W``-wide image becomes columns ``W - 6 .. W - 4``. The kept boxes of each image come first, in their order, and
    the rows after them are padding as the datasets write it: boxes 0, label -1.

    Args:
        boxes: ``(B, M, 4)`` float pixel boxes (padding rows: label -1).
        labels: ``(B, M)`` int64 classes, -1 for padding.
        view: ``(B, 3)`` views ``(dy, dx, flip)``.
        size: The images' ``(H, W)``.
        min_visible: Least share of a box's area kept in the image, in ``[0, 1]``.

    Returns:
        ``(boxes, labels)`` of the same shapes, dtypes and device.
    """
    view = _check_view(view, boxes.shape[0]).to(boxes.device)
    h, w = size
    dy, dx, flip = (view[:, i].to(boxes.dtype).view(-1, 1) for i in range(3))
    x0, y0, x1, y1 = boxes.unbind(-1)
    x0, x1 = (x0 - dx).clamp(0, w), (x1 - dx).clamp(0, w)
    y0, y1 = (y0 - dy).clamp(0, h), (y1 - dy).clamp(0, h)
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    kept_area = (x1 - x0) * (y1 - y0)
    keep = (labels >= 0) & (kept_area > 0) & (kept_area >= min_visible * area)
    flipped = flip.bool()
    x0, x1 = torch.where(flipped, w - x1, x0), torch.where(flipped, w - x0, x1)
    moved = torch.stack([x0, y0, x1, y1], -1).masked_fill(~keep.unsqueeze(-1), 0)
    # kept rows first, in their order (a stable sort on "dropped"), as the datasets pad: objects, then padding
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    return moved.gather(1, order.unsqueeze(-1).expand_as(moved)), labels.masked_fill(~keep, -1).gather(1, order)


@dataclass(frozen=True)
class AugmentConfig:
    """Which batched augmentations to apply: a random crop with zero padding, then a horizontal flip.

    Attributes:
        crop_padding: Padding for :func:`random_crop`; ``0`` disables it.
        hflip: Apply :func:`random_hflip` with ``p=0.5``.
    """

    crop_padding: int = 0
    hflip: bool = False

    def __post_init__(self) -> None:
        """Reject a negative or non-integer ``crop_padding``."""
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise KdkitError(f"crop_padding must be a non-negative integer, got {self.crop_padding!r}",
                             fix="use e.g. crop_padding: 2 for 28x28 images or 4 for 32x32",
                             where="augment.crop_padding")

    @property
    def is_identity(self) -> bool:
        """True when no augmentation is enabled."""
        return self.crop_padding == 0 and not self.hflip

    def draw(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """Each sample's view ``(dy, dx, flip)`` (:data:`VIEW_COLUMNS`), drawn as :func:`random_crop` then
        :func:`random_hflip` draw (the same calls, so :meth:`apply` gives their images for the same generator).

        Args:
            batch: Number of samples ``B``.
            generator: Random source (CPU default generator if ``None``).

        Returns:
            int64 ``(B, 3)`` on the generator's device; zeros for what is off.
        """
        view = torch.zeros(batch, 3, dtype=torch.int64, device=_gen_device(generator))
        if self.crop_padding:
            oy, ox = crop_offsets(batch, self.crop_padding, generator)
            view[:, 0], view[:, 1] = oy - self.crop_padding, ox - self.crop_padding
        if self.hflip:
            view[:, 2] = torch.rand(batch, generator=generator, device=_gen_device(generator)) < 0.5
        return view

    def apply_view(self, images: Tensor, view: Tensor) -> Tensor:
        """The images seen through ``view`` (from :meth:`draw`): the crop of the zero-padded image, then the flip.

        Args:
            images: Tensor ``(B, C, H, W)`` of any dtype.
            view: ``(B, 3)`` views ``(dy, dx, flip)``.

        Returns:
            The augmented batch; ``images`` itself when :attr:`is_identity`.
        """
        _check_batch(images, "apply_view")
        view = _check_view(view, images.shape[0]).to(images.device)
        if self.crop_padding:
            images = crop(images, self.crop_padding, view[:, 0] + self.crop_padding, view[:, 1] + self.crop_padding)
        if self.hflip:
            images = torch.where(view[:, 2].bool().view(-1, 1, 1, 1), images.flip(-1), images)
        return images

    def apply(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment a batch: crop (if ``crop_padding > 0``), then flip (if ``hflip``).

        Args:
            images: Tensor ``(B, C, H, W)``, usually ``uint8`` before :func:`normalize`.
            generator: Random source; may be on a different device than ``images``.

        Returns:
            The augmented batch; ``images`` itself when :attr:`is_identity`.
        """
        if self.is_identity:
            return images
        return self.apply_view(images, self.draw(images.shape[0], generator))
