"""KD³'s MixDistribution block: images re-styled with another instance's per-channel statistics."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

#: Floor of a channel's standard deviation (a constant channel would divide by 0).
EPS = 1e-6


def mix_distribution(x: Tensor, lam: Tensor, perm: Tensor) -> Tensor:
    r"""Move each image to a new distribution mixed from its own and a partner's channel statistics.

    With :math:`\mu_i, \sigma_i` the per-channel mean and standard deviation of image :math:`x_i` over its pixels
    and :math:`j = \mathrm{perm}(i)`:

    .. math::
        \tilde x_i = (\lambda_i \sigma_i + (1-\lambda_i)\sigma_j)\,\frac{x_i - \mu_i}{\sigma_i}
                     + \lambda_i \mu_i + (1-\lambda_i)\mu_j

    The content (the normalised pattern of :math:`x_i`) is kept; its first and second moments, which a
    distribution shift of low-level statistics changes, are new.

    Args:
        x: ``(B, C, H, W)`` images.
        lam: ``(B,)`` mixing weights in ``[0, 1]`` (1 keeps the image).
        perm: ``(B,)`` partner indices.

    Returns:
        ``(B, C, H, W)``, in ``x``'s dtype.
    """
    mu = x.mean((2, 3), keepdim=True)
    sigma = x.std((2, 3), keepdim=True, unbiased=False).clamp_min(EPS)
    lam = lam.to(x.dtype).view(-1, 1, 1, 1)
    mixed_mu = lam * mu + (1 - lam) * mu[perm]
    mixed_sigma = lam * sigma + (1 - lam) * sigma[perm]
    return mixed_sigma * (x - mu) / sigma + mixed_mu


def draw_mix(batch: int, alpha: float, seed: int, epoch: int, step: int) -> tuple[Tensor, Tensor]:
    """``lam ~ Beta(alpha, alpha)`` per sample and a random partner permutation, a pure function of
    ``(seed, epoch, step)`` so that a resumed run draws the same."""
    rng = np.random.default_rng([seed, epoch, step])
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=batch))
    perm = torch.from_numpy(rng.permutation(batch))
    return lam, perm
