"""The contract of a *task*: what a batch's targets are, the supervised loss, the metrics, and what picks "best".

The engine, summaries, reports and benchmarks read a task's metrics by name; none of them knows top-1.
A task lives in one module under :mod:`kdkit.tasks` (or an installed package, through the
``kdkit.plugins`` entry-point group) and registers one :class:`Task` in :data:`TASKS`.

A recipe picks one (``task: classification`` by default). Targets come from the dataset: the labels, or
a named entry of :attr:`kdkit.data.ImageData.train_targets` read by the batch's sample indices, so the
loaders, the teacher cache and every batch transform stay unchanged. How later tasks fit the same
contract (they add files, not engine branches):

* **detection / segmentation**: :attr:`Task.target` names the boxes or masks, :meth:`Task.bind` gives the
  detector's loss and COCO-style mAP / mIoU evaluators; the deployed output is boxes or masks.
* **generation** (a few-step diffusion student): the supervised loss is the denoising objective, the
  evaluator samples with the deployed sampler and scores FID.
* **dataset condensation**: what is trained is a synthetic dataset (a method's ``param_groups``); the
  evaluator trains fresh students on it and reports their accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

from torch import Tensor, nn

from kdkit.registry import Registry

if TYPE_CHECKING:
    import torch

    from kdkit.data.base import ImageData
    from kdkit.distributed import DistContext


@dataclass(frozen=True)
class Drawing:
    """What a report draws over one image: boxes and/or a class mask, classes indexing the data's class names.

    Attributes:
        boxes: ``(D, 4)`` float boxes in pixels, ``x0, y0, x1, y1``.
        classes: ``(D,)`` int64, each box's class (an index into the class names).
        scores: ``(D,)`` each box's score, or ``None`` (ground truth).
        mask: ``(H, W)`` int64 class map (an index into the class names; -1 where nothing is drawn: background,
            void), or ``None``.
    """

    boxes: Tensor
    classes: Tensor
    scores: Tensor | None = None
    mask: Tensor | None = None


class Evaluator(Protocol):
    """Accumulates a task's metrics over an evaluation pass (all processes' batches under DDP)."""

    def update(self, logits: Tensor, targets: Tensor) -> None:
        """Add one batch: the deployed network's outputs and the batch's targets."""

    def compute(self) -> dict[str, float]:
        """The metrics over every batch seen (reduced over processes), by name; higher is better except ``loss``."""


class BoundTask(Protocol):
    """A task bound to one run's data and device (what the engine calls)."""

    task: Task
    #: The metrics this run reports (:meth:`Task.metrics_for` its data), in the task's order.
    metrics: tuple[str, ...]

    def targets(self, labels: Tensor, index: Tensor, split: str) -> Tensor:
        """The targets of a batch of ``split`` (``"train"`` or ``"test"``) from its labels and sample indices."""

    def follow(self, targets: Tensor, view: Tensor) -> Tensor:
        """The training targets of the batch's images after their random crop and flip: ``targets`` (from
        :meth:`targets`) moved by each sample's ``view`` ``(dy, dx, flip)`` (:data:`kdkit.data.augment.VIEW_COLUMNS`).
        Called only for a task with :attr:`Task.pixel_targets`; pixels that come from the padding are ignored."""

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The supervised loss (a mean over the batch's labelled samples, float32 or the logits' precision if
        higher; 0 for a batch without one: unlabelled samples, :data:`kdkit.data.base.UNLABELLED`, are skipped)."""

    def train_score(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """The sum over the batch of the per-sample training score reported as ``train_<Task.train_metric>``, and
        the number of samples scored (unlabelled ones are not): two 0-dim tensors, kept on the device."""

    def evaluator(self, ctx: DistContext) -> Evaluator:
        """A fresh evaluator of the task's metrics (reduced over the processes of ``ctx``)."""

    def chance(self) -> dict[str, float]:
        """What each metric scores on the test split for a model that learned nothing (e.g. one that always
        answers the commonest class), for the metrics where the task defines it; empty when bound without data.
        The engine warns when the metric that picks the best epoch stays there."""


