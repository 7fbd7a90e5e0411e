"""Single-label classification: cross-entropy, top-1 / top-5 accuracy (%), best by top-1.

Top-5 is reported only with more than five classes: with five or fewer it is 100 % whatever the model does.
Unlabelled training samples (:data:`kdkit.data.base.UNLABELLED`) are skipped by the cross-entropy (a mean over the
batch's labelled samples, :func:`kdkit.distill.labelled_cross_entropy`) and by the training accuracy. On data with
novel classes to discover (:attr:`kdkit.data.ImageData.novel_classes`) the task also reports ``novel_acc``: the
clustering accuracy of the novel-class test images (:func:`cluster_accuracy`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.data.base import UNLABELLED
from kdkit.distill import labelled_cross_entropy
from kdkit.distributed import DistContext, all_reduce_sum
from kdkit.task import Task, register_task


def accuracy_counts(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[Tensor]:
    """Number of samples whose label is among the top-k logits, for each k (clipped to #classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return [hits[:, : min(k, logits.shape[1])].any(dim=1).sum() for k in ks]


def cluster_accuracy(confusion: Tensor) -> float:
    """Clustering accuracy (%): the share of samples on the diagonal of the best one-to-one matching of clusters to
    classes (the Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``).

    Args:
        confusion: ``(clusters, classes)`` counts, ``confusion[p, c]`` = samples of class ``c`` put in cluster ``p``
            (need not be square: unmatched clusters or classes count as errors).

    Returns:
        ``100 * max_matching sum confusion[p, m(p)] / confusion.sum()`` (0 for an empty matrix).
    """
    from scipy.optimize import linear_sum_assignment

    counts = confusion.detach().double().cpu().numpy()
    rows, cols = linear_sum_assignment(counts, maximize=True)
    total = float(counts.sum())  # a Python float: numpy scalars in a checkpoint fail weights-only loading
    return 100.0 * float(counts[rows, cols].sum()) / total if total > 0 else 0.0


#: The top-k accuracies the task knows, by metric name.
TOP_K = {"top1": 1, "top5": 5}
#: The clustering accuracy of the novel classes, by metric name.
NOVEL = "novel_acc"


class AccuracyEvaluator:
    """The top-k accuracies of ``metrics`` (%), the novel classes' clustering accuracy (``novel_acc``, when asked
    for) and mean CE, summed on the device and reduced over processes once at the end.

    Args:
        device: Device of the sums.
        ctx: Distributed context.
        metrics: The metrics to report.
        novel: The novel classes (label indices), whose test samples ``novel_acc`` clusters by their argmax over the
            novel classes' logits.
    """

    def __init__(self, device: torch.device, ctx: DistContext, metrics: tuple[str, ...],
                 novel: tuple[int, ...] = ()) -> None:
        self.ctx = ctx
        self.names = [m for m in metrics if m in TOP_K]
        self.ks = tuple(TOP_K[m] for m in self.names)
        self.novel = torch.tensor(sorted(novel) if NOVEL in metrics else (), dtype=torch.int64, device=device)
        k = len(self.novel)
        # ce sum, the hits of each k, samples, then the novel confusion matrix (cluster x class), flattened
        self.totals = torch.zeros(len(self.ks) + 2 + k * k, dtype=torch.float64, device=device)

    def update(self, logits: Tensor, targets: Tensor) -> None:
        hits = accuracy_counts(logits, targets, self.ks)
        ce = F.cross_entropy(logits.float(), targets, reduction="sum")
        count = torch.tensor(len(targets), dtype=torch.float64, device=self.totals.device)
        self.totals[:len(self.ks) + 2] += torch.stack([ce.double(), *(h.double() for h in hits), count])
        if len(self.novel):
            self.totals[len(self.ks) + 2:] += self._novel_confusion(logits, targets)

    def _novel_confusion(self, logits: Tensor, targets: Tensor) -> Tensor:
        k = len(self.novel)
        is_novel = torch.isin(targets, self.novel)
        cluster = logits[is_novel][:, self.novel].argmax(1)  # slot among the novel classes' outputs
        truth = torch.searchsorted(self.novel, targets[is_novel])  # the class's position among the (sorted) novel
        return torch.bincount(cluster * k + truth, minlength=k * k).double()

    def compute(self) -> dict[str, float]:
        totals = all_reduce_sum(self.totals, self.ctx)
        ce, *hits, n = totals[:len(self.ks) + 2].tolist()
        n = max(n, 1.0)
        out = {"loss": ce / n, **{name: 100.0 * h / n for name, h in zip(self.names, hits, strict=True)}}
        if len(self.novel):
            k = len(self.novel)
            out[NOVEL] = cluster_accuracy(totals[len(self.ks) + 2:].view(k, k))
        return out


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
        novel: The novel classes to discover (``novel_acc``).
    """

    def __init__(self, task: Task, metrics: tuple[str, ...], device: torch.device, label_smoothing: float,
                 test_labels: tuple[Tensor, int] | None = None, novel: tuple[int, ...] = ()) -> None:
        self.task, self.metrics, self.device, self.label_smoothing = task, metrics, device, label_smoothing
        self.novel = novel
        ks = {name: k for name, k in TOP_K.items() if name in metrics}
        self._chance = dict(zip(ks, chance_accuracy(*test_labels, tuple(ks.values())), strict=True)) \
            if test_labels is not None else {}

    def targets(self, labels: Tensor, index: Tensor, split: str) -> Tensor:
        return labels

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return labelled_cross_entropy(logits, targets, self.label_smoothing)

    def train_score(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        labelled = targets != UNLABELLED  # an unlabelled sample is neither right nor wrong
        right = (logits.detach().argmax(1) == targets) & labelled
        return right.sum().float(), labelled.sum().float()

    def evaluator(self, ctx: DistContext) -> AccuracyEvaluator:
        return AccuracyEvaluator(self.device, ctx, self.metrics, self.novel)

    def chance(self) -> dict[str, float]:
        return dict(self._chance)


@register_task
class Classification(Task):
    """Single-label classification: cross-entropy with the labels, top-1/top-5 accuracy (%), best by top-1."""

    name = "classification"
    metrics = ("top1", "top5", NOVEL, "loss")
    best = "top1"
    loss_name = "ce"
    train_metric = "top1"
    deployed_output = "class logits (B, K); softmax gives the class probabilities"
    probabilities = "softmax"

    def metrics_for(self, data: Any) -> tuple[str, ...]:
        if data is None:  # unknown data: no novel classes to cluster
            return tuple(m for m in self.metrics if m != NOVEL)
        dropped = {"top5"} if data.num_classes <= TOP_K["top5"] else set()
        if not data.novel_classes:  # clustering accuracy is defined on novel classes only
            dropped.add(NOVEL)
        return tuple(m for m in self.metrics if m not in dropped)

    def bind(self, data: Any, device: torch.device, *, label_smoothing: float = 0.0,
             model: nn.Module | None = None) -> BoundClassification:
        # data may be None: the labels are the targets (chance level then unknown)
        test = (data.test_labels, data.num_classes) if data is not None else None
        novel = tuple(data.novel_classes) if data is not None else ()
        return BoundClassification(self, self.metrics_for(data), device, label_smoothing, test, novel)
