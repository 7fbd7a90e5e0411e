"""MST-Distill's loss: the routed distillation from the mixture of specialised teachers, and the load balance.

Pure functions on tensors (checked by hand in the tests), and :class:`MstDistillLoss`, which owns the gate and is
handed the teachers' masks and classifiers by the method (:mod:`kdkit.methods.mst_distill.method`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.losses.base import DistillLoss, compute_dtype, register_loss, run_widened
from kdkit.methods.mst_distill.modules import GateNet, MaskNet

Routing = Literal["topk", "weighted"]
Balance = Literal["kl", "cv"]
Stage = Literal["warmup", "route"]


def kd_per_sample(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    r""":math:`T^2\,\mathrm{KL}(\mathrm{softmax}(z^t/T)\,\|\,\mathrm{softmax}(z^s/T))` per sample ``(B,)``; the
    teacher side carries no gradient."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1) * temperature**2


def topk_routed_kd(student_logits: Tensor, teacher_logits: Tensor, gate_probs: Tensor, k: int = 1,
                   temperature: float = 4.0) -> tuple[Tensor, Tensor]:
    r"""KD from each sample's ``k`` highest-routed teachers (the official ``k_ways_MTGdistillation_detached``):

    .. math:: \frac{1}{k}\sum_{r=1}^{k} \frac{1}{B}\sum_i T^2\,\mathrm{KL}\big(p^{(T)}_{t_{\pi_i(r)}, i}\,\|\,
              p^{(T)}_{s,i}\big)

    with :math:`\pi_i(r)` the teacher of rank ``r`` in sample ``i``'s routing probabilities. The selection is an
    index (no gradient reaches the gate through it; the gate learns from the load balance, as in the code).

    Args:
        student_logits: ``(B, K)``.
        teacher_logits: ``(B, M, K)``, the ``M`` specialised teachers' (no gradient).
        gate_probs: ``(B, M)`` routing probabilities.
        k: Teachers per sample, ``1 <= k <= M``.
        temperature: ``T`` (4, the code's).

    Returns:
        ``(loss, chosen)``: the scalar and the ``(B, k)`` chosen teachers.
    """
    chosen = gate_probs.topk(k, dim=1).indices
    picked = teacher_logits.gather(1, chosen.unsqueeze(-1).expand(-1, -1, teacher_logits.shape[2]))
    per_rank = [kd_per_sample(student_logits, picked[:, r], temperature).mean() for r in range(k)]
    return torch.stack(per_rank).mean(), chosen


def weighted_routed_kd(student_logits: Tensor, teacher_logits: Tensor, gate_probs: Tensor,
                       temperature: float = 4.0) -> Tensor:
    r"""KD from the routing-weighted teacher logits :math:`\sum_m g_{im} z^t_{im}` (the official
    ``weighted_MTGdistillation_detached``): the gate gets the distillation's gradient too."""
    aggregated = (gate_probs.unsqueeze(-1) * teacher_logits.detach()).sum(1)
    return kd_per_sample(student_logits, aggregated, temperature).mean()


def load_balance(gate_probs: Tensor, mode: Balance = "kl") -> Tensor:
    r"""The gate's load-balancing loss (the official ``load_balancing_loss``), with :math:`\bar g` the batch mean of
    the routing probabilities over ``M`` teachers:

    * ``kl``: :math:`\frac{1}{M}\sum_m \frac{1}{M}\big(\log\frac{1}{M} - \log \bar g_m\big)` -- the code's
      ``KLDivLoss(reduction='batchmean')`` of the uniform routing from :math:`\bar g`, whose "batch" is the ``M``
      entries of the 1-D input;
    * ``cv``: the coefficient of variation (unbiased std / mean) of the teachers' summed probabilities.
    """
    if mode == "kl":
        mean = gate_probs.mean(0)
        uniform = torch.full_like(mean, 1.0 / len(mean))
        return (uniform * (uniform.log() - mean.log())).sum() / len(mean)
    importance = gate_probs.sum(0)
    return importance.std() / importance.mean()


def masked_logits(features: Tensor, mask: Tensor, classifier: nn.Linear) -> Tensor:
    """A teacher's logits with its feature map masked per channel: ``classifier(flatten(mask[:, :, None, None] *
    features))`` (the classifier reads the flattened map, as the ``flatten`` head of the small CNNs)."""
    return classifier((features * mask[:, :, None, None]).flatten(1))


@register_loss("mst_distill", help="MST-Distill (Li et al., 2025): a gate routes each sample to its specialised "
                                   "(masked) teachers of a mixture (cross-modal and multimodal); load balancing")
