"""Multi-Level Logit Distillation (MLKD): instance, class-relation and batch-relation alignment at several
temperatures, on a weak and a strong view of each image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from annotated_types import Gt, Interval, MinLen
from torch import Tensor

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss, widen
from kdkit.losses.standardize import standardize_logits

Variant = Literal["official", "paper"]
#: A non-empty list of temperatures, each > 0.
Temperatures = Annotated[tuple[Annotated[float, Gt(0)], ...], MinLen(1)]

DEFAULT_TEMPERATURES: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0, 6.0)
#: Temperatures at which the official code's strong-view instance term reads the weak-view logits.
OFFICIAL_SLIP_TEMPERATURES: tuple[float, ...] = (2.0, 6.0)


def mlkd_instance_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    r"""Instance-level alignment at one temperature: :math:`T^2 \frac1B\sum_i \mathrm{KL}(p_t^i \,\|\, p_s^i)`.

    Args:
        student_logits: ``(B, K)`` student logits (float32).
        teacher_logits: ``(B, K)`` teacher logits.
        temperature: ``T``.

    Returns:
        Scalar (float32), computed from log-softmaxes on both sides (no ``log 0``).
    """
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def _relation_gap(student_logits: Tensor, teacher_logits: Tensor, temperature: float, over: str) -> Tensor:
    """``||Q_t Q_tᵀ - Q_s Q_sᵀ||_F^2 / n`` with ``Q = P`` (``over="samples"``, n = B) or ``Q = Pᵀ``
    (``over="classes"``, n = K), ``P = softmax(z / T)`` over classes."""
    p_s = F.softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    if over == "classes":
        p_s, p_t = p_s.T, p_t.T
    diff = p_t @ p_t.T - p_s @ p_s.T
    return diff.pow(2).sum() / p_s.shape[0]


def mlkd_class_relation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    r"""Class-level alignment at one temperature: :math:`\|P_t^\top P_t - P_s^\top P_s\|_F^2 / K`.

    ``P = softmax(z / T)`` is ``(B, K)``, so the compared matrices are ``(K, K)`` class correlations.

    Args:
        student_logits: ``(B, K)`` student logits (float32).
        teacher_logits: ``(B, K)`` teacher logits.
        temperature: ``T``.

    Returns:
        Scalar (float32).
    """
    return _relation_gap(student_logits, teacher_logits, temperature, "classes")


def mlkd_batch_relation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    r"""Batch-level alignment at one temperature: :math:`\|P_t P_t^\top - P_s P_s^\top\|_F^2 / B`.

    ``P = softmax(z / T)`` is ``(B, K)``, so the compared matrices are ``(B, B)`` sample correlations.

    Args:
        student_logits: ``(B, K)`` student logits (float32).
        teacher_logits: ``(B, K)`` teacher logits.
        temperature: ``T``.

    Returns:
        Scalar (float32).
    """
    return _relation_gap(student_logits, teacher_logits, temperature, "samples")


@torch.no_grad()
def mlkd_confidence_fractions(teacher_logits: Tensor, quantile: float = 0.5) -> tuple[Tensor, Tensor]:
    r"""The official code's confidence masks, reduced to what they do: the fraction of samples and of classes kept.

    With :math:`P = \mathrm{softmax}(z_t)` (``T = 1``, raw logits) of the weak view, the sample confidence is
    :math:`c_i = \max_k P_{ik}` and the class confidence :math:`s_k = \sum_i P_{ik}`. The sample mask keeps
    :math:`c_i \le Q_q(c)` and the class mask :math:`s_k \le Q_q(s)` (``np.percentile``-style linear
    interpolation, i.e. ``torch.quantile``; note ``<=``: the *less* confident half is kept). The official code
    multiplies an already batch-averaged scalar loss by the mask and averages, so each masked term is scaled by
    the kept fraction -- ``1/2`` for ``q = 0.5`` with distinct confidences and an even count, ``1`` when all
    confidences tie (e.g. a saturated teacher).

    Args:
        teacher_logits: ``(B, K)`` weak-view teacher logits.
        quantile: ``q`` (the official 50th percentile is 0.5).

    Returns:
        ``(f_sample, f_class)``: scalar float32 tensors in ``(0, 1]``, without gradient.
    """
    p_t = F.softmax(widen(teacher_logits), dim=1)
    conf = p_t.max(dim=1).values
    class_conf = p_t.sum(dim=0)
    f_sample = (conf <= torch.quantile(conf, quantile)).to(p_t.dtype).mean()
    f_class = (class_conf <= torch.quantile(class_conf, quantile)).to(p_t.dtype).mean()
    return f_sample, f_class


def _slipped(temperatures: Sequence[float], slip: Sequence[float]) -> list[bool]:
    """Which strong-view instance terms read the weak view: each slip temperature claims one occurrence in
    ``temperatures``, searching from the end (the official code's slip sits in its last two terms)."""
    remaining = list(slip)
    out = [False] * len(temperatures)
    for i in range(len(temperatures) - 1, -1, -1):
        if temperatures[i] in remaining:
            remaining.remove(temperatures[i])
            out[i] = True
    return out


def mlkd_loss(student_logits: Tensor, teacher_logits: Tensor,
              temperatures: Sequence[float] = DEFAULT_TEMPERATURES, views: int = 2, standardize: bool = False,
              standardize_relations: bool = False, confidence_quantile: float = 0.5, variant: Variant = "official",
              slip_temperatures: Sequence[float] = OFFICIAL_SLIP_TEMPERATURES) -> Tensor:
    r"""Jin, Wang, Lin, "Multi-Level Logit Distillation", CVPR 2023.

    Official code: Jin-Ying/Multi-Level-Logit-Distillation, ``mdistiller/distillers/KD_ours.py``; with logit
    standardisation: sunshangquan/logit-standardization-KD, ``mdistiller/distillers/MLKD.py``.

    Per temperature :math:`T` (:math:`P = \mathrm{softmax}(z/T)`, ``B`` rows of one view, ``K`` classes):

    .. math::
        I_T = \frac{T^2}{B}\sum_i \mathrm{KL}(p_t^i \,\|\, p_s^i), \quad
        C_T = \frac{\|P_t^\top P_t - P_s^\top P_s\|_F^2}{K}, \quad
        R_T = \frac{\|P_t P_t^\top - P_s P_s^\top\|_F^2}{B}.

    ``variant="official"`` (default) is exactly what the official ``forward_train`` adds to the loss
    (``loss_kd + loss_cc + loss_bc`` divided by its ``KD_WEIGHT``), with ``w`` / ``s`` the weak / strong view:

    .. math::
        L = \sum_T \big[ f_b\, I_T(w) + I_T(v_T) + f_c\, C_T(w) + f_b\, R_T(w) \big]

    - ``f_b``, ``f_c``: the confidence masks (:func:`mlkd_confidence_fractions`, teacher weak view, ``T = 1``,
      ``confidence_quantile`` = the 50th percentile). The code multiplies batch-averaged scalars by the masks
      (its ``reduce=False`` is commented out), so no sample is selected: the weak-view terms are scaled by the
      kept fraction (``~0.5``) and the masks carry no gradient.
    - ``v_T``: the strong view, except at the temperatures of ``slip_temperatures`` (official: 2 and 6), where
      the code's strong-view instance term reads the *weak* logits (a copy-paste slip); ``slip_temperatures=()``
      removes it. Each slip temperature claims one occurrence, from the end of ``temperatures``.
    - The class- and batch-relation terms of the strong view are computed by the code but never added to the
      loss; here they are omitted. The strong-view instance term is not masked.
    - Temperatures: the code's list is ``[cfg.KD.TEMPERATURE, 3, 5, 2, 6]`` = {2, 3, 4, 5, 6} with its default 4.

    ``variant="paper"`` is the method as the multi-level objective reads (instance + class + batch alignment, summed
    with equal weights over the temperatures), applied to every view with no mask and no slip:

    .. math:: L = \sum_{v \in \{w, s\}} \sum_T \big[ I_T(v) + C_T(v) + R_T(v) \big]

    (``confidence_quantile`` and ``slip_temperatures`` are then unused). This reading follows the paper's abstract
    and kdkit's methods.md summary (T² on the instance term included); the paper's full text was not at hand when
    this was written, so check its equations before relying on this variant. The official variant is the default
    because it is what produced the published numbers.

    ``views=2``: rows ``[:B]`` are the weak view and ``[B:]`` the strong view of the same ``B`` images (kdkit's
    ``data: {views: 2}``). ``views=1``: a single view, used as both ``w`` and ``s`` (official: the instance term is
    counted ``1 + f_b`` times; paper: each term once).

    Logit standardisation (Sun et al., CVPR 2024): ``standardize=True`` z-scores both logits for the instance term
    only, as the official MLKD+LS code does (its relation terms and masks use the raw logits);
    ``standardize_relations=True`` also standardises the relation terms' inputs (the masks always use the raw
    teacher logits). The official MLKD+LS run replaces ``cfg.KD.TEMPERATURE`` (4) by the base temperature 2, i.e.
    ``temperatures=(2, 3, 5, 2, 6)``, with ``KD_WEIGHT = 9``.

    Args:
        student_logits: ``(views·B, K)`` student logits.
        teacher_logits: ``(views·B, K)`` teacher logits.
        temperatures: The temperatures ``T`` (default 2, 3, 4, 5, 6).
        views: 2 (``[weak; strong]`` halves) or 1.
        standardize: Z-score the instance term's logits.
        standardize_relations: Also z-score the relation terms' logits (needs ``standardize``).
        confidence_quantile: Quantile ``q`` of the confidence masks (official 0.5).
        variant: ``"official"`` (default) or ``"paper"``.
        slip_temperatures: Official variant: temperatures whose strong-view instance term uses the weak view.

    Returns:
        Scalar loss in the student's dtype (unweighted: the official code multiplies it by ``KD_WEIGHT = 0.9``).

    Raises:
        ValueError: Mismatched or non-2-d logits, ``views`` not 1 or 2, or a row count not divisible by ``views``.
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"mlkd needs (N, K) student and teacher logits of one shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if views not in (1, 2):
        raise ValueError(f"views must be 1 or 2, got {views}")
    rows = student_logits.shape[0]
    if rows == 0 or rows % views:
        raise ValueError(f"mlkd with views={views} needs a non-empty batch of [weak; strong] halves, got {rows} rows "
                         "(odd: is data.views set to 2?)")
    dtype = compute_dtype(student_logits, teacher_logits)
    z_s, z_t = student_logits.to(dtype), teacher_logits.to(dtype)
    s_w, s_s = z_s.chunk(2) if views == 2 else (z_s, z_s)
    t_w, t_s = z_t.chunk(2) if views == 2 else (z_t, z_t)

    def prep(z: Tensor, on: bool) -> Tensor:
        return standardize_logits(z) if on else z

    rel = standardize and standardize_relations
    inst = {"w": (prep(s_w, standardize), prep(t_w, standardize)),
            "s": (prep(s_s, standardize), prep(t_s, standardize))}
    relation = {"w": (prep(s_w, rel), prep(t_w, rel)), "s": (prep(s_s, rel), prep(t_s, rel))}

    total = z_s.new_zeros(())
    if variant == "paper":
        for v in (("w", "s") if views == 2 else ("w",)):
            for temp in temperatures:
                total = total + mlkd_instance_loss(*inst[v], temp)
                total = total + mlkd_class_relation_loss(*relation[v], temp)
                total = total + mlkd_batch_relation_loss(*relation[v], temp)
    elif variant == "official":
        f_b, f_c = mlkd_confidence_fractions(t_w, confidence_quantile)
        for temp, slip in zip(temperatures, _slipped(temperatures, slip_temperatures), strict=True):
            total = total + f_b * mlkd_instance_loss(*inst["w"], temp)
            total = total + mlkd_instance_loss(*inst["w" if slip else "s"], temp)
            total = total + f_c * mlkd_class_relation_loss(*relation["w"], temp)
            total = total + f_b * mlkd_batch_relation_loss(*relation["w"], temp)
    else:
        raise ValueError(f"variant must be 'official' or 'paper', got {variant!r}")
    return total.to(student_logits.dtype)


@register_loss("mlkd", help="Multi-level logit KD: instance + class/batch relations at T=2..6, two views (CVPR 2023)")
class MLKDLoss(DistillLoss):
    """Multi-Level Logit Distillation on ``[weak; strong]`` logits; see :func:`mlkd_loss`.

    Recipe (CIFAR-100, as methods.md states it: CE 0.1 on both views, lr 0.025, batch 64, multistep)::

        data: {dataset: cifar100, views: 2}          # [weak; strong(RandAugment(2, 10))] of each image
        distill:
          - {loss: mlkd, weight: 1.0}
        train: {ce_weight: 0.1, batch_size: 64, optimizer: {lr: 0.025},
                schedule: {name: multistep, milestones: [150, 180, 210]}}

    The official code weights differently: CE is ``0.1 · (CE(weak) + CE(strong))`` -- two batch means, while
    kdkit's CE is one mean over the ``2B`` rows -- and the distillation sum is multiplied by ``KD_WEIGHT = 0.9``
    (mdistiller's defaults; the MLKD configs set neither). To reproduce the official run exactly::

        distill:
          - {loss: mlkd, weight: 0.9}
        train: {ce_weight: 0.2, ...}

    With logit standardisation (official MLKD+LS: base temperature 2 replaces 4, KD weight 9)::

        distill:
          - {loss: mlkd, weight: 9, standardize: true, temperatures: [2, 3, 5, 2, 6]}

    Here ``batch_size`` counts images: each step sees ``2 · batch_size`` rows.

    Args:
        temperatures: Temperatures (default 2, 3, 4, 5, 6).
        views: 2 (rows ``[:B]`` weak, ``[B:]`` strong; needs ``data.views: 2``) or 1 (the batch serves as both
            views).
        standardize: Z-score the logits of the instance term (official MLKD+LS).
        standardize_relations: Also z-score the logits of the class/batch relation terms.
        confidence_quantile: Quantile of the teacher-confidence masks (official 0.5).
        variant: ``official`` (default; the official code's exact composition) or ``paper``.
        slip_temperatures: Official variant: temperatures at which the strong-view instance term reads the weak
            view, as in the official code (default 2, 6; ``[]`` removes the slip).
    """
    reads_logits = frozenset({"classes"})

    def __init__(self, *, temperatures: Temperatures = DEFAULT_TEMPERATURES, views: Literal[1, 2] = 2,
                 standardize: bool = False, standardize_relations: bool = False,
                 confidence_quantile: Annotated[float, Interval(ge=0, le=1)] = 0.5, variant: Variant = "official",
                 slip_temperatures: tuple[float, ...] = OFFICIAL_SLIP_TEMPERATURES) -> None:
        super().__init__()
        temperatures = tuple(float(t) for t in temperatures)
        if standardize_relations and not standardize:
            raise ValueError("standardize_relations needs standardize: true")
        self.temperatures = temperatures
        self.views = views
        self.standardize = standardize
        self.standardize_relations = standardize_relations
        self.confidence_quantile = confidence_quantile
        self.variant: Variant = variant
        self.slip_temperatures = tuple(float(t) for t in slip_temperatures)

    @classmethod
    def example_inputs(cls, batch: int, generator: torch.Generator | None = None) -> tuple[Any, Any, Tensor, Tensor]:
        """Logits of ``[weak; strong]`` views (the default ``views=2``): the labels of the two halves repeat."""
        student, teacher, labels, index = super().example_inputs(batch, generator)
        half = labels[: (batch + 1) // 2]
        return student, teacher, torch.cat([half, half])[:batch], index

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """MLKD loss of ``(views·B, K)`` logits; with ``views=2`` the two halves' labels must agree."""
        if self.views == 2:
            flat = labels.reshape(-1)
            half = flat.numel() // 2
            if flat.numel() == student.shape[0] and flat.numel() % 2 == 0 and not torch.equal(flat[:half],
                                                                                               flat[half:]):
                raise ValueError("mlkd with views=2 needs [weak; strong] views of the same images (labels repeated); "
                                 "set data.views: 2, or views: 1 on the loss")
        return mlkd_loss(student, teacher, self.temperatures, self.views, self.standardize,
                         self.standardize_relations, self.confidence_quantile, self.variant, self.slip_temperatures)
