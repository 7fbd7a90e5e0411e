"""Multi-label classification: per-class binary cross-entropy, macro mAP and F1 (torchmetrics), best by mAP.

Targets are the dataset's per-image multi-hot vectors (``ImageData.train_targets["multilabel"]``, ``(N, K)``),
read by the batch's sample indices. The deployed network outputs one logit per class; ``sigmoid`` gives
each class's probability independently.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distributed import DistContext, all_reduce_sum
from kdkit.errors import KdkitError
from kdkit.task import Task, register_task


class MultilabelEvaluator:
    """Macro mAP and macro F1 at threshold 0.5 (%) from torchmetrics, and the mean BCE.

    Under DDP torchmetrics gathers the states of every process when it computes (``torch.distributed``).
    """

    def __init__(self, num_labels: int, device: torch.device, ctx: DistContext) -> None:
        from torchmetrics.classification import MultilabelAveragePrecision, MultilabelF1Score

        self.ctx = ctx
        self.map = MultilabelAveragePrecision(num_labels=num_labels, average="macro").to(device)
        self.f1 = MultilabelF1Score(num_labels=num_labels, average="macro", threshold=0.5).to(device)
        self.totals = torch.zeros(2, dtype=torch.float64, device=device)  # bce sum (per sample), samples

    def update(self, logits: Tensor, targets: Tensor) -> None:
        logits, ints = logits.float(), targets.long()
        self.map.update(logits, ints)  # logits are fine: average precision depends on the order only
        self.f1.update(torch.sigmoid(logits), ints)
        bce = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="sum") / targets.shape[1]
        self.totals += torch.stack([bce.double(), torch.tensor(float(len(targets)), dtype=torch.float64,
                                                               device=self.totals.device)])

    def compute(self) -> dict[str, float]:
        bce, n = all_reduce_sum(self.totals, self.ctx).tolist()
        return {"map": 100.0 * float(self.map.compute()), "f1": 100.0 * float(self.f1.compute()),
                "loss": bce / max(n, 1.0)}


class BoundMultilabel:
    """Multi-label classification on one run's data: targets gathered from the multi-hot arrays by index."""

    def __init__(self, task: Task, data: Any, device: torch.device) -> None:
        self.task, self.device, self.metrics = task, device, task.metrics_for(data)
        self.split_targets = {"train": data.train_targets[task.target].to(device).float(),
                              "test": data.test_targets[task.target].to(device).float()}
        self.num_labels = self.split_targets["train"].shape[1]

    def targets(self, labels: Tensor, index: Tensor, split: str) -> Tensor:
        return self.split_targets[split].index_select(0, index)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), targets)

    def train_score(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        # the fraction of a sample's labels predicted right (threshold 0.5), summed over the batch
        right = ((logits.detach() > 0) == (targets > 0.5)).float().mean(dim=1)
        return right.sum(), right.new_tensor(float(len(right)))

    def evaluator(self, ctx: DistContext) -> MultilabelEvaluator:
        return MultilabelEvaluator(self.num_labels, self.device, ctx)

    def chance(self) -> dict[str, float]:
        # A ranking that knows nothing (random or constant scores) has an average precision equal to the class's
        # share of positives, so macro mAP at chance is the mean test prevalence.
        return {"map": 100.0 * float(self.split_targets["test"].mean(dim=0).mean())}


@register_task
class Multilabel(Task):
    """Multi-label classification: per-class BCE, macro mAP and F1 (torchmetrics, %), best by mAP."""

    name = "multilabel"
    target = "multilabel"
    metrics = ("map", "f1", "loss")
    best = "map"
    loss_name = "bce"
    train_metric = "label_acc"
    deployed_output = "one logit per class (B, K); sigmoid gives each class's probability"
    probabilities = "sigmoid"
    logits_layout = "labels"

    def check_data(self, data: Any) -> str | None:
        problem = super().check_data(data)
        if problem is None and data.train_targets[self.target].shape[1:] != (data.num_classes,):
            return (f"needs {self.target!r} targets of shape (N, {data.num_classes}), got "
                    f"{tuple(data.train_targets[self.target].shape)}")
        return problem

    def bind(self, data: Any, device: torch.device, *, label_smoothing: float = 0.0,
             model: nn.Module | None = None) -> BoundMultilabel:
        if label_smoothing:
            raise KdkitError(f"label smoothing ({label_smoothing}) is defined for single-label targets; the "
                             "multilabel task trains each class's binary cross-entropy",
                             fix="remove train.label_smoothing", where="train.label_smoothing")
        return BoundMultilabel(self, data, device)
