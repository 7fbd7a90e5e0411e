"""DIST: distillation by inter- and intra-class Pearson correlation of softened predictions."""

from __future__ import annotations

from typing import Annotated

from annotated_types import Ge, Gt
from torch import Tensor

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss
from kdkit.losses.standardize import standardize_logits


def mean_row_pearson(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """Mean over rows of the Pearson correlation of ``a[i, :]`` and ``b[i, :]`` (eps added to the denominator)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    corr = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
    return corr.mean()


def dist_loss(student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0, gamma: float = 1.0,
              temperature: float = 1.0, standardize: bool = False, eps: float = 1e-8) -> Tensor:
    r"""Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher" (DIST), NeurIPS 2022.

    Matches the *relations* of the predictions rather than their values, which tolerates the larger
    discrepancy of a much stronger teacher. With :math:`Y = \mathrm{softmax}(Z/\tau)` (``B x K``) and
    :math:`\rho` the Pearson correlation:

    .. math::
        L_{inter} = 1 - \frac{1}{B}\sum_i \rho(Y_s[i,:], Y_t[i,:]), \qquad
        L_{intra} = 1 - \frac{1}{K}\sum_j \rho(Y_s[:,j], Y_t[:,j]),

    .. math::
        L = \tau^2 (\beta L_{inter} + \gamma L_{intra}).

    ``inter`` compares, per sample, how the classes are ranked; ``intra`` compares, per class, how the
    samples of the batch are ranked (so it needs ``B >= 2``; with ``B = 1`` every centred column is 0 and
    ``L_intra = 1`` whatever the inputs). Each term lies in ``[0, 2]``.

    Paper vs official code (hunto/DIST_KD, ``dist_kd.py``): the paper's Pearson has no epsilon; the
    official code computes it as the cosine of the centred vectors with ``eps = 1e-8`` added to the product
    of norms, which is the default here (``eps=0`` gives the paper's exact formula, NaN for a constant
    row or column). The official classification ``DIST`` class defaults are ``beta=1, gamma=1, tau=1``
    (with the ``tau^2`` factor; earlier versions had no ``tau``) -- used as the defaults here. The
    paper's CIFAR-100 setting is ``beta = gamma = 2`` with ``tau = 4`` (ImageNet: ``tau = 1``), and its
    total loss is ``1·CE + L``; the CE weight is not part of this loss.

    Args:
        student_logits: ``(B, K)`` student logits.
        teacher_logits: ``(B, K)`` teacher logits.
        beta: Weight of the inter-class (per-sample) relation term.
        gamma: Weight of the intra-class (per-class, across the batch) relation term.
        temperature: Softening temperature ``tau``; the loss is multiplied by ``tau^2``.
        standardize: Z-score both logits first (:func:`~kdkit.losses.standardize.standardize_logits`).
        eps: Added to the product of norms in each Pearson correlation (official code: ``1e-8``).

    Returns:
        Scalar loss, in the student's dtype.
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"dist needs (B, K) student and teacher logits of one shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    dtype = compute_dtype(student_logits, teacher_logits)
    z_s, z_t = student_logits.to(dtype), teacher_logits.to(dtype)
    if standardize:
        z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
    y_s = (z_s / temperature).softmax(dim=1)
    y_t = (z_t / temperature).softmax(dim=1)
    inter = 1 - mean_row_pearson(y_s, y_t, eps)
    intra = 1 - mean_row_pearson(y_s.t(), y_t.t(), eps)
    loss = temperature**2 * (beta * inter + gamma * intra)
    return loss.to(student_logits.dtype)


@register_loss("dist", help="DIST: tau^2 (beta·inter + gamma·intra) Pearson-relation KD (NeurIPS 2022)")
class DISTLoss(DistillLoss):
    """DIST on logits; see :func:`dist_loss`.

    Recipe (the paper's CIFAR-100 setting: CE weight 1, ``beta = gamma = 2``, ``tau = 4``)::

        distill:
          - {loss: dist, weight: 1, beta: 2, gamma: 2, temperature: 4}

    ImageNet (the official code's class defaults, ``tau = 1``)::

        distill:
          - {loss: dist, weight: 1}

    The defaults are the official ``DIST`` class's (``beta=1, gamma=1, tau=1``), not the paper's CIFAR
    values: a recipe that names no parameter gets what the official code does, and the CIFAR snippet above
    states its values explicitly.

    Args:
        beta: Inter-class relation weight (default 1).
        gamma: Intra-class relation weight (default 1).
        temperature: Softening temperature (default 1).
        standardize: Z-score teacher and student logits before softening.
    """
    reads_logits = frozenset({"classes"})

    def __init__(self, *, beta: Annotated[float, Ge(0)] = 1.0, gamma: Annotated[float, Ge(0)] = 1.0,
                 temperature: Annotated[float, Gt(0)] = 1.0, standardize: bool = False) -> None:
        super().__init__()
        self.beta = beta
        self.gamma = gamma
        self.temperature = temperature
        self.standardize = standardize

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """DIST loss of ``(B, K)`` logits; labels are unused."""
        return dist_loss(student, teacher, self.beta, self.gamma, self.temperature, self.standardize)
