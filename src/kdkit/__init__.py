"""kdkit: knowledge distillation for PyTorch -- models with taps, composable losses, one engine.

The pieces, importable from here:

* models: :func:`build_model`, :func:`load_model_weights`, :data:`MODELS`
* taps: :func:`resolve_tap`, :func:`tap_shapes`
* losses and bridges: :data:`LOSSES` (:mod:`kdkit.losses`), :data:`BRIDGES`
* distillation: :class:`FrozenTeacher`, :class:`Student`, :class:`Term`, :class:`Objective`
* data: :func:`load_dataset`, :func:`subset`, :func:`make_loaders`, :class:`AugmentConfig`
* training: :class:`Engine` (:func:`optimizer_factory` of a :class:`TrainSpec`, a task from :data:`TASKS`)
* recipes: :func:`load_recipe`, :func:`run_recipe`
* deploying: :func:`load_deployed` (a finished run's deployed network, taking raw images); ``kdkit export`` and
  ``kdkit predict`` (:mod:`kdkit.export`)
"""

from kdkit._version import __version__
from kdkit.bridges import BRIDGES
from kdkit.checkpoint import load_model_weights
from kdkit.data import AugmentConfig, ImageData, load_dataset, subset
from kdkit.data.loader import BatchLoader, make_loaders
from kdkit.distill import FrozenTeacher, Objective, Student, Term
from kdkit.engine import Engine, FitResult
from kdkit.errors import KdkitError, TrainingDiverged
from kdkit.export import load_deployed
from kdkit.losses import LOSSES
from kdkit.models import MODELS, build_model, count_parameters
from kdkit.recipe import Recipe, TrainSpec, load_recipe, recipe_from_dict
from kdkit.runner import run_recipe
from kdkit.schedule import optimizer_factory
from kdkit.taps import resolve_tap, tap_shapes
from kdkit.task import TASKS

__all__ = [
    "BRIDGES", "LOSSES", "MODELS", "TASKS", "AugmentConfig", "BatchLoader", "Engine", "FitResult", "FrozenTeacher",
    "ImageData", "KdkitError", "Objective", "Recipe", "Student", "Term", "TrainSpec", "TrainingDiverged",
    "__version__", "build_model", "count_parameters", "load_dataset", "load_deployed", "load_model_weights",
    "load_recipe",
    "make_loaders", "optimizer_factory", "recipe_from_dict", "resolve_tap", "run_recipe", "subset", "tap_shapes",
]
