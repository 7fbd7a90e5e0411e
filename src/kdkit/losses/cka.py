"""Linear centred kernel alignment (CKA) and the RCKA distillation losses.

From Zhou, Shen, Shao, Gong and Lin, "Rethinking Centered Kernel Alignment in Knowledge Distillation"
(IJCAI 2024; arXiv:2401.11824; official code: github.com/Klayand/PCKA for detection, and the classification
distiller ``distiller/CKA.py`` of github.com/Klayand/Distill_Knowledge). The paper shows that maximising
CKA minimises an upper bound of an MMD between the two representations. The patch-based detection
variant (PCKA) lives in :mod:`kdkit.losses.pcka`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor

from kdkit.losses.base import DistillLoss, register_loss

_EPS = 1e-12  # added to the CKA denominator; the inputs are normalised to unit Frobenius norm first


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise (so bfloat16/float16 are computed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _unit_frobenius(x: Tensor) -> Tensor:
    """Scale each ``(N, P)`` matrix of a ``(G, N, P)`` stack to unit Frobenius norm (zero stays zero).

    CKA is invariant to isotropic scaling, so this changes no value; it keeps every later product in
    ``[0, 1]`` (no overflow of large activations in float32) and makes :data:`_EPS` a relative epsilon.
    """
    sq = x.square().sum(dim=(1, 2), keepdim=True)
    return x / sq.clamp_min(torch.finfo(x.dtype).tiny).sqrt()


def _use_gram_form(n: int, p: int, q: int) -> bool:
    """Whether the ``N x N`` Gram form is cheaper than the ``P x P'`` feature form (multiply-adds)."""
    gram_cost = n * n * (p + q)  # X X^T and Y Y^T
    feature_cost = n * (p * q + p * p + q * q)  # Y^T X, X^T X and Y^T Y
    return gram_cost <= feature_cost


