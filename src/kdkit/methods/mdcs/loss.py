"""MDCS's objective on the experts' logits of ``[weak; strong]`` views: diversity loss + consistency
self-distillation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor

from kdkit.errors import KdkitError
from kdkit.losses.base import DistillLoss, compute_dtype, register_loss

Pairing = Literal["expert", "ensemble"]
#: The official code's ``lambda_k`` (``torch.pow(self.prior, -0.5 / 1 / 2.5)``): head-, medium- and few-shot-leaning.
OFFICIAL_LAMBDAS = (-0.5, 1.0, 2.5)


def shifted_logits(logits: Tensor, log_prior: Tensor, lambdas: Sequence[float]) -> Tensor:
    """``v_k + lambda_k log(pi)`` for each expert ``k``: ``(B, E, K)`` raw logits -> the same, shifted.

    Training the shifted logits with cross-entropy makes expert ``k``'s raw logits estimate
    ``log p(y|x) - lambda_k log pi_y`` up to a constant: ``lambda = 0`` is plain CE (the training distribution),
    1 balanced softmax (a uniform test prior), above 1 a tail-leaning expert and below 0 a head-leaning one.
    """
    shift = torch.as_tensor(lambdas, dtype=logits.dtype, device=logits.device).view(1, -1, 1)
    return logits + shift * log_prior.to(device=logits.device, dtype=logits.dtype).view(1, 1, -1)


def split_views(values: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The ``[weak; strong]`` halves of ``values`` and the labels of their images (checked to repeat)."""
    rows = values.shape[0]
    half = rows // 2
    if rows % 2 or rows == 0 or not torch.equal(labels[:half], labels[half:]):
        raise ValueError(f"mdcs needs [weak; strong] views of the same images (labels repeated), got {rows} rows; "
                         "set data.views: 2")
    return values[:half], values[half:], labels[:half]


def confident(weak_logits: Tensor, labels: Tensor) -> Tensor:
    """Confident Instance Sampling: ``(B,)`` mask of the images whose weak-view prediction is their label
    (the official code's ``argmax softmax(teacher) == target``; ties go to the lowest class, as ``torch.max``)."""
    return weak_logits.argmax(dim=-1) == labels


