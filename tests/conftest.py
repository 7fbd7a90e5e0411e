"""Shared fixtures: tiny recipes on scikit-learn's digits (loads in milliseconds, no files needed)."""

from __future__ import annotations

import copy
import math
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

from kdkit.models import build_model

TINY: dict[str, Any] = {
    "name": "tiny",
    "model": {"arch": "cnn_student"},
    "data": {"dataset": "digits", "subset": 200, "augment": {"hflip": False, "crop_padding": 1}},
    "train": {"epochs": 2, "batch_size": 32, "eval_batch_size": 128, "optimizer": {"name": "sgd", "lr": 0.05},
              "schedule": {"name": "cosine", "warmup_steps": 5}, "seed": 0},
    "output": {"progress": False},
}


@pytest.fixture
def teacher_file(tmp_path: Path) -> Path:
    """A (randomly initialised) cnn_teacher for digits, saved as safetensors."""
    torch.manual_seed(123)
    model = build_model("cnn_teacher", num_classes=10, in_channels=1, image_size=8)
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, Any]:
    """A fresh tiny recipe dict writing into tmp_path/run."""
    recipe = copy.deepcopy(TINY)
    recipe["output"]["dir"] = str(tmp_path / "run")
    return recipe


@pytest.fixture
def tiny_kd(tiny: dict[str, Any], teacher_file: Path) -> dict[str, Any]:
    """The tiny recipe with a teacher and a KD term."""
    tiny["teacher"] = {"arch": "cnn_teacher", "checkpoint": str(teacher_file)}
    tiny["distill"] = [{"loss": "kd", "weight": 0.9, "temperature": 4}]
    tiny["train"]["ce_weight"] = 0.1
    return tiny


