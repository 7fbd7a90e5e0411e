r"""Noise schedules of the flow that carries a student representation to the teacher's.

FM-KT (Shao et al., "Precise Knowledge Transfer via Flow Matching", arXiv 2402.02012) writes the path
between the teacher's representation :math:`Z_0` (``t = 0``) and the student's :math:`Z_1` (``t = 1``) as a
stochastic interpolant

.. math:: Z_t = \alpha_t Z_0 + \beta_t Z_1, \qquad v_t = \dot Z_t = \alpha'_t Z_0 + \beta'_t Z_1 .

Given the current point :math:`Z_t` and a predicted velocity :math:`v`, eliminating :math:`Z_1` gives the
clean-target estimate used by every schedule (:meth:`Schedule.estimate`):

.. math:: \hat Z_0 = \frac{\beta'_t Z_t - \beta_t v}{\alpha_t \beta'_t - \alpha'_t \beta_t} .

A schedule is therefore just the pair of functions :math:`\alpha(t), \beta(t)` and their derivatives.
Rectified flow (``alpha = 1 - t``, ``beta = t``; the released code's only schedule) has denominator 1 and
gives :math:`\hat Z_0 = Z_t - t v`, which at the first step (``t = 1``, ``Z_1 = f_s``) is ``f_s - v``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from kdkit.errors import KdkitError

Scalar = Callable[[float], float]


@dataclass(frozen=True)
class Schedule:
    """``Z_t = alpha(t) Z_0 + beta(t) Z_1`` with derivatives; ``t`` is a Python float in ``[0, 1]``.

    Times are the same for the whole batch, so the coefficients are Python floats (no tensors, no host
    syncs).

    Attributes:
        name: Short name (``rectified``, ``vp``, ``ve``).
        alpha: ``t -> alpha_t`` (weight of the teacher end, ``alpha(0) = 1``).
        beta: ``t -> beta_t`` (weight of the student end, ``beta(0) = 0``).
        d_alpha: ``t -> d alpha / dt``.
        d_beta: ``t -> d beta / dt``.
    """

    name: str
    alpha: Scalar
    beta: Scalar
    d_alpha: Scalar
    d_beta: Scalar

    def coefficients(self, t: float) -> tuple[float, float]:
        r"""``(a, b)`` with :math:`\hat Z_0 = a Z_t - b v` (see the module docstring)."""
        denom = self.alpha(t) * self.d_beta(t) - self.d_alpha(t) * self.beta(t)
        if denom == 0.0:  # a schedule whose path stalls cannot be inverted; never true for the built-ins
            raise ValueError(f"schedule {self.name!r}: alpha*beta' - alpha'*beta is 0 at t={t}")
        return self.d_beta(t) / denom, self.beta(t) / denom

    def estimate(self, z_t: Tensor, velocity: Tensor, t: float) -> Tensor:
        r""":math:`\hat Z_0 = (\beta'_t Z_t - \beta_t v) / (\alpha_t \beta'_t - \alpha'_t \beta_t)`.

        Args:
            z_t: ``(B, ...)`` the point of the chain at time ``t``.
            velocity: ``(B, ...)`` the meta-encoder's velocity at ``(Z_t, t)``.
            t: Time in ``(0, 1]``.
        """
        a, b = self.coefficients(t)
        if a == 1.0:
            return z_t - b * velocity
        return a * z_t - b * velocity


def rectified() -> Schedule:
    """Rectified flow (straight paths): ``alpha = 1 - t``, ``beta = t``."""
    return Schedule("rectified", lambda t: 1.0 - t, lambda t: t, lambda t: -1.0, lambda t: 1.0)


def vp() -> Schedule:
    r"""Variance preserving (trigonometric interpolant): ``alpha = cos(pi t / 2)``, ``beta = sin(pi t / 2)``.

    :math:`\alpha^2 + \beta^2 = 1` for every ``t`` (the VP-ODE's defining property) and both ends are exact
    (``alpha(1) = 0``), unlike the DDPM-style VP whose ``alpha(1) = exp(-5.025)`` only approximates 0.
    """
    h = math.pi / 2
    return Schedule("vp", lambda t: math.cos(h * t), lambda t: math.sin(h * t),
                    lambda t: -h * math.sin(h * t), lambda t: h * math.cos(h * t))


def ve(sigma_min: float = 0.01, sigma_max: float = 1.0) -> Schedule:
    r"""Variance exploding: ``alpha = 1``, ``beta`` grows geometrically from 0 to ``sigma_max``.

    .. math:: \beta_t = \sigma_{max} \frac{\rho^t - 1}{\rho - 1}, \quad \rho = \sigma_{max} / \sigma_{min}

    The SMLD geometric noise levels :math:`\sigma_{min}\rho^t`, shifted and rescaled so that
    :math:`\beta_0 = 0` and :math:`\beta_1 = \sigma_{max}` exactly (the signal is never scaled down).

    Args:
        sigma_min: Sets the growth rate ``rho = sigma_max / sigma_min`` (> 1).
        sigma_max: The student-end weight ``beta(1)``.
    """
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"ve needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    rho = sigma_max / sigma_min
    scale = sigma_max / (rho - 1.0)
    log_rho = math.log(rho)
    return Schedule("ve", lambda t: 1.0, lambda t: scale * (rho**t - 1.0), lambda t: 0.0,
                    lambda t: scale * log_rho * rho**t)


SCHEDULES: dict[str, Callable[[], Schedule]] = {"rectified": rectified, "vp": vp, "ve": ve}


def get_schedule(name: str) -> Schedule:
    """The schedule called ``name`` (``rectified``, ``vp`` or ``ve``), with its default constants."""
    if name not in SCHEDULES:
        raise KdkitError(f"unknown flow schedule {name!r}", choices=list(SCHEDULES), bad=name,
                         fix="use rectified (default), vp or ve")
    return SCHEDULES[name]()


__all__ = ["SCHEDULES", "Schedule", "get_schedule", "rectified", "ve", "vp"]