def masked_kl(teacher_logits: Tensor, student_logits: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """``T^2`` times the mean over the masked rows of ``KL(softmax(t/T) || softmax(s/T))`` (``t`` detached); 0 with
    no masked row (the code skips the term), with a zero gradient that keeps the graph connected."""
    log_t = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    per_row = (log_t.exp() * (log_t - log_s)).sum(-1)
    weight = mask.to(per_row.dtype)
    return (per_row * weight).sum() / weight.sum().clamp_min(1) * temperature**2


def diversity_loss(shifted: Tensor, labels: Tensor) -> Tensor:
    """``sum_k CE(v_k + lambda_k log pi, y)``, each a batch mean over every row (both views): ``(B, E, K)``."""
    return sum(F.cross_entropy(shifted[:, k], labels) for k in range(shifted.shape[1]))  # type: ignore[return-value]


def consistency_loss(shifted: Tensor, raw: Tensor, labels: Tensor, temperature: float = 1.0,
                     pairing: Pairing = "expert") -> Tensor:
    """Consistency self-distillation on confident instances, from the weak view to the strong view.

    * ``expert`` (the official code): per expert, ``KL(p_k(weak) || p_k(strong))`` of the *shifted* logits over
      the images that expert's weak view classifies right, summed over experts;
    * ``ensemble``: one ``KL(p(weak) || p(strong))`` of the experts' mean *raw* logits (the deployed prediction),
      over the images the deployed prediction of the weak view classifies right.

    Args:
        shifted: ``(2B, E, K)`` prior-shifted expert logits of ``[weak; strong]``.
        raw: ``(2B, E, K)`` raw expert logits (for ``ensemble``).
        labels: ``(2B,)`` labels, the halves equal.
        temperature: ``T`` (1 in the code), with the ``T^2`` factor.
        pairing: ``expert`` or ``ensemble`` (above).
    """
    if pairing == "ensemble":
        mean = raw.mean(dim=1)
        weak, strong, y = split_views(mean, labels)
        return masked_kl(weak, strong, confident(weak, y), temperature)
    weak, strong, y = split_views(shifted, labels)
    return sum(masked_kl(weak[:, k], strong[:, k], confident(weak[:, k], y), temperature)  # type: ignore[return-value]
               for k in range(shifted.shape[1]))


def mdcs_loss(experts: Tensor, labels: Tensor, log_prior: Tensor, lambdas: Sequence[float] = OFFICIAL_LAMBDAS,
              consistency_weight: float = 0.6, consistency_scale: float = 1.0, temperature: float = 1.0,
              pairing: Pairing = "expert") -> Tensor:
    r"""MDCS (Zhao et al., ICCV 2023): ``L = L_DL + alpha * r(epoch) * L_CS`` on ``[weak; strong]`` expert logits.

    .. math::
        L_{DL} = \sum_k \mathrm{CE}(v_k + \lambda_k \log\pi, y), \qquad
        L_{CS} = \sum_k \frac{T^2}{|M_k|}\sum_{i \in M_k} \mathrm{KL}(p_k(x^w_i) \| p_k(x^s_i)),\quad
        M_k = \{i : \arg\max p_k(x^w_i) = y_i\}

    (``p_k`` the softmax of expert ``k``'s shifted logits at ``T``; the weak view is the target, detached).

    Args:
        experts: ``(2B, E, K)`` raw expert logits, rows ``[:B]`` the weak and ``[B:]`` the strong view.
        labels: ``(2B,)`` class indices (the halves equal).
        log_prior: ``(K,)`` log class prior ``log pi`` of the training labels.
        lambdas: ``lambda_k``, one per expert.
        consistency_weight: ``alpha`` (0.6 in the code).
        consistency_scale: ``r(epoch)``, the warm-up ramp in effect (set by the method each batch).
        temperature: ``T`` of the KL.
        pairing: see :func:`consistency_loss`.

    Returns:
        Scalar, in the computing precision (float64 for float64 inputs, else float32).
    """
    raw = experts.to(compute_dtype(experts))
    if raw.shape[1] != len(lambdas):
        raise ValueError(f"mdcs has {len(lambdas)} lambdas for {raw.shape[1]} experts")
    shifted = shifted_logits(raw, log_prior, lambdas)
    total = diversity_loss(shifted, labels)
    if consistency_weight and consistency_scale:
        total = total + consistency_weight * consistency_scale * consistency_loss(shifted, raw, labels, temperature,
                                                                                  pairing)
    return total


@register_loss("mdcs", help="MDCS (Zhao et al., ICCV 2023): prior-shifted experts (diversity loss) and weak-to-strong "
                            "self-distillation on confident instances; reads the mdcs_experts bridge, data.views: 2")
class MdcsLoss(DistillLoss):
    """MDCS's loss on the ``mdcs_experts`` bridge's ``(2B, E, K)`` logits; see :func:`mdcs_loss`.

    The class prior ``pi`` is the training labels' (the setting's, after ``data.subset``), installed by the method
    before the first step (:meth:`set_prior`); until then it is uniform (no shift).

    Recipe (``train.ce_weight: 0``: the experts' cross-entropies are the diversity loss; ``data.views: 2``)::

        distill:
          - {loss: mdcs, student: penultimate, bridge: mdcs_experts, lambdas: [-0.5, 1.0, 2.5],
             consistency_weight: 0.6, warmup: 20, bridge_params: {experts: 3}}

    Args:
        lambdas: ``lambda_k`` per expert (the code's ``-0.5, 1, 2.5``); their number must be the bridge's experts.
        consistency_weight: ``alpha``, the weight of the consistency self-distillation (0.6, the code's).
        warmup: Epochs over which the consistency weight ramps linearly from 0 (the code's ``min(epoch / 20, 1)``;
            only that part ramps, so it is the loss's parameter, not the term's ``warmup_epochs``). 0: no ramp.
        temperature: ``T`` of the KL (1, the code's).
        pairing: ``expert`` (the code's, default) or ``ensemble`` (the weak view's deployed prediction distils the
            strong view's).
    """

    default_student_tap = "penultimate"
    needs_teacher = False
    requires_bridge = "mdcs_experts"
    uses_labels = True

    def __init__(self, *, lambdas: tuple[float, ...] = OFFICIAL_LAMBDAS,
                 consistency_weight: Annotated[float, Ge(0)] = 0.6, warmup: Annotated[float, Ge(0)] = 20.0,
                 temperature: Annotated[float, Gt(0)] = 1.0, pairing: Pairing = "expert") -> None:
        super().__init__()
        self.lambdas = tuple(float(v) for v in lambdas)
        self.consistency_weight, self.warmup = consistency_weight, warmup
        self.temperature, self.pairing = temperature, pairing
        self.consistency_scale = 1.0
        self.register_buffer("log_prior", torch.zeros(0), persistent=False)

    def set_prior(self, counts: Tensor) -> None:
        """Install ``log pi`` from ``(K,)`` training images per class (every class needs one)."""
        if (counts <= 0).any():
            empty = int((counts <= 0).nonzero()[0])
            raise KdkitError(f"class {empty} has no training image, so MDCS's prior shift lambda * log(pi) is "
                             "infinite for it", bad=str(empty), where="data",
                             fix="train on data where every class has an image (a larger data.subset or a smaller "
                                 "data.setting.imbalance)")
        self.log_prior = (counts.double() / counts.sum()).log()

    def ramp(self, epoch: float) -> None:
        """Set the consistency warm-up at (fractional) ``epoch``: ``min(epoch / warmup, 1)``."""
        self.consistency_scale = 1.0 if self.warmup <= 0 else min(epoch / self.warmup, 1.0)

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        return (3, 10), (10,)

    @classmethod
    def example_inputs(cls, batch: int, generator: torch.Generator | None = None) -> tuple[Any, Any, Tensor, Tensor]:
        """Expert logits of ``[weak; strong]`` halves (labels repeated); an odd batch drops its last row."""
        half = max(batch // 2, 1)
        labels = torch.randint(0, 10, (half,), generator=generator).repeat(2)
        return torch.randn(2 * half, 3, 10, generator=generator), None, labels, torch.arange(half).repeat(2)

    def check_shapes(self, student: Any, teacher: Any) -> str | KdkitError | None:
        """The bridge's ``(E, K)`` with one lambda per expert."""
        shape = tuple(student)
        if len(shape) != 2:
            return f"needs the mdcs_experts output (E, K), got {shape}"
        if shape[0] != len(self.lambdas):
            return KdkitError(f"mdcs has {len(self.lambdas)} lambdas {list(self.lambdas)} for {shape[0]} experts",
                              bad=str(len(self.lambdas)), choices=[str(shape[0])],
                              fix=f"give one lambda per expert (lambdas: [...] of length {shape[0]}), or set "
                                  f"bridge_params.experts: {len(self.lambdas)}")
        return None

    def forward(self, student: Tensor, teacher: Any, labels: Tensor) -> Tensor:
        """The MDCS loss of the experts' ``(2B, E, K)`` logits."""
        log_prior = self.log_prior if self.log_prior.numel() else student.new_zeros(student.shape[-1])
        return mdcs_loss(student, labels, log_prior, self.lambdas, self.consistency_weight, self.consistency_scale,
                         self.temperature, self.pairing)
