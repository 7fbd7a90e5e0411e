"""The ``source_kd`` loss: KD from several source models, each through its target head, weighted per source."""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Gt
from torch import Tensor

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss


def source_kd_loss(student_logits: Tensor, source_logits: list[Tensor], weights: Tensor,
                   temperature: float = 1.0) -> Tensor:
    r"""Weighted multi-source KD (Borup et al., DistillWeighted; DistillNearest is one weight 1, the rest 0):

    .. math::
        L = T^2 \sum_{s=1}^{S} \alpha_s \, \frac1B \sum_b
            \mathrm{KL}\big(\mathrm{softmax}(t_s^b / T) \,\|\, \mathrm{softmax}(z^b / T)\big)

    a weighted sum of one KD term per source (not the KD towards a weighted mixture of the sources' softmaxes: each
    source pulls the student towards its own pseudo-labels, in proportion to its weight). A source of weight 0
    contributes nothing, gradient included.

    Args:
        student_logits: ``(B, K)``.
        source_logits: ``S`` tensors ``(B, K)``: each source's target-class logits ``t_s`` (its target head's output).
        weights: ``(S,)`` weights ``alpha_s``.
        temperature: ``T``.

    Returns:
        Scalar, in the student's dtype (computed in float32 or wider).
    """
    dtype = compute_dtype(student_logits, *source_logits)
    log_p_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    total = log_p_s.new_zeros(())
    for alpha, logits in zip(weights.to(dtype), source_logits, strict=True):
        log_p_t = F.log_softmax(logits.to(dtype) / temperature, dim=1)
        total = total + alpha * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return (total * temperature**2).to(student_logits.dtype)


@register_loss("source_kd", help="KD from several sources through their target heads, weighted per source "
                                 "(DistillWeighted / DistillNearest, Borup et al., ICCV 2023)")
class SourceKDLoss(DistillLoss):
    """Weighted multi-source KD; see :func:`source_kd_loss`. The term reads one tap of each source::

        teachers: {a: {...}, b: {...}, c: {...}}
        distill:
          - {loss: source_kd, teacher: [a.penultimate, b.penultimate, c.penultimate], temperature: 2}
        source_select: {mode: weighted}

    Each source's tap passes through its target head ``t_s = f_s W_s^T + b_s`` (buffers ``head_weight_s``,
    ``head_bias_s``, saved with the run's checkpoints); the weights ``alpha_s`` are the buffer ``weights``. The
    ``source_select`` method fills both once before training (:meth:`configure`): the heads fitted on the labelled
    target images, the weights from the sources' task similarity. Until then the weights are uniform and a source whose
    tap is already ``(K,)`` logits has the identity head (its own outputs); a wider tap has no head yet and is refused
    at the first call.

    Args:
        temperature: ``T`` (default 1: the sources' pseudo-labels as they are).
    """
    reads_logits = frozenset({"classes"})

    pairwise = False
    teacher_list = True

    def __init__(self, *, temperature: Annotated[float, Gt(0)] = 1.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.sources = 0
        # kept on the host, so that no step waits for the device to say which sources count
        self.active: list[int] = []  # the sources of weight > 0
        self.fitted: list[bool] = []  # which sources have a head (the identity, or fitted by the method)

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        return (10,), [(10,), (10,), (10,)]

    def check_shapes(self, student: Any, teacher: Any) -> str | None:
        """``(K,)`` student logits and a list of flat ``(D_s,)`` source taps (logits or features)."""
        shapes = teacher if isinstance(teacher, list) else [teacher]
        if len(tuple(student)) != 1 or any(len(tuple(t)) != 1 for t in shapes):
            return (f"needs (K,) student logits and flat (D,) source taps (logits or a penultimate feature), got "
                    f"student {tuple(student)} and sources {[tuple(t) for t in shapes]}")
        return None

    def setup(self, student_shape: Any, teacher_shape: Any, num_samples: int) -> None:
        """Uniform weights and one head per source: the identity for a ``(K,)`` tap, unfitted for a wider one."""
        shapes = teacher_shape if isinstance(teacher_shape, list) else [teacher_shape]
        classes = int(student_shape[0])
        self.sources = len(shapes)
        self.register_buffer("weights", torch.full((self.sources,), 1.0 / self.sources))
        fitted = []
        for s, shape in enumerate(shapes):
            width = int(shape[0])
            identity = width == classes
            weight = torch.eye(classes) if identity else torch.zeros(classes, width)
            self.register_buffer(f"head_weight_{s}", weight)
            self.register_buffer(f"head_bias_{s}", torch.zeros(classes))
            fitted.append(identity)
        self.fitted = fitted
        self.active = list(range(self.sources))

    def configure(self, weights: Tensor, heads: dict[int, tuple[Tensor, Tensor]]) -> None:
        """Set the sources' weights ``(S,)`` and the fitted heads ``{s: (W (K, D_s), b (K,))}`` (others kept). A source
        of weight 0 (DistillNearest's unselected ones) needs no head: the loss skips it."""
        self.weights.copy_(weights)
        self.active = [s for s, w in enumerate(weights.tolist()) if w > 0]
        for s, (weight, bias) in heads.items():
            getattr(self, f"head_weight_{s}").copy_(weight)
            getattr(self, f"head_bias_{s}").copy_(bias)
            self.fitted[s] = True

    def target_logits(self, source_taps: list[Tensor]) -> dict[int, Tensor]:
        """The ``(B, K)`` target-class logits of each source of weight > 0 (by index): its tap through its head, in
        the tap's precision (float32 or wider)."""
        missing = [s for s in self.active if not self.fitted[s]]
        if missing:
            raise RuntimeError(f"source_kd: source(s) {missing} read a feature wider than the classes and have no "
                               "target head; the `source_select:` section fits them before training")
        dtype = compute_dtype(*source_taps)
        return {s: F.linear(source_taps[s].to(dtype), getattr(self, f"head_weight_{s}").to(dtype),
                            getattr(self, f"head_bias_{s}").to(dtype)) for s in self.active}

    def forward(self, student: Tensor, teacher: Tensor | list[Tensor], labels: Tensor) -> Tensor:
        """Loss of ``(B, K)`` student logits against the sources' taps."""
        taps = teacher if isinstance(teacher, list) else [teacher]
        logits = self.target_logits(taps)
        return source_kd_loss(student, list(logits.values()), self.weights[list(logits)], self.temperature)
