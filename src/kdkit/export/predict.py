"""``kdkit predict``: the top-k classes of image files, from a run folder or an exported file.

The preprocessing is the one the run recorded (a run folder's ``deploy.json``, an export's metadata): images are
converted as :mod:`kdkit.export.images` says, normalised exactly as the test loader does, and the outputs turned
into probabilities the way the task declares (softmax, or sigmoid per class).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from kdkit.data import normalize
from kdkit.deployment import Deployment
from kdkit.errors import KdkitError
from kdkit.export.formats import format_of_file
from kdkit.export.images import image_files, read_image
from kdkit.export.source import open_run


@dataclass
class Predictor:
    """What predictions run on.

    Attributes:
        deployment: The input, normalisation, classes and task.
        run: Normalised images -> outputs.
        what: The source in words.
    """

    deployment: Deployment
    run: Callable[[Tensor], Tensor]
    what: str


@dataclass
class Prediction:
    """The top classes of one image.

    Attributes:
        path: The image file.
        top: ``(class name, probability)``, most probable first.
        notes: How the file was converted (empty when it was used as it is).
    """

    path: Path
    top: list[tuple[str, float]]
    notes: list[str] = field(default_factory=list)


def open_predictor(source: str | Path, checkpoint: str = "best") -> Predictor:
    """A run folder's deployed network, or an exported file run by its runtime.

    Raises:
        KdkitError: Neither a finished run folder nor an export kdkit wrote.
    """
    source = Path(source)
    if source.is_dir():
        run = open_run(source, checkpoint)

        def eager(x: Tensor) -> Tensor:
            with torch.inference_mode():
                return run.network(x)

        return Predictor(run.deployment, eager, f"run folder {str(source)!r} ({checkpoint} checkpoint, "
                                                f"{run.checkpoint.name})")
    if not source.is_file():
        raise KdkitError(f"no run folder or exported file {str(source)!r}", fix="pass a run folder or a file "
                         "written by `kdkit export`", where=str(source))
    fmt = format_of_file(source)
    fmt.check_installed()
    exported = fmt.load(source)
    deployment = Deployment.from_dict(exported.metadata["deployment"], f"{source} (metadata)")
    return Predictor(deployment, exported, f"{fmt.name} export {str(source)!r}")


def probabilities(outputs: Tensor, kind: str) -> Tensor:
    """The outputs as probabilities: ``softmax`` over the classes or ``sigmoid`` per class.

    Raises:
        KdkitError: The task's outputs are not class scores.
    """
    if kind == "softmax":
        return outputs.float().softmax(1)
    if kind == "sigmoid":
        return outputs.float().sigmoid()
    raise KdkitError(f"the run's task deploys outputs that are not class scores ({kind!r})",
                     fix="use the network's outputs through kdkit.load_deployed")


def predict(predictor: Predictor, items: Sequence[str | Path], top_k: int = 5) -> list[Prediction]:
    """The ``top_k`` classes of each image file named by ``items`` (files or folders).

    Raises:
        KdkitError: ``top_k`` below 1, a path that is not an image, or one that cannot be converted safely.
    """
    deployment = predictor.deployment
    if top_k < 1:
        raise KdkitError(f"--top-k {top_k} asks for no class", fix="use --top-k 1 or more", where="--top-k")
    inputs = [read_image(path, deployment) for path in image_files(items)]
    x = normalize(torch.stack([i.pixels for i in inputs]), deployment.mean, deployment.std)
    probs = probabilities(predictor.run(x), deployment.probabilities)
    k = min(top_k, len(deployment.classes))
    values, indices = probs.topk(k, dim=1)
    return [Prediction(i.path, [(deployment.classes[c], float(p)) for p, c in zip(vs, cs, strict=True)], i.notes)
            for i, vs, cs in zip(inputs, values.tolist(), indices.tolist(), strict=True)]


def print_predictions(predictor: Predictor, predictions: list[Prediction], top_k: int) -> None:
    """Print one line per image (conversion notes on stderr)."""
    deployment = predictor.deployment
    kind = {"softmax": "softmax over the classes", "sigmoid": "sigmoid, each class on its own"}
    print(f"predict: {predictor.what}: task {deployment.task}, {len(deployment.classes)} classes, probabilities "
          f"by {kind.get(deployment.probabilities, deployment.probabilities)}")
    if top_k > len(deployment.classes):
        print(f"note: --top-k {top_k} is more than the {len(deployment.classes)} classes: showing all of them",
              file=sys.stderr)
    for prediction in predictions:
        for note in prediction.notes:
            print(f"note: {prediction.path}: {note}", file=sys.stderr)
        print(f"{prediction.path}: " + ", ".join(f"{name} {p:.4f}" for name, p in prediction.top))