class MstDistillLoss(DistillLoss):
    r"""MST-Distill's distillation from ``M >= 2`` teachers, on the student's logits.

    Teacher taps: each teacher's logits, then each teacher's last feature map, in the same order::

        distill:
          - {loss: mst_distill, teacher: [mm.logits, edges.logits, mm.stage2, edges.stage2]}

    Two stages, set by the method at every epoch start (``stage``):

    * ``warmup`` (the official stage 1, with frozen teachers): :math:`\sum_m` KD from every (unmasked) teacher;
    * ``route`` (the official stage 3): the gate (:class:`GateNet` on the student's logits) routes each sample to its
      ``k`` teachers (:func:`topk_routed_kd`, or :func:`weighted_routed_kd`), plus ``balance_weight`` times
      :func:`load_balance`. With the masks trained (the method's phase, the official stage 2), each teacher is its
      masked version (:func:`masked_logits`, masks and teacher frozen); without masks (unit use), its logits.

    The gate is a loss head: trained with the student by the run's optimiser (the code: Adam on student + gate),
    checkpointed with the objective, never deployed.

    Args:
        temperature: KD temperature (the code's 4).
        k: Teachers per sample in ``topk`` routing (the code's ``--k`` 1).
        routing: ``topk`` (the code's default) or ``weighted``.
        balance: Load-balancing loss, ``kl`` (the code's default ``--lb_mode``) or ``cv``.
        balance_weight: Its weight (the code's ``--w_lb`` 1).
    """
    reads_logits = frozenset({"classes"})

    pairwise = False
    teacher_list = True
    default_student_tap = "logits"

    def __init__(self, *, temperature: Annotated[float, Gt(0)] = 4.0, k: Annotated[int, Ge(1)] = 1,
                 routing: Routing = "topk", balance: Balance = "kl",
                 balance_weight: Annotated[float, Ge(0)] = 1.0) -> None:
        super().__init__()
        self.temperature, self.k, self.routing = temperature, k, routing
        self.balance, self.balance_weight = balance, balance_weight
        self.gate: GateNet | None = None
        self.stage: Stage = "route"
        # handed over by the method (lists: not submodules of the loss, so never trained by the student's optimiser)
        self.masks: list[MaskNet] = []
        self.classifiers: list[nn.Linear] = []
        self.routed: Tensor | None = None  # samples routed to each teacher since the run (or its resumption) began

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        return (10,), [(10,), (10,), (10,), (4, 3, 3), (4, 3, 3), (4, 3, 3)]

    def check_shapes(self, student: Any, teacher: Any) -> str | KdkitError | None:
        """``(K,)`` student logits; ``M >= 2`` teachers' ``(K,)`` logits then their ``(C, H, W)`` maps; ``k <= M``."""
        shapes = [tuple(t) for t in teacher] if isinstance(teacher, list) else [tuple(teacher)]
        m = len(shapes) // 2
        if m < 2:
            return KdkitError(f"MST-Distill routes each sample among several teachers; {len(shapes)} teacher tap(s) "
                              "give at most one teacher, and a router over one teacher has nothing to choose",
                              bad=str(len(shapes)), fix="give two or more teachers under `teachers:` and list their "
                              "logits then their last feature maps, e.g. teacher: [mm.logits, edges.logits, "
                              "mm.stage2, edges.stage2]")
        if len(shapes) % 2 or any(s != tuple(student) for s in shapes[:m]) or any(len(s) != 3 for s in shapes[m:]):
            return (f"needs teacher taps [logits of each teacher, then the (C, H, W) feature map of each], got "
                    f"{shapes} for student logits {tuple(student)}")
        if self.k > m:
            return KdkitError(f"k {self.k} routes each sample to more teachers than the {m} there are",
                              bad=str(self.k), choices=[str(i) for i in range(1, m + 1)], fix=f"set k <= {m}")
        return None

    def setup(self, student_shape: Any, teacher_shape: Any, num_samples: int) -> None:
        """Build the gate: ``K`` student logits to one score per teacher."""
        ways = len(teacher_shape) // 2
        self.gate = GateNet(next(iter(student_shape)), ways)
        self.routed = torch.zeros(ways, dtype=torch.float64)

    def bind(self, masks: list[MaskNet], classifiers: list[nn.Linear]) -> None:
        """The teachers' masks and classifiers (the method calls this before training)."""
        self.masks, self.classifiers = list(masks), list(classifiers)

    def teacher_outputs(self, teacher: list[Tensor], dtype: torch.dtype) -> Tensor:
        """``(B, M, K)``: the masked teachers' logits in the ``route`` stage with masks bound, else the logits."""
        m = len(teacher) // 2
        if self.stage == "route" and self.masks:
            with torch.no_grad():
                outs = [masked_logits(f, mask(f), fc) for f, mask, fc in
                        zip(teacher[m:], self.masks, self.classifiers, strict=True)]
        else:
            outs = teacher[:m]
        return torch.stack([o.detach().to(dtype) for o in outs], dim=1)

    def forward(self, student: Tensor, teacher: list[Tensor], labels: Tensor) -> Tensor:
        """The stage's loss of ``(B, K)`` student logits against the teachers' taps."""
        if self.gate is None:
            raise RuntimeError("mst_distill: call setup() first (it builds the gate)")
        dtype = compute_dtype(student, *teacher)
        s = student.to(dtype)
        teachers = self.teacher_outputs(teacher, dtype)
        if self.stage == "warmup":
            return sum(kd_per_sample(s, teachers[:, m], self.temperature).mean() for m in range(teachers.shape[1]))
        probs = run_widened(self.gate, s).softmax(1)
        if self.routing == "topk":
            kd, chosen = topk_routed_kd(s, teachers, probs, self.k, self.temperature)
            if self.routed is not None:
                self.routed += torch.bincount(chosen.flatten().cpu(), minlength=len(self.routed)).double()
        else:
            kd = weighted_routed_kd(s, teachers, probs, self.temperature)
        return kd + self.balance_weight * load_balance(probs, self.balance)
