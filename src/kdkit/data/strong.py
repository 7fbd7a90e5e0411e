"""The strong view of two-view training: RandAugment on whole uint8 batches (kornia).

MLKD (Jin et al., CVPR 2023) trains on a weak view (crop + flip) and a strong view (the same plus
RandAugment(2, 10)) of every image. kornia's RandAugment draws one operation sequence per call, so
the batch is split into ``groups`` chunks with independent draws (per-sample draws, as torchvision's
per-image transform makes, would be ``groups = batch size``). Each draw is seeded from the batch's
seed, so a resumed run sees the same strong views.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdkit.errors import KdkitError


class StrongView:
    """Callable ``(uint8 images, seed) -> uint8 images`` applying RandAugment in ``groups`` chunks.

    Args:
        n: Operations per image.
        m: Magnitude on RandAugment's 0..30 scale.
        groups: Independent draws per batch.
    """

    def __init__(self, n: int = 2, m: float = 10.0, groups: int = 8) -> None:
        try:
            from kornia.augmentation.auto import RandAugment
        except ImportError:  # pragma: no cover - kornia is a dependency
            raise KdkitError("the strong view needs kornia", fix="pip install kornia") from None
        self.policy = RandAugment(n=n, m=int(m))
        self.groups = groups

    def __call__(self, images: Tensor, seed: int) -> Tensor:
        """Strongly augmented copy of ``images`` (uint8 ``(B, C, H, W)``; 1 or 3 channels)."""
        gray = images.shape[1] == 1
        x = images.float().div(255.0)
        if gray:  # kornia's colour operations need RGB; grey stays grey (channel mean back)
            x = x.expand(-1, 3, -1, -1)
        out = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for chunk in x.chunk(self.groups):
                out.append(self.policy(chunk.contiguous()))
        y = torch.cat(out)
        if gray:
            y = y.mean(dim=1, keepdim=True)
        return y.clamp(0, 1).mul(255.0).round().to(torch.uint8)
