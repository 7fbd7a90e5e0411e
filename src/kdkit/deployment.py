"""What a run folder records about the network it deploys: ``deploy.json`` (the input it takes and how that input
is normalised, its class names and its task, where its images come from) and ``deploy_samples.safetensors`` (the
first test images of the run's data, as the network sees them, with their labels and dense targets).

The runner writes both when a run starts, so exporting a run, verifying the export, predicting with it or loading it
(:mod:`kdkit.export`) needs neither the training recipe's data section nor the dataset's files: a run folder copied
to another machine is enough. Exported files embed the same record as their metadata.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import save_file
from torch import Tensor

from kdkit.checkpoint import atomic_write_text, read_weights, reported_write
from kdkit.errors import KdkitError

if TYPE_CHECKING:
    from kdkit.data.base import ImageData
    from kdkit.task import Task

#: The record's file in a run folder.
DEPLOY_FILE = "deploy.json"
#: The stored test images (``images``: uint8 ``(N, C, H, W)``, ``labels``: int64 ``(N,)``) and their per-sample
#: targets (``target.<key>`` for each key of the data's ``test_targets``: boxes, masks, ...; what reports draw).
SAMPLES_FILE = "deploy_samples.safetensors"
#: Prefix of the stored targets' keys in :data:`SAMPLES_FILE`.
TARGET_PREFIX = "target."
#: Test images stored (the first ones of the run's test split).
SAMPLE_COUNT = 64
#: Version of the record's layout.
LAYOUT = 1


@dataclass(frozen=True)
class Deployment:
    """The deployed network's input, preprocessing, classes and task.

    Attributes:
        task: The task's registry name.
        probabilities: How its outputs become probabilities (:attr:`kdkit.task.Task.probabilities`).
        output: What the deployed network outputs, in words (:attr:`kdkit.task.Task.deployed_output`).
        channels: Image channels ``C`` the network takes.
        size: Image height and width (square images).
        mean: Per-channel mean subtracted from ``pixels / 255``.
        std: Per-channel standard deviation that divides it.
        classes: Class names, index ``i`` naming output ``i``.
        dataset: Where the run's images come from: ``name`` (registry), ``root``, ``params``, ``source`` (in
            words) and ``test_samples`` (what an export is verified on).
    """

    task: str
    probabilities: str
    output: str
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    dataset: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return self.channels, self.size, self.size

    def preprocessing(self) -> str:
        """The preprocessing in words, as exported files and model cards state it."""
        return (f"float32 (B, {self.channels}, {self.size}, {self.size}) = (pixels / 255 - mean) / std per channel, "
                f"mean {list(self.mean)}, std {list(self.std)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON), with the layout version."""
        return {"layout": LAYOUT, **asdict(self), "mean": list(self.mean), "std": list(self.std),
                "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> Deployment:
        """Read a record written by :meth:`to_dict`.

        Raises:
            KdkitError: A key is missing or the layout is newer than this kdkit's.
        """
        if not isinstance(data, dict) or data.get("layout", LAYOUT + 1) > LAYOUT:
            raise KdkitError(f"{where} is not a deploy record this kdkit can read (layout "
                             f"{data.get('layout') if isinstance(data, dict) else None!r}, this kdkit reads {LAYOUT})",
                             fix="use the kdkit version that wrote it, or rerun the training", where=where)
        try:
            return cls(task=str(data["task"]), probabilities=str(data["probabilities"]), output=str(data["output"]),
                       channels=int(data["channels"]), size=int(data["size"]),
                       mean=tuple(float(v) for v in data["mean"]), std=tuple(float(v) for v in data["std"]),
                       classes=tuple(str(c) for c in data["classes"]), dataset=dict(data.get("dataset") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise KdkitError(f"{where} is incomplete or damaged ({type(exc).__name__}: {exc})", where=where,
                             fix="rerun the training (the runner writes it), or restore the file") from None


def deployment_of(data: ImageData, task: Task, dataset: str, root: str | None, params: dict[str, Any]) -> Deployment:
    """The record of a run on ``data`` for ``task``; ``dataset``, ``root`` and ``params`` are how the recipe loads
    it (a relative root is made absolute: the record must not depend on the working folder)."""
    return Deployment(
        task=task.name, probabilities=task.probabilities, output=task.deployed_output, channels=data.in_channels,
        size=data.image_size, mean=data.mean, std=data.std, classes=data.classes,
        dataset={"name": dataset, "root": str(Path(root).resolve()) if root is not None else None,
                 "params": dict(params), "source": data.source, "test_samples": len(data.test_labels)})


def write_deployment(run_dir: Path, deployment: Deployment, data: ImageData) -> Path:
    """Write ``run_dir``'s ``deploy_samples.safetensors`` (the first :data:`SAMPLE_COUNT` test images of ``data``,
    their labels and their ``test_targets``) then ``deploy.json``, each atomically (the record last: a folder that
    has it has both).

    Raises:
        KdkitError: A write failed (e.g. the disk is full); the previous files are kept.
    """
    samples = Path(run_dir) / SAMPLES_FILE
    tmp = samples.with_name(f".{samples.stem}.tmp-{os.getpid()}{samples.suffix}")
    with reported_write("deploy samples", samples, fix="free space on that disk and run the command again"):
        try:
            targets = {f"{TARGET_PREFIX}{key}": value[:SAMPLE_COUNT].contiguous().clone()
                       for key, value in data.test_targets.items()}
            save_file({"images": data.test_images[:SAMPLE_COUNT].contiguous().clone(),
                       "labels": data.test_labels[:SAMPLE_COUNT].contiguous().clone(), **targets}, str(tmp))
            os.replace(tmp, samples)
        finally:
            tmp.unlink(missing_ok=True)
    path = Path(run_dir) / DEPLOY_FILE
    atomic_write_text(path, json.dumps(deployment.to_dict(), indent=1))
    return path


def read_samples(run_dir: Path) -> tuple[Tensor, Tensor]:
    """The stored test images (``uint8`` ``(N, C, H, W)``) and labels of ``run_dir``.

    Raises:
        KdkitError: The file is missing, damaged or not what :func:`write_deployment` writes.
    """
    tensors = _samples(run_dir)
    return tensors["images"], tensors["labels"]


def read_sample_targets(run_dir: Path) -> dict[str, Tensor]:
    """The stored test images' targets of ``run_dir`` by the data's key (``boxes``, ``semantic``, ...); empty for a
    dataset without per-sample targets, or a folder written before kdkit stored them.

    Raises:
        KdkitError: The file is missing, damaged or not what :func:`write_deployment` writes.
    """
    return {key.removeprefix(TARGET_PREFIX): value for key, value in _samples(run_dir).items()
            if key.startswith(TARGET_PREFIX)}


def _samples(run_dir: Path) -> dict[str, Tensor]:
    """Every tensor of ``run_dir``'s :data:`SAMPLES_FILE`, checked to be what :func:`write_deployment` writes."""
    path = Path(run_dir) / SAMPLES_FILE
    if not path.is_file():
        raise KdkitError(f"run folder {str(run_dir)!r} has {DEPLOY_FILE} but no {SAMPLES_FILE}",
                         fix="restore the file, or delete deploy.json too (kdkit then records both again from the "
                             "recipe's dataset)", where=str(path))
    tensors, _ = read_weights(path)
    others = set(tensors) - {"images", "labels"}
    if not {"images", "labels"} <= set(tensors) or any(not key.startswith(TARGET_PREFIX) for key in others):
        raise KdkitError(f"{str(path)!r} holds {sorted(tensors)}, not images, labels and {TARGET_PREFIX}* targets",
                         where=str(path), fix="restore the file, or delete it and deploy.json (kdkit records both "
                                              "again)")
    return tensors


def read_deployment(run_dir: Path) -> Deployment | None:
    """The record in ``run_dir`` (``None`` when the folder has none).

    Raises:
        KdkitError: The file is not valid JSON or not a complete record.
    """
    path = Path(run_dir) / DEPLOY_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KdkitError(f"{str(path)!r} is not valid JSON ({exc})", where=str(path),
                         fix="rerun the training (the runner writes it), or restore the file") from None
    return Deployment.from_dict(data, str(path))