def batched_cka(x: Tensor, y: Tensor, centered: bool = True,
                form: Literal["auto", "gram", "feature"] = "auto") -> Tensor:
    """Linear CKA of each pair of a stack of matrices; see :func:`cka` for the formula.

    Args:
        x: ``(G, N, P)`` float tensor: ``G`` independent ``N x P`` matrices (rows are the samples).
        y: ``(G, N, P')`` float tensor.
        centered: Subtract the column means (over ``N``) first.
        form: ``"gram"`` (``N x N`` Gram matrices), ``"feature"`` (``P x P'`` cross-covariances) or
            ``"auto"`` (the cheaper of the two; both give the same value).

    Returns:
        ``(G,)`` CKA values in ``[0, 1]``, in ``x``'s dtype.
    """
    if x.dim() != 3 or y.dim() != 3 or x.shape[:2] != y.shape[:2]:
        raise ValueError(f"batched_cka needs (G, N, P) and (G, N, P') tensors, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if centered:
        x = x - x.mean(dim=1, keepdim=True)
        y = y - y.mean(dim=1, keepdim=True)
    x, y = _unit_frobenius(x), _unit_frobenius(y)
    n, p, q = x.shape[1], x.shape[2], y.shape[2]
    if form == "auto":
        form = "gram" if _use_gram_form(n, p, q) else "feature"
    if form == "gram":
        gram_x, gram_y = x @ x.mT, y @ y.mT  # (G, N, N)
        num = (gram_x * gram_y).sum(dim=(1, 2))  # <XX^T, YY^T>_F = ||Y^T X||_F^2
        den = torch.linalg.matrix_norm(gram_x) * torch.linalg.matrix_norm(gram_y)
    elif form == "feature":
        num = (y.mT @ x).square().sum(dim=(1, 2))
        den = torch.linalg.matrix_norm(x.mT @ x) * torch.linalg.matrix_norm(y.mT @ y)
    else:
        raise ValueError(f"form must be 'auto', 'gram' or 'feature', got {form!r}")
    return num / (den + _EPS)


def cka(x: Tensor, y: Tensor, centered: bool = True, form: Literal["auto", "gram", "feature"] = "auto") -> Tensor:
    r"""Linear CKA between two representations of the same ``N`` samples (Kornblith et al., ICML 2019).

    .. math::
        \mathrm{CKA}(X, Y) = \frac{\|Y^\top X\|_F^2}{\|X^\top X\|_F\,\|Y^\top Y\|_F}
        = \frac{\langle XX^\top, YY^\top\rangle_F}{\|XX^\top\|_F\,\|YY^\top\|_F}

    with the columns of ``X`` and ``Y`` centred (mean over the ``N`` rows subtracted) when ``centered``;
    equivalently ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with ``K = XX^T``, ``L = YY^T`` and the centring
    matrix ``H = I - 11^T/N``. The feature form costs ``O(N P P')`` and the Gram form ``O(N^2 (P + P'))``;
    the cheaper one is used (Gram when the features are wider than the batch). Invariant to orthogonal
    transforms and isotropic scaling of either input; centred CKA is also invariant to adding a constant
    row vector to every row. Computed in float32 (float64 if an input is float64), on inputs scaled to unit
    Frobenius norm, with a small epsilon in the denominator (a constant input gives 0, not NaN).
    Caution: independent random features are near 0 only when ``N >> P``; when ``P >> N`` (wide flattened
    maps, small batch) near-isotropic features have Grams close to the identity and CKA is biased towards 1
    -- a property of (biased) linear CKA, not of this implementation.

    Args:
        x: ``(N, P)`` tensor, or ``(N, ...)`` (flattened to ``(N, -1)``).
        y: ``(N, P')`` tensor, or ``(N, ...)``; ``P'`` may differ from ``P``.
        centered: Centre the columns (the paper's CKA). ``False`` gives uncentred kernel alignment, what
            the official code computes.
        form: Force ``"gram"`` or ``"feature"``; ``"auto"`` (default) picks the cheaper.

    Returns:
        Scalar in ``[0, 1]`` (float32, or float64 for float64 inputs).
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"cka needs the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    dtype = _compute_dtype(x, y)
    x2 = x.reshape(x.shape[0], -1).to(dtype)
    y2 = y.reshape(y.shape[0], -1).to(dtype)
    return batched_cka(x2[None], y2[None], centered, form)[0]


def cka_loss(student: Tensor, teacher: Tensor, centered: bool = True) -> Tensor:
    r"""Feature CKA loss ``1 - CKA(f_s, f_t)`` on flattened features (Zhou et al., IJCAI 2024).

    .. math:: L = 1 - \mathrm{CKA}\big(\mathrm{flat}(f_s), \mathrm{flat}(f_t)\big)

    The paper writes the objective as ``CE - w * CKA`` and the official code returns ``-CKA``; ``1 - CKA``
    has the same gradients and is ``>= 0``, zero when the two representations agree up to an orthogonal
    transform and a scale. No adapter is needed: the widths may differ. The batch (``N = B``) must be
    larger than 1 for centred CKA to carry any signal (with ``B = 2`` centred CKA is identically 1).

    Args:
        student: ``(B, ...)`` student features (e.g. ``(B, C, H, W)``), flattened to ``(B, -1)``.
        teacher: ``(B, ...)`` teacher features, any per-sample shape.
        centered: Centre the features over the batch (the paper; default) or not (the official code).

    Returns:
        Scalar loss in ``[0, 1]``, in the student's dtype.
    """
    return (1.0 - cka(student, teacher, centered)).to(student.dtype)


@register_loss("cka", help="feature CKA: 1 - CKA(flat f_s, flat f_t) over the batch; any widths (IJCAI 2024)")
class CKALoss(DistillLoss):
    """Linear CKA between one student and one teacher tap; see :func:`cka_loss`.

    Any two per-sample shapes can be compared (CKA compares batch relations), so no bridge is needed.
    RCKA's feature part ``w_f * sum_stages CKA`` is one ``cka`` term per stage with weight ``w_f = 1``
    (see :class:`RCKALoss` for the full recipe)::

        distill:
          - {loss: cka, student: stage2, teacher: stage2, weight: 1.0}

    Args:
        centered: Centre the features over the batch (paper; default). ``false`` reproduces the
            official code's uncentred alignment.
    """

    default_student_tap = "stage2"
    default_teacher_tap = "stage2"

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """Feature maps of different shapes (CKA compares batch relations)."""
        return (4, 4, 4), (6, 3, 3)

    def __init__(self, *, centered: bool = True) -> None:
        super().__init__()
        self.centered = centered

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
        """Any shapes: CKA compares the two ``B x B`` sample-relation structures."""
        return None

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """``1 - CKA`` of ``(B, ...)`` features; labels are unused."""
        return cka_loss(student, teacher, self.centered)


def _row_normed_gram_cka(x: Tensor, y: Tensor) -> Tensor:
    """The official classification code's ``with_l2_norm=True`` CKA: each Gram row ``i`` divided by ``|x_i|``.

    ``K_ij / |x_i|`` (rows only, so ``K`` is no longer symmetric), then ``<K, L> / (|K| |L|)``.
    """
    gram_x, gram_y = x @ x.T, y @ y.T
    tiny = torch.finfo(gram_x.dtype).tiny
    gram_x = gram_x / gram_x.diagonal().clamp_min(tiny).sqrt()[:, None]
    gram_y = gram_y / gram_y.diagonal().clamp_min(tiny).sqrt()[:, None]
    den = torch.linalg.matrix_norm(gram_x) * torch.linalg.matrix_norm(gram_y)
    return (gram_x * gram_y).sum() / (den + _EPS)


def _relation_cka(x: Tensor, y: Tensor, centered: bool, gram_row_norm: bool) -> Tensor:
    if not gram_row_norm:
        return cka(x, y, centered)
    if centered:
        x, y = x - x.mean(dim=0, keepdim=True), y - y.mean(dim=0, keepdim=True)
    return _row_normed_gram_cka(_unit_frobenius(x[None])[0], _unit_frobenius(y[None])[0])


def rcka_loss(student_logits: Tensor, teacher_logits: Tensor, intra_weight: float = 15.0,
              inter_weight: float = 15.0, centered: bool = True, temperature: float | None = None,
              code_compat: bool = False, gram_row_norm: bool = False) -> Tensor:
    r"""Logit part of RCKA (Zhou et al., "Rethinking Centered Kernel Alignment in KD", IJCAI 2024).

    .. math::
        L = w_{intra}\,\big(1 - \mathrm{CKA}(z_s, z_t)\big) + w_{inter}\,\big(1 - \mathrm{CKA}(z_s^\top, z_t^\top)\big)

    ``z`` are ``(B, K)`` logits. *Intra* compares sample relations (the ``B x B`` Grams of the logit
    matrices as they are); *inter* compares class relations (CKA of the transposed ``K x B`` matrices, i.e.
    the ``K x K`` Grams). The paper's objective is ``CE - w_f sum_stages CKA(f_s, f_t) - w_intra
    CKA(z_s, z_t) - w_inter CKA(z_s^T, z_t^T)``; ``1 - CKA`` gives the same gradients with a loss ``>= 0``
    that is zero at identity. The first author's code uses ``w_intra = w_inter = 15`` (CE weight 1).

    Paper vs official code (``distiller/CKA.py``, class ``CenterKernelAlignmentRKD``):

    - ``code_compat=True`` reproduces two pitfalls of that code: (1) CKA is computed **without centring**
      (``centered`` is ignored and treated as ``False``); (2) the inter term is multiplied by
      ``intra_weight`` instead of ``inter_weight`` -- ``inter_weight`` only switches the term on (any
      non-zero value) or off (``0``), as the code's ``if self.inter_weight:``. With the defaults (both 15)
      only the missing centring changes the value.
    - ``temperature``: the code's ``soften=True`` option replaces the logits of the *intra* (``B x K``)
      term only by ``softmax(z / T)``; the inter term always sees raw logits. ``None`` (default; the
      code's default ``soften=False`` and the paper's formula) uses raw logits in both terms.
    - ``gram_row_norm``: the classification code's ``with_l2_norm=True`` (its default there; off in the
      detection code) divides row ``i`` of each Gram by ``|x_i|`` before the alignment. Off by default
      (the paper's CKA); turn it on together with ``code_compat`` for the closest match to that code.

    Args:
        student_logits: ``(B, K)`` student logits (higher dims flattened to ``(B, -1)``).
        teacher_logits: ``(B, K)`` teacher logits; the inter term needs the same ``K``.
        intra_weight: ``w_intra``, weight of the sample-relation term (15 in the official code).
        inter_weight: ``w_inter``, weight of the class-relation term (15); 0 disables it.
        centered: Centre before CKA (paper; default).
        temperature: ``None`` (default) or ``T > 0``: soften the intra term's logits by ``softmax(z/T)``.
        code_compat: Reproduce the official code's pitfalls (see above).
        gram_row_norm: Row-normalise the Grams as the classification code's ``with_l2_norm=True``.

    Returns:
        Scalar loss, in the student's dtype.
    """
    dtype = _compute_dtype(student_logits, teacher_logits)
    z_s = student_logits.reshape(student_logits.shape[0], -1).to(dtype)
    z_t = teacher_logits.reshape(teacher_logits.shape[0], -1).to(dtype)
    if code_compat:
        centered = False
        inter_coef = intra_weight if inter_weight else 0.0
    else:
        inter_coef = inter_weight
    total = z_s.new_zeros(())
    if intra_weight:
        a_s, a_t = z_s, z_t
        if temperature is not None:
            a_s, a_t = F.softmax(z_s / temperature, dim=1), F.softmax(z_t / temperature, dim=1)
        total = total + intra_weight * (1.0 - _relation_cka(a_s, a_t, centered, gram_row_norm))
    if inter_coef:
        if z_s.shape[1] != z_t.shape[1]:
            raise ValueError(f"the inter (class-relation) term needs the same number of classes, got "
                             f"{z_s.shape[1]} and {z_t.shape[1]}; set inter_weight: 0 to drop it")
        total = total + inter_coef * (1.0 - _relation_cka(z_s.T, z_t.T, centered, gram_row_norm))
    return total.to(student_logits.dtype)


@register_loss("rcka", help="RCKA logits: w_intra(1-CKA(z_s,z_t)) + w_inter(1-CKA(z_s^T,z_t^T)) (IJCAI 2024)")
class RCKALoss(DistillLoss):
    """RCKA's logit relations; see :func:`rcka_loss`. The feature part is one ``cka`` term per stage.

    Full RCKA for resnet32x4 -> resnet8x4 on CIFAR-100 (``L = CE + sum_stages (1 - CKA(f_s, f_t))
    + 15 (1 - CKA(z_s, z_t)) + 15 (1 - CKA(z_s^T, z_t^T))``; reported 76.11, features only 74.93, logits
    only 75.12)::

        distill:
          - {loss: cka, student: stage1, teacher: stage1, weight: 1.0}
          - {loss: cka, student: stage2, teacher: stage2, weight: 1.0}
          - {loss: cka, student: stage3, teacher: stage3, weight: 1.0}
          - {loss: rcka, weight: 1.0, intra_weight: 15, inter_weight: 15}
        train: {ce_weight: 1.0}

    The paper's ``w_intra``/``w_inter`` are parameters of this loss (keep the term's ``weight`` at 1).
    Closest match to the official classification code: ``{loss: rcka, code_compat: true, gram_row_norm:
    true}`` (and ``centered: false`` on the ``cka`` terms).

    Args:
        intra_weight: Weight of the sample-relation term ``1 - CKA(z_s, z_t)`` (default 15).
        inter_weight: Weight of the class-relation term ``1 - CKA(z_s^T, z_t^T)`` (default 15; 0 = off).
        centered: Centre before CKA (paper; default).
        temperature: ``None`` (default, raw logits) or ``T``: softmax(z/T) in the intra term (code's ``soften``).
        code_compat: No centring and the inter term weighted by ``intra_weight`` (the official code).
        gram_row_norm: Row-normalised Grams (the classification code's ``with_l2_norm=True``).
    """

    def __init__(self, *, intra_weight: Annotated[float, Ge(0)] = 15.0, inter_weight: Annotated[float, Ge(0)] = 15.0,
                 centered: bool = True, temperature: Annotated[float, Gt(0)] | None = None, code_compat: bool = False,
                 gram_row_norm: bool = False) -> None:
        super().__init__()
        if intra_weight == 0 and inter_weight == 0:
            raise ValueError("intra_weight and inter_weight are both 0: the loss would be identically zero")
        self.intra_weight = intra_weight
        self.inter_weight = inter_weight
        self.centered = centered
        self.temperature = temperature
        self.code_compat = code_compat
        self.gram_row_norm = gram_row_norm

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
        """Any shapes for the intra term; the inter term needs the same number of classes."""
        if self.inter_weight and _numel(student) != _numel(teacher):
            return (f"the inter (class-relation) term compares the {_numel(student)} student and {_numel(teacher)} "
                    f"teacher classes one to one; use taps with the same number of classes or inter_weight: 0")
        return None

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """RCKA logit loss of ``(B, K)`` logits; labels are unused."""
        return rcka_loss(student, teacher, self.intra_weight, self.inter_weight, self.centered, self.temperature,
                         self.code_compat, self.gram_row_norm)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
