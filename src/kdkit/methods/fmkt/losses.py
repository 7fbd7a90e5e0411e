r"""FM-KT and OFM-KT: a registered metric loss applied at every step of a flow bridge's chain.

Shao et al., "Precise Knowledge Transfer via Flow Matching" (arXiv 2402.02012). The ``flow`` bridge
(:mod:`kdkit.methods.fmkt.bridge`) unrolls N Euler steps from a student map and hands these losses the per-step
estimates :math:`\hat z^{(1)}, \dots, \hat z^{(N)}` (``(N, B, K)``). The wrapped metric is any registered
loss (``kd``, ``dkd``, ``dist``, ``mse``, ``cka`` ...), built and validated exactly like a recipe term.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from annotated_types import Ge, Interval
from torch import Tensor

from kdkit.bridges import BRIDGES
from kdkit.errors import KdkitError
from kdkit.losses.base import LOSSES, DistillLoss, compute_dtype, register_loss, widen
from kdkit.methods.fmkt.bridge import FlowEstimates
from kdkit.params import check_params

FLOW_LOSSES = ("fmkt", "ofmkt")


def build_metric(metric: str, metric_params: dict[str, Any]) -> DistillLoss:
    """Build the wrapped loss ``metric`` with ``metric_params``, validated like any recipe term.

    Raises:
        KdkitError: Unknown name (closest first), bad parameters, or a loss that cannot be wrapped.
    """
    cls = LOSSES.get(metric, where="metric")
    if metric in FLOW_LOSSES:
        raise KdkitError(f"{metric!r} cannot be the metric of a flow loss", bad=metric,
                         choices=[n for n in LOSSES.names() if n not in FLOW_LOSSES], fix="use kd, dkd, dist, mse ...",
                         where="metric")
    if cls.needs_index or not cls.needs_teacher:
        raise KdkitError(f"loss {metric!r} needs sample indices or no teacher; it cannot compare two estimates",
                         bad=metric, choices=["kd", "dkd", "dist", "mse", "cka"], fix="use a logit/feature metric",
                         where="metric")
    params = check_params(cls, metric_params, where="metric_params", what=f"loss {metric!r}")
    try:
        return cls(**params)
    except (ValueError, TypeError) as exc:
        raise KdkitError(f"loss {metric!r}: {exc}", fix="see `kdkit ls losses`", where="metric_params") from None


def dirac_shuffle(target: Tensor, dirac_ratio: float) -> Tensor:
    r"""A new tensor whose first :math:`\lfloor (1 - \beta_d) B \rfloor` rows are permuted among themselves.

    The "Dirac ratio" :math:`\beta_d` of FM-KT: only that fraction of the batch keeps its own teacher
    target; the rest is paired with other samples' targets. The released code permutes the rows in
    place; here the permutation indexes into a new tensor, so every other user of ``target`` (another
    term, the teacher's cache) still sees the original. ``dirac_ratio = 1`` returns ``target`` itself.
    """
    n = int((1.0 - dirac_ratio) * target.shape[0])
    if n < 2:
        return target
    order = torch.cat([torch.randperm(n, device=target.device), torch.arange(n, target.shape[0], device=target.device)])
    return target.index_select(0, order)


def smoothed_ce(logits: Tensor, labels: Tensor, smoothing: float) -> Tensor:
    r"""OFM-KT's label-smoothed CE: target mass :math:`1 - \epsilon`, :math:`\epsilon/(K-1)` on every other class.

    .. math:: L = -\frac{1}{B}\sum_b \sum_k q_{bk} \log \mathrm{softmax}(z_b)_k

    (PyTorch's ``label_smoothing`` instead spreads :math:`\epsilon/K` over every class.)
    """
    log_p = F.log_softmax(widen(logits), dim=1)
    k = logits.shape[1]
    off = smoothing / (k - 1) if k > 1 else 0.0
    q = torch.full_like(log_p, off).scatter(1, labels[:, None], 1.0 - smoothing)
    return -(q * log_p).sum(1).mean()


def fmkt_loss(steps: Tensor, target: Tensor, labels: Tensor, metric: DistillLoss, ce_weight: float) -> Tensor:
    r"""FM-KT's per-step objective, averaged over the N steps.

    .. math::
        L = \frac{1}{N}\sum_{i=1}^{N}\Big[\mathcal{M}(\hat z^{(i)}, z_t) + w_{ce}\,\mathrm{CE}(\hat z^{(i)}, y)\Big]

    Args:
        steps: ``(N, B, K)`` per-step estimates.
        target: ``(B, K)`` teacher tensor (possibly Dirac-shuffled).
        labels: ``(B,)`` class indices.
        metric: The wrapped loss :math:`\mathcal{M}`.
        ce_weight: :math:`w_{ce}` (1 in the paper).
    """
    dtype = compute_dtype(steps, target)
    total = steps.new_zeros((), dtype=dtype)
    for estimate in steps.unbind(0):
        total = total + metric(estimate, target, labels).to(dtype)
        if ce_weight:
            total = total + ce_weight * F.cross_entropy(estimate.to(dtype), labels)
    return total / steps.shape[0]


class _FlowLoss(DistillLoss):
    """Shared plumbing: the wrapped metric, its setup and shape checks, and the flow bridge requirement."""

    #: build.plan checks that the term uses this bridge.
    requires_bridge = "flow"
    uses_labels = True  # the per-step and Theta cross-entropies read the labels
    #: Per-sample student tap the example inputs flow from (a small pre-pool map).
    example_tap: ClassVar[tuple[int, ...]] = (4, 3, 3)

    def __init__(self, metric: str, metric_params: dict[str, Any]) -> None:
        super().__init__()
        self.metric_name = metric
        self.metric = build_metric(metric, metric_params)

    @classmethod
    def example_inputs(cls, batch: int, generator: torch.Generator | None = None) -> tuple[Any, Any, Tensor, Tensor]:
        """The registered ``flow`` bridge's :class:`FlowEstimates` on a random student map, with the default
        teacher logits and labels (:meth:`example_shapes` is one estimate's ``(K,)`` against the teacher's)."""
        _, teacher, labels, index = super().example_inputs(batch, generator)
        bridge = BRIDGES.get(cls.requires_bridge)(cls.example_tap, cls.example_shapes()[1])
        with torch.no_grad():
            estimates = bridge(torch.randn(batch, *cls.example_tap, generator=generator))
        return estimates, teacher, labels, index

    def setup(self, student_shape: Any, teacher_shape: Any, num_samples: int) -> None:
        """Forward to the wrapped metric (it sees one estimate against the target)."""
        self.metric.setup(student_shape, teacher_shape, num_samples)

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...] | None) -> str | None:
        """The wrapped metric's check of one estimate's shape against the target's."""
        return self.metric.check_shapes(student, teacher if teacher is not None else student)

    @staticmethod
    def _estimates(student: Any) -> FlowEstimates:
        if not isinstance(student, FlowEstimates):
            raise TypeError("flow losses read the output of the 'flow' bridge; add `bridge: flow` to the term")
        return student

    def _theta(self, out: FlowEstimates, labels: Tensor, ce: Any) -> Tensor | None:
        """FM-KT^Theta: the plain student's logits learn the detached ensemble (and the labels)."""
        if out.plain is None:
            return None
        return widen(self.metric(out.plain, out.ensemble().detach(), labels)) + ce(out.plain, labels)

    def extra_repr(self) -> str:
        return f"metric={self.metric_name}"


@register_loss("fmkt", help="FM-KT: a metric loss (kd, dkd, dist ...) + CE at every step of a flow bridge (2024)")
class FMKTLoss(_FlowLoss):
    r"""FM-KT on the ``flow`` bridge's per-step estimates; see :func:`fmkt_loss`.

    With FM-KT^Theta (``bridge_params: {theta: true}``) the plain student's logits :math:`z` are also
    trained on the detached ensemble :math:`\bar z = \frac1N\sum_i \hat z^{(i)}`:
    :math:`L \mathrel{+}= \mathcal{M}(z, \mathrm{sg}(\bar z)) + w_{ce}\mathrm{CE}(z, y)` (as the released code).

    Recipe (the paper: outer CE 0, CE inside at every step)::

        distill:
          - {loss: fmkt, student: stage2, bridge: flow, bridge_params: {steps: 8, eval_steps: 4},
             metric: dkd, metric_params: {beta: 8}, dirac_ratio: 1.0}
        train: {ce_weight: 0}

    Args:
        metric: Registered loss applied to each estimate against the teacher tensor.
        metric_params: Its parameters (validated like a recipe term's).
        ce_weight: Weight of the CE of each estimate with the labels (1 in the paper).
        dirac_ratio: :math:`\beta_d \in [0, 1]`: fraction of the batch keeping its own teacher target; the
            rest is shuffled within the batch (1 = no shuffle, the paper's default).

    Shapes: student = :class:`~kdkit.methods.fmkt.bridge.FlowEstimates` with ``steps (N, B, K)``; teacher ``(B, K)``.
    """

    default_student_tap = "penultimate"
    default_teacher_tap = "logits"

    def __init__(self, *, metric: str = "kd", metric_params: dict[str, Any] | None = None,
                 ce_weight: Annotated[float, Ge(0)] = 1.0,
                 dirac_ratio: Annotated[float, Interval(ge=0, le=1)] = 1.0) -> None:
        super().__init__(metric, dict(metric_params or {}))
        self.ce_weight, self.dirac_ratio = ce_weight, dirac_ratio

    def forward(self, student: Any, teacher: Tensor, labels: Tensor) -> Tensor:
        """The FM-KT loss of the chain's estimates against the teacher tensor (Dirac-shuffled when asked)."""
        out = self._estimates(student)
        target = dirac_shuffle(teacher, self.dirac_ratio)
        loss = fmkt_loss(out.steps, target, labels, self.metric, self.ce_weight)
        theta = self._theta(out, labels, lambda z, y: self.ce_weight * F.cross_entropy(widen(z), y))
        return loss if theta is None else loss + theta


@register_loss("ofmkt", help="OFM-KT: online FM-KT without a teacher: smoothed CE per step + each step to the "
                             "detached mean of the steps (2024)")
class OFMKTLoss(_FlowLoss):
    r"""OFM-KT: the online variant (no teacher) on the ``flow`` bridge's estimates.

    .. math::
        L = \frac{1}{N}\sum_{i=1}^{N}\Big[\mathrm{CE}_\epsilon(\hat z^{(i)}, y)
            + \mathcal{M}\big(\hat z^{(i)}, \mathrm{sg}(\bar z)\big)\Big], \qquad
        \bar z = \frac{1}{N}\sum_i \hat z^{(i)}

    with :math:`\mathrm{CE}_\epsilon` the released code's label-smoothed CE (:func:`smoothed_ce`). With no
    teacher, the bridge maps onto the student's own logit width. FM-KT^Theta works as for ``fmkt``.

    Recipe (no ``teacher:`` section)::

        distill:
          - {loss: ofmkt, student: stage2, bridge: flow, metric: kd, label_smoothing: 0.1}
        train: {ce_weight: 0}

    Args:
        metric: Registered loss pulling each step towards the detached ensemble.
        metric_params: Its parameters.
        label_smoothing: :math:`\epsilon` (0.1 in the released code).

    Shapes: student = :class:`~kdkit.methods.fmkt.bridge.FlowEstimates` with ``steps (N, B, K)``; no teacher tensor.
    """

    default_student_tap = "penultimate"
    default_teacher_tap = "logits"
    needs_teacher = False

    def __init__(self, *, metric: str = "kd", metric_params: dict[str, Any] | None = None,
                 label_smoothing: Annotated[float, Interval(ge=0, lt=1)] = 0.1) -> None:
        super().__init__(metric, dict(metric_params or {}))
        self.label_smoothing = label_smoothing

    def forward(self, student: Any, teacher: Tensor | None, labels: Tensor) -> Tensor:
        """The OFM-KT loss; ``teacher`` is ignored (``None`` in recipes without a teacher)."""
        out = self._estimates(student)
        steps = out.steps
        ensemble = out.ensemble().detach()
        total = steps.new_zeros((), dtype=compute_dtype(steps))
        for estimate in steps.unbind(0):
            total = total + smoothed_ce(estimate, labels, self.label_smoothing)
            total = total + self.metric(estimate, ensemble, labels).to(total.dtype)
        total = total / steps.shape[0]
        theta = self._theta(out, labels, lambda z, y: smoothed_ce(z, y, self.label_smoothing))
        return total if theta is None else total + theta


__all__ = ["FMKTLoss", "OFMKTLoss", "build_metric", "dirac_shuffle", "fmkt_loss", "smoothed_ce"]
