"""The in-memory dataset type shared by every reader, and a class-balanced subset helper.

Small image datasets are held whole in memory as ``uint8`` tensors ``(N, C, H, W)``; conversion
to float, normalisation and augmentation happen later on whole batches (see :mod:`kdkit.data.augment`).

An unlabelled training sample has the label :data:`UNLABELLED` (``-1``), the one way kdkit represents one:
the supervised loss and the training accuracy skip it, distillation terms that do not read labels use it,
and loaders, batch transforms and the teacher cache see an ordinary index. Test labels are always labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kdkit.errors import KdkitError

#: The label of an unlabelled training sample (see the module docstring).
UNLABELLED = -1


@dataclass(frozen=True, eq=False, repr=False)
class ImageData:
    """A labelled image dataset split into train and test, held in memory.

    Images must be square (``H == W``): models are built from a single ``image_size``. Readers of
    non-square data resize or crop to a square before constructing this.

    Attributes:
        name: Registry name, e.g. ``"fashion_mnist"`` (a subset appends ``-subsetN-seedS``).
        train_images: ``uint8`` tensor ``(N, C, H, W)``; made contiguous on construction.
        train_labels: ``int64`` tensor ``(N,)`` with values in ``[0, num_classes)``, or :data:`UNLABELLED`
            for a sample whose label the run does not see.
        test_images: ``uint8`` tensor ``(M, C, H, W)`` with the same ``C, H, W`` as train.
        test_labels: ``int64`` tensor ``(M,)``.
        classes: Class names, index ``i`` naming label ``i``.
        mean: Per-channel mean of the train images in ``[0, 1]`` units (computed, or the published values).
        std: Per-channel standard deviation in the same units.
        source: Human-readable origin, e.g. ``"/usr/share/datasets/fashion-mnist (idx)"``.
        train_targets: Optional dense targets of the train images beyond the class label, by name (e.g.
            ``"semantic"`` masks or ``"boxes"``); every tensor's first dimension is the train image count.
            Empty for plain classification datasets.
        test_targets: The same for the test images.
        novel_classes: Classes of the test split that no training sample is labelled with and that the run must
            discover (novel class discovery): their training samples are unlabelled, and the classification task
            scores them by clustering accuracy (``novel_acc``). Empty for every other dataset.
        old_classes: Classes a previous class-incremental step learned (``class_incremental`` step 2): this
            run's targets leave them unlabelled (background pixels, dropped boxes), and the segmentation and
            detection tasks score old and new classes apart (``miou_old`` / ``miou_new``, ``map_old`` /
            ``map_new``). Empty for every other dataset.
        warnings: What the reader left out of the files and why (e.g. skipped annotations, counted per file), one
            sentence each; a run prints them and records them in its summary. Empty when nothing was left out.

    Raises:
        KdkitError: On a wrong dtype, shape, label range, mean/std length, or a target whose length
            differs from its split's.
    """

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    train_targets: dict[str, Tensor] = field(default_factory=dict)
    test_targets: dict[str, Tensor] = field(default_factory=dict)
    novel_classes: tuple[int, ...] = ()
    old_classes: tuple[int, ...] = ()
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Check dtypes, shapes, label range and mean/std; make the images contiguous."""
        where = f"dataset {self.name!r}"
        fix = "this is a bug in the dataset reader; please report it with the dataset's source"
        for attr in ("train_images", "train_labels", "test_images", "test_labels"):
            if not isinstance(getattr(self, attr), Tensor):
                raise KdkitError(f"{attr} must be a torch.Tensor, got {type(getattr(self, attr)).__name__}",
                                 fix=fix, where=where)
        for split in ("train", "test"):
            images: Tensor = getattr(self, f"{split}_images")
            labels: Tensor = getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.ndim != 4:
                raise KdkitError(f"{split}_images must be uint8 (N, C, H, W), got {images.dtype} "
                                 f"{tuple(images.shape)}", fix=fix, where=where)
            if labels.dtype != torch.int64 or labels.ndim != 1:
                raise KdkitError(f"{split}_labels must be int64 (N,), got {labels.dtype} {tuple(labels.shape)}",
                                 fix=fix, where=where)
            if labels.shape[0] != images.shape[0]:
                raise KdkitError(f"{split} split has {images.shape[0]} images but {labels.shape[0]} labels",
                                 fix=fix, where=where)
            if not images.is_contiguous():
                object.__setattr__(self, f"{split}_images", images.contiguous())
        if self.train_images.shape[0] == 0:
            raise KdkitError("the train split is empty", fix=fix, where=where)
        c, h, w = self.train_images.shape[1:]
        if tuple(self.test_images.shape[1:]) != (c, h, w):
            raise KdkitError(f"train images are {(c, h, w)} but test images are {tuple(self.test_images.shape[1:])}",
                             fix="train and test images must have the same channels and size", where=where)
        if h != w:
            raise KdkitError(f"images must be square, got H={h}, W={w}",
                             fix="resize or crop the images to a square before building ImageData", where=where)
        object.__setattr__(self, "classes", tuple(str(n) for n in self.classes))
        if not self.classes:
            raise KdkitError("no class names given", fix=fix, where=where)
        for split in ("train", "test"):
            labels = getattr(self, f"{split}_labels")
            lowest = UNLABELLED if split == "train" else 0  # only training samples may be unlabelled
            if labels.numel() and (int(labels.min()) < lowest or int(labels.max()) >= len(self.classes)):
                raise KdkitError(f"{split} labels span [{int(labels.min())}, {int(labels.max())}] but there are "
                                 f"{len(self.classes)} classes" + (f" ({UNLABELLED} marks an unlabelled training "
                                 "sample)" if split == "train" else ""), fix=fix, where=where)
        self._check_novel(where, fix)
        object.__setattr__(self, "warnings", tuple(str(w) for w in self.warnings))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != c or len(self.std) != c:
            raise KdkitError(f"mean/std have {len(self.mean)}/{len(self.std)} values but images have {c} channels",
                             fix="give one mean and one std per channel", where=where)
        if any(not s > 0 for s in self.std):
            raise KdkitError(f"std must be positive, got {self.std}", fix="give a positive std per channel",
                             where=where)
        for split in ("train", "test"):
            targets = getattr(self, f"{split}_targets")
            n = getattr(self, f"{split}_images").shape[0]
            if not isinstance(targets, dict):
                raise KdkitError(f"{split}_targets must be a dict of tensors, got {type(targets).__name__}",
                                 fix=fix, where=where)
            for key, value in targets.items():
                if not isinstance(key, str) or not isinstance(value, Tensor) or value.ndim == 0:
                    got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                    raise KdkitError(f"{split}_targets[{key!r}] must be a tensor with a first (image) dimension "
                                     f"under a str key, got {got}", fix=fix, where=where)
                if value.shape[0] != n:
                    raise KdkitError(f"{split}_targets[{key!r}] has {value.shape[0]} entries but the {split} split "
                                     f"has {n} images", fix=fix, where=where)
            # A private copy: the dataclass is frozen, so a caller's later edits to its dict must not leak in.
            object.__setattr__(self, f"{split}_targets", dict(targets))

    def _check_novel(self, where: str, fix: str) -> None:
        novel = tuple(int(c) for c in self.novel_classes)
        object.__setattr__(self, "novel_classes", novel)
        if any(not 0 <= c < len(self.classes) for c in novel) or len(set(novel)) != len(novel):
            raise KdkitError(f"novel_classes {novel} must be distinct class indices in [0, {len(self.classes)})",
                             fix=fix, where=where)
        old = tuple(int(c) for c in self.old_classes)
        object.__setattr__(self, "old_classes", old)
        if any(not 0 <= c < len(self.classes) for c in old) or len(set(old)) != len(old):
            raise KdkitError(f"old_classes {old} must be distinct class indices in [0, {len(self.classes)})",
                             fix=fix, where=where)
        labelled = [c for c in novel if bool((self.train_labels == c).any())]
        if labelled:
            raise KdkitError(f"novel classes {labelled} have labelled training samples; a novel class is one the run "
                             f"never sees a label of", fix=fix, where=where)

    @property
    def num_labelled(self) -> int:
        """Training samples with a label (not :data:`UNLABELLED`)."""
        return int((self.train_labels != UNLABELLED).sum())

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        """Image channels ``C``."""
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        """Image height, equal to the width (images are square)."""
        return int(self.train_images.shape[2])

    def __repr__(self) -> str:
        """Shapes and origin only (the default repr would print the tensors)."""
        return (f"ImageData(name={self.name!r}, train={tuple(self.train_images.shape)}, "
                f"test={tuple(self.test_images.shape)}, classes={self.num_classes}, source={self.source!r})")


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of ``uint8`` images, in ``[0, 1]`` units.

    Accumulates in float64 over chunks of ``chunk`` images, so memory stays small for large sets.

    Args:
        images: ``uint8`` tensor ``(N, C, H, W)`` with ``N > 0``.
        chunk: Images per accumulation step.

    Returns:
        ``(mean, std)``, each a tuple with one float per channel (population std).
    """
    n, c, h, w = images.shape
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, n, chunk):
        x = images[start:start + chunk].to(torch.float64)
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = n * h * w
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0.0)
    return tuple((mean / 255).tolist()), tuple((var.sqrt() / 255).tolist())


def subset(data: ImageData, n: int, seed: int) -> ImageData:
    """Take a class-balanced random subset of the train split; the test split is kept whole.

    Each class gets ``n // num_classes`` images, and the remainder goes one each to randomly chosen
    classes. A class with too few images contributes all it has and the others make up the difference.
    The chosen images keep their original order. ``mean``/``std`` are kept from ``data`` (normalising
    with the full set's statistics is what a subset run should do). Dense ``train_targets`` are indexed
    like the images, so they stay aligned; ``test_targets`` are kept whole with the test split.

    Args:
        data: The dataset.
        n: Number of train images to keep, ``num_classes <= n <= N``.
        seed: Seed of the random choice; the same seed gives the same subset.

    Returns:
        A new :class:`ImageData` whose name and source note the subset.

    Raises:
        KdkitError: If ``n`` is out of range.
    """
    total = data.train_images.shape[0]
    if not isinstance(n, int) or isinstance(n, bool) or n > total or n < data.num_classes:
        raise KdkitError(f"subset size {n!r} is out of range for {data.name!r} ({total} train images, "
                         f"{data.num_classes} classes)",
                         fix=f"choose a subset size between {data.num_classes} and {total}", where="data.subset")
    if data.num_labelled < total:
        raise KdkitError(f"{data.name!r} has unlabelled training samples; a class-balanced subset needs every label",
                         fix="take the subset of the labelled dataset (data.subset applies before data.setting)",
                         where="data.subset")
    chosen = balanced_indices(data.train_labels, data.num_classes, n, seed)
    return ImageData(
        name=f"{data.name}-subset{n}-seed{seed}",
        train_images=data.train_images[chosen].contiguous(),
        train_labels=data.train_labels[chosen].contiguous(),
        test_images=data.test_images,
        test_labels=data.test_labels,
        classes=data.classes,
        mean=data.mean,
        std=data.std,
        source=f"{data.source}; class-balanced train subset of {n}/{total} (subset seed {seed})",
        train_targets={key: value[chosen].contiguous() for key, value in data.train_targets.items()},
        test_targets=data.test_targets,
        novel_classes=data.novel_classes,
        warnings=data.warnings,
    )


def balanced_indices(labels: Tensor, num_classes: int, n: int, seed: int) -> Tensor:
    """Indices of a class-balanced random choice of ``n`` of ``labels``, sorted (the rule of :func:`subset`).

    Each class gets ``n // num_classes``, the remainder one each to randomly chosen classes; a class with too few
    samples gives all it has and the others make up the difference.

    Args:
        labels: ``int64`` labels in ``[0, num_classes)``.
        num_classes: Number of classes.
        n: How many to choose, ``<= len(labels)``.
        seed: Seed of the choice; the same seed gives the same indices.

    Returns:
        ``int64`` indices into ``labels``, ascending.
    """
    total = len(labels)
    gen = torch.Generator().manual_seed(seed)
    k = num_classes
    # Rank of each image within its class, in a random order; then a random order of the classes.
    perm = torch.randperm(total, generator=gen)
    class_order = torch.randperm(k, generator=gen)
    shuffled = labels[perm]
    order = torch.argsort(shuffled, stable=True)  # groups the shuffled images by class
    counts = torch.bincount(shuffled, minlength=k)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(total) - starts[shuffled[order]]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    # Taking the first n by (rank, class position) fills classes round-robin: balanced, capacity-aware.
    key = rank * k + torch.argsort(class_order)[shuffled]
    return perm[torch.argsort(key)[:n]].sort().values



def hold_out(data: ImageData, fraction: float, seed: int) -> ImageData:
    """Carve a validation split out of the train split: a class-balanced random ``fraction`` of the training
    images becomes the evaluated split (``test_*``) and the rest stays the train split; the original test split is
    dropped, so nothing downstream (evaluation, deployment samples, summaries) can read it.

    This is what a hyperparameter search scores its trials on: choosing hyperparameters by test accuracy would
    make the reported test accuracy optimistic.

    Args:
        data: The dataset (after ``subset``); every training sample labelled (the held-out part is scored).
        fraction: Share of the training images held out, in ``(0, 1)``; at least one per class, at least one
            left to train on per class.
        seed: Seed of the choice; the same seed gives the same split.

    Returns:
        A new :class:`ImageData` whose name and source note the split.

    Raises:
        KdkitError: If ``fraction`` leaves a split without an image of some class, or samples are unlabelled.
    """
    total = data.train_images.shape[0]
    n = round(total * fraction)
    if data.num_labelled < total:
        raise KdkitError(f"{data.name!r} has unlabelled training samples; a validation split is scored by its labels",
                         fix="apply data.validation to a labelled dataset (it is carved before data.setting)",
                         where="data.validation")
    if not data.num_classes <= n <= total - data.num_classes:
        raise KdkitError(f"validation fraction {fraction!r} holds out {n} of {total} training images; it needs "
                         f"between {data.num_classes} and {total - data.num_classes} ({data.num_classes} classes)",
                         fix="choose a fraction that holds out at least one image per class and leaves one to train",
                         where="data.validation.fraction")
    held = balanced_indices(data.train_labels, data.num_classes, n, seed)
    keep = torch.ones(total, dtype=torch.bool)
    keep[held] = False
    kept = keep.nonzero().squeeze(1)
    return ImageData(
        name=f"{data.name}-val{n}-seed{seed}",
        train_images=data.train_images[kept].contiguous(),
        train_labels=data.train_labels[kept].contiguous(),
        test_images=data.train_images[held].contiguous(),
        test_labels=data.train_labels[held].contiguous(),
        classes=data.classes,
        mean=data.mean,
        std=data.std,
        source=f"{data.source}; validation split of {n}/{total} training images (seed {seed}) evaluated instead "
               "of the test split",
        train_targets={key: value[kept].contiguous() for key, value in data.train_targets.items()},
        test_targets={key: value[held].contiguous() for key, value in data.train_targets.items()},
        novel_classes=data.novel_classes,
    )
