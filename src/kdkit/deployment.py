"""What a run folder records about the network it deploys (``deploy.json``): the input it takes and how that
input is normalised, its class names and its task, and where its test images come from.

The runner writes it when a run starts, so exporting a run, predicting with it or loading it
(:mod:`kdkit.export`) never has to know the training recipe's data section or the dataset reader's
statistics. Exported files embed the same record as their metadata.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdkit.checkpoint import atomic_write_text
from kdkit.errors import KdkitError

if TYPE_CHECKING:
    from kdkit.data.base import ImageData
    from kdkit.task import Task

#: The record's file in a run folder.
DEPLOY_FILE = "deploy.json"
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


def write_deployment(run_dir: Path, deployment: Deployment) -> Path:
    """Write ``run_dir/deploy.json`` atomically."""
    path = Path(run_dir) / DEPLOY_FILE
    atomic_write_text(path, json.dumps(deployment.to_dict(), indent=1))
    return path


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
