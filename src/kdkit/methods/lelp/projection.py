r"""LELP's linear projections, computed once before training from the frozen teacher's embeddings.

For each class :math:`c` (Loo et al., 2024, Sec. 3.1):

1. (``null_space``) the embeddings are projected onto the null space of the teacher's output weights
   :math:`W \in \mathbb{R}^{C \times d}`, :math:`P = I - W^{+} W`, so the directions found carry what the logits
   do not (what plain KD already transfers);
2. PCA of the class's (projected) training embeddings: the top ``S`` eigenvectors :math:`V_c \in \mathbb{R}^{d
   \times S}` of their covariance, and their mean :math:`\mu_c`;
3. (``rotate``) :math:`V_c \leftarrow V_c Q_c` with :math:`Q_c` a random ``S x S`` orthogonal matrix (Haar), so
   each direction has the same variance in expectation (the top component would otherwise decide every split).

A sample's pseudo-subclass coordinates in class :math:`c` are then :math:`z_{c}(x) = V_c^\top (h(x) - \mu_c)`
(its PCA coordinates). The directions lie in the null space (they are principal directions of projected data), so
:math:`V_c^\top P h = V_c^\top h`: the projection only decides which directions are found.

Everything here is a pure function of the embeddings, labels, weights and seed, so a resumed run recomputes the
same projections (they are also checkpointed with the loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdkit.errors import KdkitError


@dataclass(frozen=True)
class Projections:
    """The per-class directions and means of LELP.

    Attributes:
        directions: ``(C, S, d)``: row ``s`` of class ``c`` is direction :math:`v_{c,s}` (unit norm, orthogonal
            within a class).
        means: ``(C, d)``: the class means :math:`\\mu_c` of the (projected) embeddings.
        spread: ``(C, S)``: the standard deviation of each direction's coordinate over the class's samples.
    """

    directions: Tensor
    means: Tensor
    spread: Tensor


def null_space_projector(weight: Tensor) -> Tensor:
    """``(d, d)``: the orthogonal projector :math:`I - W^{+} W` onto the null space of ``weight`` ``(C, d)``."""
    w = weight.to(torch.float64)
    return torch.eye(w.shape[1], dtype=torch.float64, device=w.device) - torch.linalg.pinv(w) @ w


def fix_signs(vectors: Tensor) -> Tensor:
    """``vectors`` ``(S, d)`` with each row's sign chosen so that its largest-magnitude entry is positive.

    An eigenvector's sign is arbitrary; fixing it makes the projections (and the rotation applied to them) the same
    on every platform.
    """
    pivot = vectors.gather(1, vectors.abs().argmax(1, keepdim=True))
    return vectors * torch.where(pivot < 0, -1.0, 1.0).to(vectors.dtype)


def top_components(samples: Tensor, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """PCA of ``samples`` ``(n, d)``: the ``count`` leading principal directions ``(count, d)`` (descending
    variance, signs fixed by :func:`fix_signs`), the mean ``(d,)`` and each direction's standard deviation
    ``(count,)`` (the square root of the unbiased covariance's eigenvalue). Computed in float64."""
    x = samples.to(torch.float64)
    mean = x.mean(0)
    centred = x - mean
    covariance = centred.T @ centred / (len(x) - 1)
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    top = vectors[:, -count:].flip(1).T
    return fix_signs(top), mean, values[-count:].flip(0).clamp_min(0).sqrt()


def random_rotation(size: int, generator: torch.Generator) -> Tensor:
    """A Haar-random ``(size, size)`` orthogonal matrix (float64): the Q of a Gaussian matrix's QR decomposition,
    its columns' signs fixed by R's diagonal (Mezzadri, 2007), drawn from ``generator`` (on the CPU)."""
    gaussian = torch.randn(size, size, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r))


def lelp_projections(embeddings: Tensor, labels: Tensor, classes: int, subclasses: int, *,
                     weight: Tensor | None, rotate: bool, seed: int) -> Projections:
    """LELP's projections from the teacher's training embeddings (see the module docstring).

    Args:
        embeddings: ``(N, d)`` teacher embeddings of the training images (flattened).
        labels: ``(N,)`` their class labels; negative labels (unlabelled samples) are left out.
        classes: ``C``.
        subclasses: ``S``, directions (pseudo-subclasses) per class.
        weight: ``(C, d)`` teacher output weights whose null space the embeddings are projected onto, or ``None``
            (no projection).
        rotate: Rotate each class's directions by a random orthogonal matrix.
        seed: Seed of the rotations (one per class, drawn in class order).

    Returns:
        The directions, means and spreads, float64 on ``embeddings``' device.

    Raises:
        KdkitError: A class has fewer than ``S + 1`` labelled samples, or ``S`` exceeds the embedding width.
    """
    h = embeddings.reshape(len(embeddings), -1).to(torch.float64)
    if subclasses > h.shape[1]:
        raise KdkitError(f"LELP takes {subclasses} directions per class from a {h.shape[1]}-wide embedding",
                         bad=str(subclasses), choices=[str(h.shape[1])],
                         fix="lower the lelp_head bridge's `subclasses` or tap a wider teacher embedding")
    if weight is not None:
        h = h @ null_space_projector(weight.to(h.device))  # the projector is symmetric
    generator = torch.Generator().manual_seed(seed)
    directions, means, spreads = [], [], []
    for c in range(classes):
        members = h[labels.to(h.device) == c]
        if len(members) <= subclasses:
            raise KdkitError(f"LELP's PCA of class {c} needs more than {subclasses} labelled training samples, got "
                             f"{len(members)}", bad=str(len(members)), choices=[f">= {subclasses + 1}"],
                             fix="lower the lelp_head bridge's `subclasses` or train on more labelled data")
        top, mean, spread = top_components(members, subclasses)
        if rotate:
            q = random_rotation(subclasses, generator).to(h.device)
            top = q.T @ top  # direction s' = sum_s q[s, s'] v_s, i.e. the columns of V_c Q_c
            spread = ((members - mean) @ top.T).std(0)
        directions.append(top)
        means.append(mean)
        spreads.append(spread)
    return Projections(torch.stack(directions), torch.stack(means), torch.stack(spreads))


def coordinates(embeddings: Tensor, directions: Tensor, means: Tensor) -> Tensor:
    """``(B, C, S)``: :math:`z_{c,s}(x) = v_{c,s}^\\top (h(x) - \\mu_c)` for embeddings ``(B, d)`` (flattened),
    directions ``(C, S, d)`` and means ``(C, d)``, in the inputs' promoted precision."""
    h = embeddings.reshape(len(embeddings), -1)
    offsets = torch.einsum("csd,cd->cs", directions, means)
    return torch.einsum("bd,csd->bcs", h, directions) - offsets
