"""A finished run folder's deployed network, rebuilt from its ``recipe.yaml`` and a checkpoint.

The student is built by the planner (:func:`kdkit.build.plan_deployed`, the same stages a training run goes
through), loaded with the checkpoint as it was trained, then cut down to what it deploys
(:meth:`kdkit.distill.Student.deployment`): the network, plus the bridges that run at inference (a deploying bridge
such as a flow chain that replaces the classifier, a bridge that rewrites a tap); bridges that only serve a loss (a
regressor, ...) are left out, and so are their weights, and so are the peers a deployed member learned with.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from kdkit.build import DataShape, plan_deployed
from kdkit.checkpoint import WEIGHTS, pointed, read_weights, state_mismatch
from kdkit.data import SETTINGS, apply_setting, load_dataset, subset
from kdkit.deployment import DEPLOY_FILE, Deployment, deployment_of, read_deployment, write_deployment
from kdkit.distill import Student
from kdkit.errors import KdkitError
from kdkit.profile import Deployed
from kdkit.recipe import Recipe, recipe_from_dict
from kdkit.task import TASKS

#: Which checkpoint of a run is loaded: the best epoch's (what the summary's best metric is) or the last one.
CHECKPOINTS = ("best", "latest")


@dataclass
class DeployedRun:
    """A finished run's deployed network, loaded.

    Attributes:
        folder: The run folder.
        recipe: Its recipe (``recipe.yaml``).
        deployment: Its input, normalisation, class names and task (``deploy.json``).
        summary: Its ``summary.json``.
        checkpoint: The checkpoint folder the weights come from.
        student: The trained network with only the bridges it deploys.
        network: The deployed network in eval mode: normalised images ``(B, C, H, W)`` -> outputs ``(B, K)``.
    """

    folder: Path
    recipe: Recipe
    deployment: Deployment
    summary: dict[str, Any]
    checkpoint: Path
    student: Student
    network: Deployed


def trained_student(recipe: Recipe, deployment: Deployment) -> Student:
    """``recipe``'s student as it was trained (every bridge; fresh weights), for the input ``deployment`` records."""
    return plan_deployed(recipe, DataShape(len(deployment.classes), deployment.channels, deployment.size))


def load_weights(student: Student, tensors: dict[str, Tensor], what: str) -> None:
    """Load ``student``'s weights from ``tensors``, a file holding at least its keys (a checkpoint also holds the
    objective's: those are ignored).

    Raises:
        KdkitError: A weight the student needs is missing or has another shape.
    """
    expected = student.state_dict()
    mine = {key: value for key, value in tensors.items() if key in expected}
    detail = state_mismatch(student, mine)
    if detail:
        raise KdkitError(f"{what} does not fit the network its recipe builds: {detail}",
                         fix="load it with the kdkit version and recipe that wrote it", where=what)
    student.load_state_dict(mine, strict=True)


def describe(student: Student, recipe: Recipe) -> str:
    """The deployed network in words: the architecture and the bridges it runs."""
    members = recipe.trained_members()
    arch = members[recipe.deploy].arch
    text = f"{arch} (member {recipe.deploy!r} of peers {', '.join(members)})" if recipe.peers else arch
    for term in student.deployed_terms():
        bridge = student.bridges[term]
        where = f"up to tap {student.reads[term]!r}, then" if term == student.deploy_term else \
            f"with tap {student.reads[term]!r} rewritten by"
        text += f" {where} {type(bridge).__name__}({bridge.extra_repr()}) (term {term!r})"
    return text


def open_run(folder: str | Path, checkpoint: str = "best") -> DeployedRun:
    """Load a finished run's deployed network from its folder.

    Args:
        folder: A run folder written by ``kdkit run``.
        checkpoint: ``best`` (the epoch the summary's best metric comes from) or ``latest``.

    Raises:
        KdkitError: Not a run folder, training not finished, no such checkpoint, or weights that do not fit.
    """
    folder = Path(folder)
    if checkpoint not in CHECKPOINTS:
        raise KdkitError(f"unknown checkpoint {checkpoint!r}", choices=CHECKPOINTS, bad=checkpoint,
                         fix="use --checkpoint best or latest", where="--checkpoint")
    recipe_file = folder / "recipe.yaml"
    if not recipe_file.is_file():
        raise KdkitError(f"{str(folder)!r} is not a kdkit run folder (no recipe.yaml)",
                         fix="pass a folder written by `kdkit run` (the recipe's output.dir)", where=str(folder))
    latest = pointed(folder / "checkpoints", "latest")
    if not (folder / "summary.json").is_file():
        state = f"its last checkpoint, {latest.name}, is from an unfinished run" if latest else "it has no checkpoint"
        raise KdkitError(f"run folder {str(folder)!r} has no finished checkpoint: {state} (no summary.json)",
                         fix="finish the run first (`kdkit run RECIPE --resume` continues it), then export it",
                         where=str(folder))
    chosen = pointed(folder / "checkpoints", checkpoint)
    if chosen is None or not (chosen / WEIGHTS).is_file():
        have = [c for c in CHECKPOINTS if pointed(folder / "checkpoints", c) is not None]
        raise KdkitError(f"run folder {str(folder)!r} has no {checkpoint} checkpoint", choices=have, bad=checkpoint,
                         fix="use another --checkpoint, or retrain the run", where=str(folder / "checkpoints"))
    recipe = recipe_from_dict(yaml.safe_load(recipe_file.read_text()) or {}, source=str(recipe_file))
    deployment = read_deployment(folder) or record_deployment(folder, recipe)
    trained = trained_student(recipe, deployment)
    tensors, _ = read_weights(chosen / WEIGHTS)
    load_weights(trained, tensors, str(chosen / WEIGHTS))
    student = trained.deployment()
    summary = json.loads((folder / "summary.json").read_text())
    return DeployedRun(folder, recipe, deployment, summary, chosen, student, Deployed(student).eval())


def record_deployment(folder: Path, recipe: Recipe) -> Deployment:
    """Write ``deploy.json`` and its samples for a run folder from before the runner wrote them, from the recipe's
    data (its subset and setting applied, as the run's were) and task, saying so.

    Raises:
        KdkitError: The dataset cannot be read here, or the run's data setting ranked its images by the teacher's
            outputs (which exporting does not recompute).
    """
    spec = recipe.data
    data = load_dataset(spec.dataset, spec.root, **spec.params)
    if spec.subset is not None:
        data = subset(data, spec.subset, spec.subset_seed)
    if spec.setting is not None:
        if SETTINGS.get(spec.setting.name).reads_teacher(spec.setting.params):
            raise KdkitError(f"{str(folder)!r} was written by a kdkit that did not record {DEPLOY_FILE}, and its data "
                             f"setting {spec.setting.name!r} chose its images by the teacher's outputs",
                             fix="rerun it with this kdkit (the runner records the file)", where=str(folder))
        data = apply_setting(data, spec.setting.name, spec.setting.params, spec.setting.seed)
    task = TASKS.get(recipe.task, where="task")
    deployment = deployment_of(data, task, spec.dataset, spec.root, spec.params)
    path = write_deployment(folder, deployment, data)
    print(f"note: {str(folder)!r} was written by a kdkit that did not record {DEPLOY_FILE}; recorded it now from its "
          f"recipe's data {data.name!r} ({data.source}) and task {recipe.task!r}: {path}", file=sys.stderr)
    return deployment