@pytest.fixture
def cached(tiny_kd: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """The tiny KD recipe reading a 3-view cache in tmp_path/cache."""
    tiny_kd["teacher"]["cache"] = {"views": 3, "dir": str(tmp_path / "cache")}
    return tiny_kd


def built_cache(recipe_dict: dict[str, Any], overrides: list[str] | None = None) -> tuple[Any, ...]:
    """Open (building when missing) the teacher cache of a recipe dict: recipe, plan, cache, replay, teacher."""
    from kdkit.build import plan
    from kdkit.recipe import recipe_from_dict
    from kdkit.teacher_cache import open_cache

    recipe = recipe_from_dict(recipe_dict, overrides)
    built = plan(recipe, training=True)
    cache, replay, teacher = open_cache(recipe, built, progress=False)
    return recipe, built, cache, replay, teacher


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    """Write a recipe dict as YAML and return the path."""
    path.write_text(yaml.safe_dump(recipe))
    return path


def edit_recipe(recipe: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """Apply ``{dotted.key: value}`` to a recipe dict with :func:`kdkit.recipe.set_by_path`; a key one past the end
    of a list (``distill.1`` on a one-term recipe) appends the value. Returns the recipe."""
    from kdkit.recipe import set_by_path

    for key, value in changes.items():
        *path, last = key.split(".")
        node: Any = recipe
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list) and last.isdigit() and int(last) == len(node):
            node.append(value)
        else:
            set_by_path(recipe, key, value)
    return recipe


def straight_and_resumed(recipe: dict[str, Any], tmp_path: Path, step: int) -> tuple[Path, Path]:
    """Run ``recipe`` once uninterrupted and once interrupted (SIGINT) at global ``step`` then resumed; return the
    two run folders, for tests that compare them."""
    from kdkit.engine import Interrupted
    from kdkit.recipe import recipe_from_dict
    from kdkit.runner import run_recipe

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_recipe(recipe_from_dict(recipe, [f"output.dir={straight}"]))
    interrupted = recipe_from_dict(recipe, [f"output.dir={broken}"])
    with pytest.raises(Interrupted):
        run_recipe(interrupted, callbacks=[sigint_at_step(step)])
    run_recipe(interrupted, resume=True)
    return straight, broken


def sigint_at_step(step: int) -> Callable[[Any, str], None]:
    """An engine callback that sends this process SIGINT once ``engine.global_step`` reaches ``step``."""

    def interrupt(engine: Any, event: str) -> None:
        if event == "step" and engine.global_step == step:
            os.kill(os.getpid(), signal.SIGINT)

    return interrupt


def standardize_reference(z: torch.Tensor) -> torch.Tensor:
    """Each row's z-score with the unbiased std plus 1e-7, in Python floats (float64)."""
    rows = []
    for row in z.tolist():
        mean = sum(row) / len(row)
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
        rows.append([(v - mean) / (std + 1e-7) for v in row])
    return torch.tensor(rows, dtype=torch.float64)


def nearly_equal_maps(*shape: int, gap: float = 1e-6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float64 feature maps ``gap`` apart (``a * 3`` and ``a + gap * noise``): float32 rounding (~1e-7 per
    value) would change a distance between them by ~10 %, float64 by ~1e-10."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, generator=gen, dtype=torch.float64) * 3
    return a, a + gap * torch.randn(*shape, generator=gen, dtype=torch.float64)


#: A ``python -c`` script running ``kdkit`` (argv[2:]) that writes argv[1] and sleeps (to be killed) once trial 1
#: of a sweep or search has its epoch-1 checkpoint.
KILL_IN_TRIAL_1 = """
import sys, time
from pathlib import Path
from kdkit import checkpoint
real = checkpoint._replace_text

def dies_mid_trial_1(path, text):
    real(path, text)
    if path.name == "latest.json" and path.parent.parent.name == "1" and '"epoch_0001"' in text:
        Path(sys.argv[1]).write_text("trial 1 has a checkpoint")
        time.sleep(600)  # killed here, between its epochs

checkpoint._replace_text = dies_mid_trial_1
from kdkit.cli import main
sys.exit(main(sys.argv[2:]))
"""


def kill_9_in_trial_1(command: list[str], marker: Path) -> dict[str, str]:
    """Run ``kdkit COMMAND`` in a subprocess, ``kill -9`` it once trial 1 of its sweep or search has its epoch-1
    checkpoint (``marker`` is written then), and return the environment to rerun the command with."""
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_IN_TRIAL_1, str(marker), *command], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.stderr.read().decode() if proc.poll() is not None else "timed out"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return env


def optuna_trials(db: Path) -> list[Any]:
    """Every trial of the one study in the SQLite file ``db``."""
    import optuna

    storage = f"sqlite:///{db}"
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()


#: 48 train and 16 test scenes: the shipped scene recipes' data, small enough for a test.
TINY_SCENES = {"size": 48, "train_scenes": 48, "test_scenes": 16}


def shipped_on_tiny_scenes(name: str, tmp_path: Path) -> dict[str, Any]:
    """The shipped scene recipe ``name`` as a dict on :data:`TINY_SCENES`, its teacher a checkpoint
    ``tmp_path/t.safetensors`` (not written here) instead of its recipe, its run in ``tmp_path/run``."""
    from kdkit.recipe import find_recipe, load_recipe

    recipe = load_recipe(find_recipe(name)).model_dump(mode="json")
    recipe["name"] = name.replace("/", "_")
    return edit_recipe(recipe, {
        "teacher.recipe": None, "teacher.checkpoint": str(tmp_path / "t.safetensors"), "data.subset": None,
        "data.params": TINY_SCENES | {"cache_dir": str(tmp_path / "cache")}, "output.dir": str(tmp_path / "run"),
        "output.progress": False})


def _needs_fashion_mnist() -> None:
    from kdkit.data.idx import FASHION_MNIST_ROOT

    if not Path(FASHION_MNIST_ROOT).is_dir():
        pytest.skip("the Fashion-MNIST files are not installed")


def tiny_det(tmp_path: Path, name: str) -> dict[str, Any]:
    """The shipped detection recipe ``name`` on tiny scenes with narrow detectors and a random teacher (written),
    one epoch."""
    _needs_fashion_mnist()
    torch.manual_seed(0)
    teacher = build_model("det_teacher", num_classes=10, in_channels=1, image_size=48,
                          params={"box_bins": 8, "width": 8})
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp_path / "t.safetensors"))
    return edit_recipe(shipped_on_tiny_scenes(name, tmp_path), {
        "model.params.width": 4, "teacher.params.width": 8, "train.epochs": 1, "train.batch_size": 16})


def tiny_seg(tmp_path: Path, name: str) -> dict[str, Any]:
    """The shipped segmentation recipe ``name`` on tiny scenes with a random teacher (written), one epoch."""
    from kdkit.task import TASKS

    _needs_fashion_mnist()
    torch.manual_seed(0)
    teacher = build_model("segnet_teacher", num_classes=TASKS.get("segmentation").outputs(10), in_channels=1,
                          image_size=48, params={"width": 16})
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp_path / "t.safetensors"))
    return edit_recipe(shipped_on_tiny_scenes(name, tmp_path), {"train.epochs": 1, "train.batch_size": 16})
