"""Distances of the distiller grammar: how a ``composed`` term compares the transformed student and teacher.

Each distance is a small function ``fn(student, teacher, **params) -> scalar`` on the two sides'
:class:`~kdkit.losses.transforms.Value` s, registered with a shape rule (most need equal per-sample shapes; CKA
compares batch relations of any widths), whether it needs probability distributions (the divergences: the chain
must end with ``softmax_t``), and a symbol for formulas. The operations follow Auto-KD (Li et al., ICCV 2023) and
KD-Zero (Li et al., NeurIPS 2023): KL, reverse KL, symmetric JS, MSE, L1, smooth-L1, cosine, Pearson, CKA.

Reductions: the divergences sum over dim 1 (and any further dims) and average over the batch (``batchmean``, as
KD); the regressions average over every element (as FitNets, AT, PKD); cosine and Pearson average ``1 - r`` over
the samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Gt
from torch import Tensor

from kdkit.losses.cka import cka_loss
from kdkit.losses.dist import mean_row_pearson
from kdkit.losses.kd import mse_loss
from kdkit.losses.transforms import Shape, Value
from kdkit.registry import Registry


@dataclass(frozen=True)
class Distance:
    """A registered distance.

    Attributes:
        name: The registered name.
        fn: ``fn(student, teacher, **params) -> Tensor`` on :class:`Value` s; its keyword-only parameters are the
            recipe's ``distance_params``.
        symbol: ``symbol(s, t, **params)``: the distance of the expressions ``s`` and ``t``, for formulas.
        any_shapes: Any two per-sample shapes can be compared (else they must be equal).
        needs_distribution: The inputs must be distributions made by ``softmax_t`` (the chain's last transform).
    """

    name: str
    fn: Callable[..., Tensor]
    symbol: Callable[..., str]
    any_shapes: bool = False
    needs_distribution: bool = False

    def problem(self, student: Shape, teacher: Shape, distribution: bool) -> str | None:
        """Why this distance cannot compare the chain's outputs of these per-sample shapes, or ``None``."""
        if self.needs_distribution and not distribution:
            return f"distance {self.name!r} compares probability distributions: end the transforms with softmax_t"
        if not self.any_shapes and tuple(student) != tuple(teacher):
            return (f"distance {self.name!r} needs equal shapes after the transforms, got student {tuple(student)} "
                    f"and teacher {tuple(teacher)}")
        return None


DISTANCES: Registry[Distance] = Registry("distance", fix="see docs/distiller-grammar.md for the distances")


def register_distance(name: str, *, symbol: Callable[..., str], any_shapes: bool = False,
                      needs_distribution: bool = False) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register ``fn`` as distance ``name`` (see :class:`Distance` for the arguments)."""

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        DISTANCES.add(name, Distance(name, fn, symbol, any_shapes, needs_distribution))
        return fn

    return deco


def _log_prob(v: Value, name: str) -> Tensor:
    if v.log_prob is None:  # the shape check refuses such chains first; this guards direct calls
        raise ValueError(f"distance {name!r} needs distributions made by softmax_t")
    return v.log_prob


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    r""":math:`\frac{1}{B}\sum_b \mathrm{KL}(p_b \| q_b)` from log-probabilities (``batchmean``)."""
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


@register_distance("kl", needs_distribution=True, symbol=lambda s, t: f"KL({t} ‖ {s})")
def kl(student: Value, teacher: Value) -> Tensor:
    r"""Forward KL, :math:`\frac{1}{B}\sum_b \mathrm{KL}(p_t^b \| p_s^b)`, the teacher as the target (Hinton's KD).

    Args:
        student: The student's distribution (``softmax_t`` output).
        teacher: The teacher's distribution.
    """
    return _kl(_log_prob(teacher, "kl"), _log_prob(student, "kl"))


@register_distance("reverse_kl", needs_distribution=True, symbol=lambda s, t: f"KL({s} ‖ {t})")
def reverse_kl(student: Value, teacher: Value) -> Tensor:
    r"""Reverse KL, :math:`\frac{1}{B}\sum_b \mathrm{KL}(p_s^b \| p_t^b)` (mode-seeking; KD-Zero's space, MiniLLM).

    Args:
        student: The student's distribution (``softmax_t`` output).
        teacher: The teacher's distribution.
    """
    return _kl(_log_prob(student, "reverse_kl"), _log_prob(teacher, "reverse_kl"))


@register_distance("js", needs_distribution=True, symbol=lambda s, t: f"JS({s}, {t})")
def js(student: Value, teacher: Value) -> Tensor:
    r"""Jensen-Shannon divergence, :math:`\tfrac12 \mathrm{KL}(p_s \| m) + \tfrac12 \mathrm{KL}(p_t \| m)` with
    :math:`m = (p_s + p_t)/2`, batch mean; symmetric and bounded by :math:`\log 2`.

    Args:
        student: The student's distribution (``softmax_t`` output).
        teacher: The teacher's distribution.
    """
    log_s, log_t = _log_prob(student, "js"), _log_prob(teacher, "js")
    log_m = torch.logaddexp(log_s, log_t) - math.log(2.0)
    return 0.5 * (_kl(log_s, log_m) + _kl(log_t, log_m))


@register_distance("mse", symbol=lambda s, t: f"MSE({s}, {t})")
def mse(student: Value, teacher: Value) -> Tensor:
    r"""Mean squared error over every element, :math:`\frac1N \sum_i (s_i - t_i)^2` (FitNets, AT, PKD);
    :func:`~kdkit.losses.kd.mse_loss`.

    Args:
        student: Student values.
        teacher: Teacher values, same shape.
    """
    return mse_loss(student.x, teacher.x)


@register_distance("l1", symbol=lambda s, t: f"L1({s}, {t})")
def l1(student: Value, teacher: Value) -> Tensor:
    r"""Mean absolute error over every element, :math:`\frac1N \sum_i |s_i - t_i|`.

    Args:
        student: Student values.
        teacher: Teacher values, same shape.
    """
    return F.l1_loss(student.x, teacher.x)


@register_distance("smooth_l1", symbol=lambda s, t, beta=1.0: f"SmoothL1_{beta:g}({s}, {t})")
def smooth_l1(student: Value, teacher: Value, *, beta: Annotated[float, Gt(0)] = 1.0) -> Tensor:
    r"""Smooth-L1 (Huber) loss averaged over every element: :math:`\tfrac{0.5 d^2}{\beta}` for :math:`|d| < \beta`,
    :math:`|d| - 0.5\beta` beyond (RKD's distance).

    Args:
        student: Student values.
        teacher: Teacher values, same shape.
        beta: Where the quadratic part ends (1, as RKD).
    """
    return F.smooth_l1_loss(student.x, teacher.x, beta=beta)


@register_distance("cosine", symbol=lambda s, t: f"(1 - cos({s}, {t}))")
def cosine(student: Value, teacher: Value) -> Tensor:
    r"""Cosine distance of each sample's flattened values, :math:`\frac1B \sum_b (1 - \cos(s_b, t_b))`, in [0, 2].

    Args:
        student: Student values.
        teacher: Teacher values, same shape.
    """
    return (1 - F.cosine_similarity(student.x.flatten(1), teacher.x.flatten(1), dim=1)).mean()


@register_distance("pearson", symbol=lambda s, t: f"(1 - ρ({s}, {t}))")
def pearson(student: Value, teacher: Value, *, eps: Annotated[float, Gt(0)] = 1e-8) -> Tensor:
    r"""Pearson distance of each sample's flattened values, :math:`\frac1B \sum_b (1 - \rho(s_b, t_b))`, in [0, 2]
    (DIST's inter-class relation, Huang et al., NeurIPS 2022); :func:`~kdkit.losses.dist.mean_row_pearson`.

    Args:
        student: Student values.
        teacher: Teacher values, same shape.
        eps: Added to the product of norms (DIST's official code: 1e-8).
    """
    return 1 - mean_row_pearson(student.x.flatten(1), teacher.x.flatten(1), eps)


@register_distance("cka", any_shapes=True, symbol=lambda s, t: f"(1 - CKA({s}, {t}))")
def cka(student: Value, teacher: Value) -> Tensor:
    r"""Linear CKA distance over the batch, :math:`1 - \mathrm{CKA}(\mathrm{flat}(s), \mathrm{flat}(t))` (Kornblith
    et al., 2019; RCKA, Zhou et al., IJCAI 2024); :func:`~kdkit.losses.cka.cka_loss`. Any widths; needs a batch of at
    least 3 to carry signal. Zero at identity up to its ``1e-12`` denominator guard.

    Args:
        student: Student values ``(B, ...)``.
        teacher: Teacher values ``(B, ...)``, any per-sample shape.
    """
    return cka_loss(student.x, teacher.x)