class Task:
    """Base class of a registered task (one instance per task in :data:`TASKS`).

    Attributes:
        name: Registry name (``task:`` in a recipe).
        target: Key of the dataset's per-sample targets (``ImageData.train_targets``), or ``None`` for its labels.
        metrics: Names the evaluator reports (as ``test_<name>`` per epoch).
        best: The metric that picks the best epoch by default (higher is better).
        loss_name: Log key of the supervised loss.
        train_metric: Name of the training score (``train_<name>``).
        deployed_output: What the deployed network outputs, in words (for reports and exports).
        pixel_targets: The targets are tied to pixel positions (boxes, masks): the bound task moves them with each
            batch's random crop and flip (:meth:`BoundTask.follow`); any other change of the images' geometry (a
            strong view, a method's learned augmentation) would misalign them, so a recipe using it is refused.
        probabilities: How the deployed outputs become class probabilities: ``"softmax"`` over the classes,
            ``"sigmoid"`` for each class on its own, or ``""`` when they are not class scores (``kdkit predict``,
            exports and :func:`kdkit.export.load_deployed` apply it).
        drawn: What :meth:`drawn_outputs` draws of the deployed network's outputs, in words (a report's caption);
            empty for a task that draws nothing.
        logits_layout: What the networks' ``logits`` tap holds (one of :data:`LOGITS_LAYOUTS`): a loss that reads
            it as one kind of output (:attr:`kdkit.losses.base.DistillLoss.reads_logits`, e.g. KD's softmax over
            classes) is refused before training on a task whose logits are another kind, unless a bridge maps them.
    """

    name: ClassVar[str] = ""
    target: ClassVar[str | None] = None
    metrics: ClassVar[tuple[str, ...]] = ()
    best: ClassVar[str] = ""
    loss_name: ClassVar[str] = "loss"
    train_metric: ClassVar[str] = ""
    deployed_output: ClassVar[str] = ""
    probabilities: ClassVar[str] = ""
    pixel_targets: ClassVar[bool] = False
    logits_layout: ClassVar[str] = "classes"
    drawn: ClassVar[str] = ""

    def outputs(self, num_classes: int) -> int:
        """The outputs (channels) of the task's networks on data with ``num_classes`` classes. Default: one per
        class; segmentation adds background."""
        return num_classes

    def metrics_for(self, data: ImageData | None) -> tuple[str, ...]:
        """The metrics meaningful on ``data`` (what a run on it reports); ``None`` (data unknown): all of them.

        Default: all of :attr:`metrics`. A task drops those that say nothing on some data (top-5 accuracy
        with five classes or fewer is 100 % by construction)."""
        return self.metrics

    def selectable(self, data: ImageData | None = None) -> list[str]:
        """The metrics that can pick the best epoch on ``data`` (higher is better: every metric but ``loss``)."""
        return higher_is_better(self.metrics_for(data))

    def check_data(self, data: ImageData) -> str | None:
        """Why ``data`` cannot serve this task (``None`` when it can). Default: it has the :attr:`target`."""
        if self.target is not None and self.target not in data.train_targets:
            have = ", ".join(sorted(data.train_targets)) or "none"
            return (f"needs per-sample {self.target!r} targets, which dataset {data.name!r} does not provide "
                    f"(it has: {have})")
        return None

    def bind(self, data: ImageData, device: torch.device, *, label_smoothing: float = 0.0,
             model: nn.Module | None = None) -> BoundTask:
        """The task for one run on ``data`` (targets moved to ``device`` once) and the trained ``model``, whose declared
        output layout a dense task reads (a detector's ``dense_spec``); other tasks ignore it."""
        raise NotImplementedError


    def drawn_targets(self, targets: dict[str, Tensor]) -> list[Drawing] | None:
        """The ground truth a report draws over each image, from a batch of the data's per-sample targets (the
        ``test_targets`` entries, batch first); ``None`` when the task draws nothing (default: a label is shown by
        the report's tables, not over the image)."""
        return None

    def drawn_outputs(self, outputs: Tensor, model: nn.Module, image_size: int) -> list[Drawing]:
        """What a report draws over each image from the deployed network's outputs on a batch (:attr:`drawn` says
        what, in words); ``model`` is the trained network, whose declared output layout a dense task reads.

        Raises:
            NotImplementedError: The task draws nothing (:meth:`drawn_targets` is ``None``).
        """
        raise NotImplementedError(f"task {self.name!r} draws no predictions")


def higher_is_better(metrics: tuple[str, ...]) -> list[str]:
    """The metrics among ``metrics`` that can pick a best epoch: every one but ``loss``."""
    return [m for m in metrics if m != "loss"]


TASKS: Registry[Task] = Registry("task", fix="run `kdkit ls tasks`")
#: The values of :attr:`Task.probabilities`.
PROBABILITIES = ("softmax", "sigmoid", "")
#: The values of :attr:`Task.logits_layout`, each with what it means.
LOGITS_LAYOUTS = {
    "classes": "class scores (B, K), one class per sample (softmax)",
    "labels": "independent per-class scores (B, K), several labels per sample (sigmoid)",
    "pixels": "per-pixel class scores (B, K, H, W)",
    "pixels_boundary": "per-pixel class scores and a boundary score (B, K + 2, H, W): classes 0..K (softmax), the last "
                       "channel the boundary logit (sigmoid)",
    "detections": "dense per-location detector outputs (B, L, K + box + 1)",
    "anchor_detections": "dense per-anchor detector outputs (B, L * A, K + 4): class logits, box deltas on anchors "
                         "(RetinaNet; a network's own `logits_layout` on task detection)",
    "two_stage_detections": "a two-stage detector's anchor rows (objectness, box deltas) then per-image proposal rows "
                            "(validity, box, K + 1 class logits, class-specific deltas) (Faster R-CNN; a network's own "
                            "`logits_layout` on task detection)",
}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: register one instance of a :class:`Task` subclass under ``cls.name``."""
    if not cls.name or not cls.metrics or cls.best not in cls.metrics:
        raise TypeError(f"{cls.__name__} needs a `name`, its `metrics` and a `best` metric among them")
    if cls.probabilities not in PROBABILITIES:
        raise TypeError(f"{cls.__name__}.probabilities is {cls.probabilities!r}; use one of {PROBABILITIES}")
    if cls.logits_layout not in LOGITS_LAYOUTS:
        raise TypeError(f"{cls.__name__}.logits_layout is {cls.logits_layout!r}; use one of {list(LOGITS_LAYOUTS)}")
    TASKS.add(cls.name, cls(), (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "")
    return cls


def tasks_serving(data: ImageData) -> list[str]:
    """The registered tasks whose targets ``data`` provides."""
    return [name for name, task in TASKS.items() if task.check_data(data) is None]
