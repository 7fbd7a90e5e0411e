"""CRD: contrastive representation distillation with an NCE objective over a memory of negatives."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval
from torch import Tensor, nn

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss, run_widened, widen


def nce_loss(scores: Tensor, log_z: Tensor, temperature: float, num_samples: int) -> Tensor:
    r"""The NCE loss of CRD for one anchor side, in log space.

    Tian, Krishnan and Isola, "Contrastive Representation Distillation", ICLR 2020. With
    :math:`P_j = \exp(s_j/\tau)/Z` for the positive (column 0) and the :math:`K` negatives, and the noise
    probability :math:`P_n = 1/N` (N = training samples):

    .. math::
        L = -\frac{1}{B}\sum_b \Big[\log\frac{P_{b0}}{P_{b0} + K P_n}
            + \sum_{j\ge1}\log\frac{K P_n}{P_{bj} + K P_n}\Big]

    The reference code (RepDistiller ``ContrastLoss``) forms the ratios from probabilities with an
    ``eps``; here each log-ratio is ``log a - logaddexp(log a, log b)``, the same value without under-
    or overflow.

    Args:
        scores: ``(B, K+1)`` cosine similarities, positive first.
        log_z: Scalar log of the normalisation constant Z.
        temperature: :math:`\tau` (0.07).
        num_samples: N, the dataset size.

    Returns:
        Scalar loss.
    """
    k = scores.shape[1] - 1
    log_p = widen(scores) / temperature - log_z
    log_noise = torch.tensor(math.log(k / num_samples), dtype=log_p.dtype, device=scores.device)
    log_d1 = log_p[:, 0] - torch.logaddexp(log_p[:, 0], log_noise)
    log_d0 = log_noise - torch.logaddexp(log_p[:, 1:], log_noise)
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


@register_loss("crd", help="CRD: contrastive representation distillation, NCE over a queue of negatives (2020)")
class CRDLoss(DistillLoss):
    """CRD on the penultimate (pooled) features, with trainable 128-d embedding heads on both sides.

    For a batch, the student embedding :math:`v_s` is contrasted with the teacher-space memory (its own
    sample's teacher embedding as the positive, K others as negatives) and the teacher embedding
    :math:`v_t` with the student-space memory; ``L = nce(v_s) + nce(v_t)``. Z is estimated once, on the
    first batch, as ``mean(exp(s/tau)) * N`` (as the reference code does).

    Two memories (paper vs. scale):

    * ``memory: queue`` (default) -- a FIFO queue of the last K embeddings of each space, updated with
      the detached embeddings of every batch; positives are the current batch's other-space embeddings
      (detached). Memory is O(K), independent of the dataset size.
    * ``memory: bank`` -- the paper's memory bank: one slot per training sample in each space, updated
      as ``normalize(m * slot + (1 - m) * v)`` (momentum 0.5); positives are the bank slots of the
      batch's own samples, negatives K uniformly drawn slots. Memory is O(N).

    Recipe (CIFAR: weight 0.8 with CE 1; the paper also keeps KD at 0 by default)::

        distill:
          - {loss: crd, weight: 0.8, num_negatives: 16384, temperature: 0.07}

    Args:
        feat_dim: Embedding width (128).
        num_negatives: K (16384 on CIFAR; keep it below the dataset size for ``bank``).
        temperature: NCE temperature (0.07).
        momentum: Momentum of the bank's slot updates (0.5); unused by the queue.
        memory: ``queue`` (default) or ``bank`` (the paper's).
    """

    default_student_tap = "penultimate"
    default_teacher_tap = "penultimate"
    needs_index = True

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """Pooled features of different widths (both are embedded to ``feat_dim``)."""
        return (12,), (16,)

    def __init__(self, *, feat_dim: Annotated[int, Ge(1)] = 128, num_negatives: Annotated[int, Ge(1)] = 16384,
                 temperature: Annotated[float, Gt(0)] = 0.07, momentum: Annotated[float, Interval(ge=0, lt=1)] = 0.5,
                 memory: Literal["queue", "bank"] = "queue") -> None:
        super().__init__()
        self.feat_dim, self.k, self.temperature = feat_dim, num_negatives, temperature
        self.momentum, self.memory = momentum, memory
        self.num_samples = 0
        self.embed_s: nn.Module = nn.Identity()
        self.embed_t: nn.Module = nn.Identity()

    def check_shapes(self, student: Any, teacher: Any) -> str | None:
        """Any widths: both sides are embedded to ``feat_dim``."""
        return None

    def setup(self, student_shape: Any, teacher_shape: Any, num_samples: int) -> None:
        """Build the embedding heads from the tap widths and the memory for ``num_samples`` samples."""
        if self.memory == "bank" and self.k >= num_samples:
            raise ValueError(f"num_negatives {self.k} must be below the dataset size {num_samples} for memory: bank")
        self.num_samples = num_samples
        self.embed_s = nn.Linear(math.prod(student_shape), self.feat_dim)
        self.embed_t = nn.Linear(math.prod(teacher_shape), self.feat_dim)
        slots = num_samples if self.memory == "bank" else self.k
        bound = 1.0 / math.sqrt(self.feat_dim / 3)  # uniform init, as the reference memory
        for name in ("memory_s", "memory_t"):
            self.register_buffer(name, F.normalize(torch.rand(slots, self.feat_dim) * 2 * bound - bound, dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # float64: Z is estimated once, from the first batch; a float64 run must not see it rounded to float32
        self.register_buffer("log_z", torch.full((2,), float("nan"), dtype=torch.float64))

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor, index: Tensor | None = None) -> Tensor:
        """NCE loss of both anchor sides; ``index`` are the batch's dataset indices (bank memory)."""
        if self.num_samples == 0:
            raise RuntimeError("CRDLoss.setup() was not called (kdkit's recipe builder calls it)")
        v_s = F.normalize(run_widened(self.embed_s, student.flatten(1)), dim=1)
        v_t = F.normalize(run_widened(self.embed_t, teacher.flatten(1)), dim=1)
        dtype = compute_dtype(v_s, v_t)  # the memories and Z are stored state, read in the computing precision
        if self.memory == "bank":
            assert index is not None, "CRD with memory: bank needs the samples' dataset indices"
            negatives = torch.randint(0, self.num_samples, (len(index), self.k), device=v_s.device)
            slots = torch.cat([index[:, None], negatives], dim=1)
            # student anchors against teacher-space slots, and the reverse: (B, K+1)
            scores_s = torch.bmm(self.memory_t[slots].to(dtype), v_s[:, :, None]).squeeze(2)
            scores_t = torch.bmm(self.memory_s[slots].to(dtype), v_t[:, :, None]).squeeze(2)
        else:  # positives: the other side's current embedding; negatives: the whole queue (one matmul)
            # clone: the queue is updated in place below, before backward needs these values
            queue_s, queue_t = self.memory_s.to(dtype, copy=True), self.memory_t.to(dtype, copy=True)
            scores_s = torch.cat([(v_s * v_t.detach()).sum(1, keepdim=True), v_s @ queue_t.T], dim=1)
            scores_t = torch.cat([(v_t * v_s.detach()).sum(1, keepdim=True), v_t @ queue_s.T], dim=1)
        if torch.isnan(self.log_z).any():
            with torch.no_grad():
                n = scores_s.numel()
                self.log_z.copy_(torch.stack([torch.logsumexp(scores_s.flatten() / self.temperature, 0),
                                              torch.logsumexp(scores_t.flatten() / self.temperature, 0)])
                                 - math.log(n) + math.log(self.num_samples))
        log_z = self.log_z.to(dtype)
        loss = nce_loss(scores_s, log_z[0], self.temperature, self.num_samples) + \
            nce_loss(scores_t, log_z[1], self.temperature, self.num_samples)
        if self.training:
            self._update(v_s.detach(), v_t.detach(), index)
        return loss.to(student.dtype)

    @torch.no_grad()
    def _update(self, v_s: Tensor, v_t: Tensor, index: Tensor | None) -> None:
        if self.memory == "bank":
            for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                mixed = F.normalize(bank[index] * self.momentum + v.to(bank.dtype) * (1 - self.momentum), dim=1)
                bank.index_copy_(0, index, mixed)
            return
        n = min(len(v_s), self.k)
        rows = (self.queue_ptr + torch.arange(n, device=v_s.device)) % self.k
        self.memory_s.index_copy_(0, rows, v_s[:n].to(self.memory_s.dtype))
        self.memory_t.index_copy_(0, rows, v_t[:n].to(self.memory_t.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % self.k)
