"""FerKD's SelfMix: CutMix between two regions (stored views) of the *same* image.

Every draw is a pure function of ``(seed, epoch, batch)``, so a resumed run mixes the same boxes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def partner_slots(slots: Tensor, width: int, rng: np.random.Generator) -> Tensor:
    """Another of each image's ``width`` kept views: ``(slot + 1 + u) mod width``, ``u`` uniform in
    ``[0, width - 2]``, so the partner is never the image's own view (``width >= 2``)."""
    if width < 2:
        raise ValueError(f"SelfMix needs at least 2 kept views per image, got {width}")
    shift = torch.from_numpy(rng.integers(0, width - 1, size=len(slots))).to(slots.device)
    return (slots + 1 + shift) % width


def cutmix_boxes(batch: int, height: int, width: int, alpha: float,
                 rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """CutMix boxes (Yun et al., 2019), one per sample: ``lam ~ Beta(alpha, alpha)``, a box of sides
    ``H sqrt(1 - lam)`` by ``W sqrt(1 - lam)`` centred uniformly and clipped to the image.

    Returns:
        ``(B, 1, H, W)`` bool mask of the pasted box, and ``(B,)`` float64 ``lam``: the share of each image left
        unpasted after clipping (the weight of its own label, as CutMix recomputes it).
    """
    lam = rng.beta(alpha, alpha, size=batch)
    cut_h = np.floor(height * np.sqrt(1.0 - lam)).astype(np.int64)
    cut_w = np.floor(width * np.sqrt(1.0 - lam)).astype(np.int64)
    cy, cx = rng.integers(0, height, size=batch), rng.integers(0, width, size=batch)
    y0, y1 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    x0, x1 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    rows, cols = torch.arange(height).view(1, -1, 1), torch.arange(width).view(1, 1, -1)

    def inside(lo: np.ndarray, hi: np.ndarray, at: Tensor) -> Tensor:
        return (at >= torch.from_numpy(lo).view(-1, 1, 1)) & (at < torch.from_numpy(hi).view(-1, 1, 1))

    mask = (inside(y0, y1, rows) & inside(x0, x1, cols)).unsqueeze(1)
    kept = 1.0 - torch.from_numpy((y1 - y0) * (x1 - x0)).double() / (height * width)
    return mask, kept


def paste(x: Tensor, partner: Tensor, mask: Tensor) -> Tensor:
    """``x`` with ``partner``'s pixels inside ``mask``, in ``x``'s memory layout and dtype."""
    out = torch.empty_like(x)
    out.copy_(torch.where(mask.to(x.device), partner.to(x.dtype), x))
    return out
