"""Single-label classification: cross-entropy, top-1 / top-5 accuracy (%), best by top-1."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.distributed import DistContext, all_reduce_sum
from kdkit.task import Task, register_task


def accuracy_counts(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[Tensor]:
    """Number of samples whose label is among the top-k logits, for each k (clipped to #classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return [hits[:, : min(k, logits.shape[1])].any(dim=1).sum() for k in ks]


class AccuracyEvaluator:
    """Top-1, top-5 (%) and mean CE, summed on the device and reduced over processes once at the end."""

    def __init__(self, device: torch.device, ctx: DistContext) -> None:
        self.ctx = ctx
        self.totals = torch.zeros(4, dtype=torch.float64, device=device)  # ce sum, top-1 hits, top-5 hits, samples

    def update(self, logits: Tensor, targets: Tensor) -> None:
        top1, top5 = accuracy_counts(logits, targets)
        ce = F.cross_entropy(logits.float(), targets, reduction="sum")
        self.totals += torch.stack([ce.double(), top1.double(), top5.double(),
                                    torch.tensor(len(targets), dtype=torch.float64, device=self.totals.device)])

    def compute(self) -> dict[str, float]:
        ce, top1, top5, n = all_reduce_sum(self.totals, self.ctx).tolist()
        n = max(n, 1.0)
        return {"loss": ce / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


class BoundClassification:
    """Classification on one run's data: the labels are the targets."""

    def __init__(self, task: Task, device: torch.device, label_smoothing: float) -> None:
        self.task, self.device, self.label_smoothing = task, device, label_smoothing

    def targets(self, labels: Tensor, index: Tensor, split: str) -> Tensor:
        return labels

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)

    def train_score(self, logits: Tensor, targets: Tensor) -> Tensor:
        return (logits.detach().argmax(1) == targets).sum().float()

    def evaluator(self, ctx: DistContext) -> AccuracyEvaluator:
        return AccuracyEvaluator(self.device, ctx)


@register_task
class Classification(Task):
    """Single-label classification: cross-entropy with the labels, top-1/top-5 accuracy (%), best by top-1."""

    name = "classification"
    metrics = ("top1", "top5", "loss")
    best = "top1"
    loss_name = "ce"
    train_metric = "top1"
    deployed_output = "class logits (B, K); softmax gives the class probabilities"

    def bind(self, data: Any, device: torch.device, *, label_smoothing: float = 0.0) -> BoundClassification:
        return BoundClassification(self, device, label_smoothing)
