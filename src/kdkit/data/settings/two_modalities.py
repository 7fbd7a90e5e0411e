"""``two_modalities``: every image with a derived second modality, its Sobel edge magnitude, as an extra channel.

A proxy for cross-modal distillation (e.g. MST-Distill, RGB + depth): two views of each sample that share its
label but differ in what they show -- intensities, and edges (a structure-only view, as a depth or sketch
modality is). Both are in every image, channels ``0..C-1`` the image and channel ``C`` the edges (of the channel
mean), in train and test splits alike; a method that feeds one modality to each network selects the channels.
What it does not model: a second sensor's independent noise and information (edges are a function of the image).

Edges: ``sqrt(gx^2 + gy^2)`` of the 3x3 Sobel kernels on ``[0, 1]`` intensities (replicate padding), scaled by
``255 / (4 sqrt 2)`` (the largest possible magnitude) to uint8. The edge channel's mean and std are computed on
the training images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.data.base import ImageData, channel_stats
from kdkit.data.settings.common import with_train
from kdkit.data.settings.registry import register_setting

SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
#: The largest Sobel magnitude on [0, 1] images (|gx| <= 4 and |gy| <= 4).
MAX_MAGNITUDE = 4 * math.sqrt(2)


def sobel_magnitude(images: Tensor, chunk: int = 8192) -> Tensor:
    """Sobel edge magnitude of uint8 ``(N, C, H, W)`` images (of their channel mean) as uint8 ``(N, 1, H, W)``."""
    kernels = torch.stack([SOBEL_X, SOBEL_X.T]).unsqueeze(1)  # (2, 1, 3, 3): d/dx, d/dy
    out = torch.empty(images.shape[0], 1, *images.shape[2:], dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].to(torch.float32).mean(1, keepdim=True) / 255
        g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels)
        magnitude = g.pow(2).sum(1, keepdim=True).sqrt()
        out[start:start + chunk] = (magnitude * (255 / MAX_MAGNITUDE)).round().clamp(0, 255).to(torch.uint8)
    return out


@register_setting("two_modalities", help="image + its Sobel edge magnitude as an extra channel (cross-modal proxy)")
def two_modalities(data: ImageData, *, seed: int) -> ImageData:
    """Append the Sobel edge magnitude as channel ``C`` of every train and test image.

    Args:
        data: The dataset.
        seed: Not used (nothing is random); accepted like every setting's.

    Returns:
        ``C + 1``-channel images, labels unchanged; the image channels keep their mean/std.
    """
    train_edges = sobel_magnitude(data.train_images)
    edge_mean, edge_std = channel_stats(train_edges)
    index = torch.arange(len(data.train_labels))
    return with_train(data, index, data.train_labels,
                      images=torch.cat([data.train_images, train_edges], dim=1),
                      test_images=torch.cat([data.test_images, sobel_magnitude(data.test_images)], dim=1),
                      novel=data.novel_classes, mean=(*data.mean, *edge_mean), std=(*data.std, *edge_std),
                      name=f"{data.name}-edges", source="two modalities: the image and its Sobel edge magnitude "
                                                          f"(channel {data.in_channels})")
