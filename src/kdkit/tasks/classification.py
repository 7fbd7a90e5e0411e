"""Single-label classification: cross-entropy, top-1 / top-5 accuracy (%), best by top-1.

Top-5 is reported only with more than five classes: with five or fewer it is 100 % whatever the model does.
"""

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


#: The top-k accuracies the task knows, by metric name.
TOP_K = {"top1": 1, "top5": 5}


class AccuracyEvaluator:
    """The top-k accuracies of ``metrics`` (%) and mean CE, summed on the device and reduced over processes
    once at the end."""

    def __init__(self, device: torch.device, ctx: DistContext, metrics: tuple[str, ...]) -> None:
        self.ctx = ctx
        self.names = [m for m in metrics if m in TOP_K]
        self.ks = tuple(TOP_K[m] for m in self.names)
        # ce sum, the hits of each k, samples
        self.totals = torch.zeros(len(self.ks) + 2, dtype=torch.float64, device=device)

    def update(self, logits: Tensor, targets: Tensor) -> None:
        hits = accuracy_counts(logits, targets, self.ks)
        ce = F.cross_entropy(logits.float(), targets, reduction="sum")
        count = torch.tensor(len(targets), dtype=torch.float64, device=self.totals.device)
        self.totals += torch.stack([ce.double(), *(h.double() for h in hits), count])

    def compute(self) -> dict[str, float]:
        ce, *hits, n = all_reduce_sum(self.totals, self.ctx).tolist()
        n = max(n, 1.0)
        return {"loss": ce / n, **{name: 100.0 * h / n for name, h in zip(self.names, hits, strict=True)}}


def chance_accuracy(labels: Tensor, num_classes: int, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Top-k accuracy (%) on ``labels`` of a model that always ranks the commonest classes first: 100·k/K on
    balanced labels, more when some classes are commoner (what a model collapsed onto them scores)."""
    counts = torch.bincount(labels.reshape(-1).long(), minlength=num_classes).sort(descending=True).values
    return [100.0 * float(counts[:k].sum()) / max(len(labels), 1) for k in ks]


class BoundClassification:
    """Classification on one run's data: the labels are the targets.

    Args:
        task: The registered task.
        metrics: The metrics this run reports.
        device: Device of the batches.
        label_smoothing: Of the supervised cross-entropy.
        test_labels: The test split's labels and the number of classes, for :meth:`chance` (``None``: unknown).
    """

    def __init__(self, task: Task, metrics: tuple[str, ...], device: torch.device, label_smoothing: float,
                 test_labels: tuple[Tensor, int] | None = None) -> None:
        self.task, self.metrics, self.device, self.label_smoothing = task, metrics, device, label_smoothing
        ks = {name: k for name, k in TOP_K.items() if name in metrics}
        self._chance = dict(zip(ks, chance_accuracy(*test_labels, tuple(ks.values())), strict=True)) \
            if test_labels is not None else {}

    def targets(self, labels: Tensor, index: Tensor, split: str) -> Tensor:
        return labels

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)

    def train_score(self, logits: Tensor, targets: Tensor) -> Tensor:
        return (logits.detach().argmax(1) == targets).sum().float()

    def evaluator(self, ctx: DistContext) -> AccuracyEvaluator:
        return AccuracyEvaluator(self.device, ctx, self.metrics)

    def chance(self) -> dict[str, float]:
        return dict(self._chance)


@register_task
class Classification(Task):
    """Single-label classification: cross-entropy with the labels, top-1/top-5 accuracy (%), best by top-1."""

    name = "classification"
    metrics = ("top1", "top5", "loss")
    best = "top1"
    loss_name = "ce"
    train_metric = "top1"
    deployed_output = "class logits (B, K); softmax gives the class probabilities"
    probabilities = "softmax"

    def metrics_for(self, data: Any) -> tuple[str, ...]:
        if data is not None and data.num_classes <= TOP_K["top5"]:
            return tuple(m for m in self.metrics if m != "top5")
        return self.metrics

    def bind(self, data: Any, device: torch.device, *, label_smoothing: float = 0.0) -> BoundClassification:
        # data may be None: the labels are the targets (chance level then unknown)
        test = (data.test_labels, data.num_classes) if data is not None else None
        return BoundClassification(self, self.metrics_for(data), device, label_smoothing, test)
