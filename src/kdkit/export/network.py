"""The deployed network as a plain module that takes raw images: :func:`load_deployed`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from kdkit.deployment import Deployment
from kdkit.errors import KdkitError
from kdkit.export.source import open_run


class RawImages(nn.Module):
    """A deployed network that normalises its input itself.

    Takes images ``(B, C, H, W)`` (or one ``(C, H, W)``) of the run's channels and size, either ``uint8``
    pixels in ``0..255`` or floating-point values in ``[0, 1]`` (``pixels / 255``), and returns the network's
    outputs ``(B, K)`` (:attr:`deployment` says what they are: ``output``, ``probabilities``, ``classes``).

    Args:
        network: The deployed network on normalised images.
        deployment: The run's record (input shape, mean/std, classes, task).
    """

    def __init__(self, network: nn.Module, deployment: Deployment) -> None:
        super().__init__()
        self.network = network
        self.deployment = deployment
        self.classes = list(deployment.classes)
        shape = (1, deployment.channels, 1, 1)
        self.register_buffer("mean", torch.tensor(deployment.mean, dtype=torch.float32).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(deployment.std, dtype=torch.float32).view(shape), persistent=False)

    def normalise(self, images: Tensor) -> Tensor:
        """``(images in [0, 1] - mean) / std``, with the checks of the class docstring.

        Raises:
            KdkitError: Another shape, dtype or value range than the network takes.
        """
        batch = images.unsqueeze(0) if images.dim() == 3 else images
        want = self.deployment.input_shape
        if batch.dim() != 4 or tuple(batch.shape[1:]) != want:
            raise KdkitError(f"images of shape {tuple(images.shape)} given; the network takes (B, {want[0]}, "
                             f"{want[1]}, {want[2]}) or ({want[0]}, {want[1]}, {want[2]})",
                             fix="resize the images and convert their channels first (`kdkit predict` does it for "
                                 "image files)")
        if batch.dtype == torch.uint8:
            scaled = batch.float() / 255.0
        elif batch.is_floating_point():
            low, high = float(batch.min()), float(batch.max())
            if low < 0.0 or high > 1.0:
                raise KdkitError(f"float images must hold values in [0, 1]; these span [{low:.4g}, {high:.4g}]",
                                 fix="divide 0..255 pixels by 255 (or pass uint8 images)")
            scaled = batch.float()
        else:
            raise KdkitError(f"images of dtype {batch.dtype} given", choices=["torch.uint8", "torch.float32"],
                             fix="pass uint8 pixels (0..255) or floats in [0, 1]")
        return (scaled - self.mean) / self.std

    def forward(self, images: Tensor) -> Tensor:
        """The deployed network's outputs ``(B, K)`` for raw images (class docstring)."""
        return self.network(self.normalise(images))


def load_deployed(run_dir: str | Path, checkpoint: str = "best") -> RawImages:
    """A finished run's deployed network as a plain ``nn.Module`` in eval mode that takes raw images.

    Example::

        net = kdkit.load_deployed("runs/demo/kd_seed0")
        probs = net(images_uint8).softmax(1)          # images: (B, C, H, W) uint8, or floats in [0, 1]
        names = [net.classes[i] for i in probs.argmax(1)]

    Args:
        run_dir: A run folder written by ``kdkit run`` (finished).
        checkpoint: ``best`` or ``latest``.

    Raises:
        KdkitError: Not a finished run folder (see :func:`kdkit.export.source.open_run`).
    """
    run = open_run(run_dir, checkpoint)
    return RawImages(run.network, run.deployment).eval()
