"""Every export is checked: the written file, run by its own runtime, against PyTorch on real test images (the
run's first ones, stored in its folder: :func:`kdkit.deployment.read_samples`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdkit.data import normalize
from kdkit.deployment import Deployment
from kdkit.export.formats import Exported

#: Largest |output difference| an export may show, relative to the largest |output| of the batch (at least 1):
#: two runtimes' float32 kernels (other summation orders, fused operations) differ by ~1e-6 of it.
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Verification:
    """An export's outputs against PyTorch's.

    Attributes:
        images: Test images compared.
        max_abs_diff: Largest |exported - PyTorch| over every image and output.
        tolerance: The largest difference allowed (:data:`TOLERANCE` times the outputs' scale).
        agreement: Share of images (%) whose top-1 output is the same.
        worst: ``(image, output)`` indices of the largest difference.
        reference: PyTorch's value there.
        exported: The export's value there.
        problem: Why the outputs cannot be compared value by value (other shapes), else ``""``.
    """

    images: int
    max_abs_diff: float
    tolerance: float
    agreement: float
    worst: tuple[int, int]
    reference: float
    exported: float
    problem: str = ""

    @property
    def ok(self) -> bool:
        """Whether the outputs have PyTorch's shape and the largest difference is within the tolerance."""
        return not self.problem and self.max_abs_diff <= self.tolerance

    def line(self) -> str:
        """One line for the user."""
        return (f"max abs diff {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}), top-1 agreement "
                f"{self.agreement:.1f} % on {self.images} test images")


@torch.inference_mode()
def verify(exported: Exported, network: nn.Module, images: Tensor, deployment: Deployment,
           tolerance: float = TOLERANCE) -> Verification:
    """Run ``images`` (``uint8``) through the export and through ``network`` (PyTorch) and compare the outputs.

    Args:
        exported: The written file, loaded back.
        network: The deployed network it was written from (eval mode).
        images: ``uint8`` test images ``(N, C, H, W)``.
        deployment: The run's record (its normalisation).
        tolerance: Relative tolerance (see :data:`TOLERANCE`).
    """
    x = normalize(images, deployment.mean, deployment.std)
    reference = network(x).float()
    got = exported(x).float()
    if got.shape != reference.shape:
        return Verification(len(x), float("inf"), tolerance, 0.0, (0, 0), float("nan"), float("nan"),
                            problem=f"outputs of shape {tuple(got.shape)}, PyTorch's are {tuple(reference.shape)}")
    diff = (got - reference).abs()
    flat = int(diff.argmax())
    image, output = divmod(flat, reference.shape[1])
    scale = max(1.0, float(reference.abs().max()))
    agreement = 100.0 * float((got.argmax(1) == reference.argmax(1)).float().mean())
    return Verification(len(x), float(diff.max()), tolerance * scale, agreement, (image, output),
                        float(reference[image, output]), float(got[image, output]))
