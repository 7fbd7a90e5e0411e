"""Plan-time pieces of DistillNearest / DistillWeighted: the task-similarity score of a source on the target's
labelled images, the selection or weights it gives, and the linear target head fitted on a frozen source's features.

Everything here is a pure function of frozen features and target labels (no randomness: the fits start from zeros),
so recomputing it when a run resumes gives the same numbers.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.errors import KdkitError


def pca_project(features: Tensor, dims: int, power_iterations: int = 7, oversample: int = 10) -> Tensor:
    """The centred ``(N, D)`` features projected on their top ``dims`` principal directions (``(N, dims)``).

    ``dims`` 0 keeps the features as they are. When ``dims + oversample`` reaches ``min(N, D)`` the directions are the
    exact SVD's; otherwise they come from a randomized range finder (Halko et al. 2011: a Gaussian block drawn from a
    generator seeded 0, ``power_iterations`` QR-orthonormalised power iterations, then the SVD of the small projected
    matrix) -- what GBC's reference code gets from scikit-learn's ``PCA(64)``, whose default solver is randomized at
    these sizes (7 iterations, 10 extra columns), and a few seconds instead of minutes on 3,000 x 3,136 features. The
    fixed seed makes it deterministic. The signs of the directions are arbitrary; the Gaussian Bhattacharyya
    coefficient does not depend on them (a sign flip of a dimension moves every class mean alike).

    Raises:
        KdkitError: ``dims`` exceeds ``min(N, D)`` (no such direction).
    """
    if dims == 0:
        return features
    n, d = features.shape
    if dims > min(n, d):
        raise KdkitError(f"source_select.pca_dims {dims} exceeds the {min(n, d)} principal directions of {n} "
                         f"labelled images with {d} features", bad=str(dims), fix=f"set pca_dims <= {min(n, d)} "
                         "(0: no projection)", where="source_select.pca_dims")
    centred = features - features.mean(0, keepdim=True)
    width = dims + oversample
    if width >= min(n, d):
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        return centred @ vh[:dims].T
    generator = torch.Generator(device=features.device).manual_seed(0)
    block = torch.randn(d, width, generator=generator, dtype=features.dtype, device=features.device)
    basis = torch.linalg.qr(centred @ block).Q  # (N, width): spans the top of the column space
    for _ in range(power_iterations):
        basis = torch.linalg.qr(centred @ torch.linalg.qr(centred.T @ basis).Q).Q
    _, _, vh = torch.linalg.svd(basis.T @ centred, full_matrices=False)
    return centred @ vh[:dims].T


def class_gaussians(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class mean and diagonal (population) variance of ``(N, D)`` features: two ``(K, D)`` tensors.

    Raises:
        KdkitError: A class has fewer than 2 labelled images (no variance to estimate).
    """
    counts = torch.bincount(labels, minlength=num_classes)
    if int(counts.min()) < 2:
        short = int(counts.argmin())
        raise KdkitError(f"class {short} has {int(counts[short])} labelled training image(s): the task similarity "
                         "needs at least 2 per class", bad=str(int(counts[short])),
                         fix="give the setting more labelled images (semi_supervised: labelled)", where="data.setting")
    means = torch.stack([features[labels == c].mean(0) for c in range(num_classes)])
    variances = torch.stack([features[labels == c].var(0, unbiased=False) for c in range(num_classes)])
    return means, variances


def bhattacharyya_coefficients(means: Tensor, variances: Tensor) -> Tensor:
    r"""``(K, K)`` Bhattacharyya coefficients between diagonal Gaussians ``N(mu_i, diag(s_i))``:

    .. math::
        D_B = \tfrac18 (\mu_i-\mu_j)^\top \Sigma^{-1} (\mu_i-\mu_j)
              + \tfrac12 \ln \frac{\det \Sigma}{\sqrt{\det \Sigma_i \det \Sigma_j}}, \quad
        \Sigma = \tfrac12(\Sigma_i + \Sigma_j), \qquad BC = e^{-D_B}

    computed as sums of logs per dimension (a product of thousands of variances would overflow).
    """
    mean_var = (variances[:, None, :] + variances[None, :, :]) / 2
    diff = means[:, None, :] - means[None, :, :]
    mahalanobis = (diff**2 / mean_var).sum(-1) / 8
    log_var = variances.log()
    log_det = mean_var.log().sum(-1) - (log_var[:, None, :] + log_var[None, :, :]).sum(-1) / 2
    return torch.exp(-(mahalanobis + log_det / 2))


def gbc_score(features: Tensor, labels: Tensor, num_classes: int, pca_dims: int = 64) -> float:
    r"""Gaussian Bhattacharyya Coefficient (Pándy et al., "Transferability Estimation using Bhattacharyya Class
    Separability", CVPR 2022) of a source's ``(N, D)`` features of the target's labelled images ``labels`` ``(N,)``:

    .. math:: \mathrm{GBC} = -\sum_{i}\sum_{j \ne i} BC(c_i, c_j)

    over ordered class pairs (as in the GBC paper), each class a diagonal Gaussian of the features projected on their
    top ``pca_dims`` principal directions (GBC's 64 by default). Higher (closer to 0) is more transferable: the target
    classes overlap less in the source's feature space. Computed in float64 whatever the features' dtype.
    """
    projected = pca_project(features.double(), pca_dims)
    means, variances = class_gaussians(projected, labels, num_classes)
    if bool((variances <= 0).any()):
        raise KdkitError("a class has a feature of zero variance in the source's (projected) features: its "
                         "Bhattacharyya coefficient is undefined", fix="lower source_select.pca_dims",
                         where="source_select.pca_dims")
    bc = bhattacharyya_coefficients(means, variances)
    off_diagonal = ~torch.eye(num_classes, dtype=torch.bool, device=bc.device)
    return -float(bc[off_diagonal].sum())


def selection_weights(scores: Tensor, mode: Literal["nearest", "weighted"], temperature: float = 1.0) -> Tensor:
    """The sources' distillation weights from their similarity scores ``(S,)`` (higher: more similar).

    ``nearest`` (DistillNearest): 1 for the highest score, 0 elsewhere (the first on a tie). ``weighted``
    (DistillWeighted): ``softmax(scores / temperature)``, which sums to 1 and keeps the scores' order.
    """
    if mode == "nearest":
        return F.one_hot(scores.argmax(), len(scores)).to(scores.dtype)
    return torch.softmax(scores / temperature, dim=0)


def fit_target_head(features: Tensor, labels: Tensor, num_classes: int, steps: int = 100,
                    l2: float = 1e-4) -> tuple[Tensor, Tensor]:
    """The target head of a source: multinomial logistic regression on its frozen ``(N, D)`` features of the
    labelled target images, ``mean CE(features W^T + b, labels) + l2 ||W||^2``, by full-batch L-BFGS from zeros.

    The paper's bridge between a source trained on another label space and the target task: the source's pseudo-labels
    of the target's classes are this head's predictions. Fitted in float64 (deterministic, no initial draw).

    Returns:
        ``W`` ``(K, D)`` and ``b`` ``(K,)`` in the features' dtype.
    """
    x = features.double()
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(F.linear(x, weight, bias), labels) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach().to(features.dtype), bias.detach().to(features.dtype)
