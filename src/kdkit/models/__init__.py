"""Models: built-in families, timm/torchvision by name, or a user's import path.

``build_model("resnet8x4", num_classes=100)``; ``build_model("timm:resnet18", ...)``;
``build_model("torchvision:mobilenet_v3_small", ...)``; ``build_model("my_pkg.nets:make", ...)``.

An import path runs code that a recipe names, so it is refused unless the user trusts the recipe's code
(``kdkit --trust-code ...`` or ``KDKIT_TRUST_CODE=1``): loading or validating a recipe never imports or
calls anything otherwise. The way to ship a model without that switch is to register it from an installed
package through the ``kdkit.plugins`` entry-point group (``register_model``), which installing is the opt-in to.
"""

from __future__ import annotations

import importlib
import inspect
import os
from typing import Any

from torch import nn

from kdkit.errors import KdkitError
from kdkit.models import (
    cifar,  # noqa: F401 - registers the CIFAR KD zoo
    detector,  # noqa: F401 - registers the FCOS-style detectors
    faster_rcnn,  # noqa: F401 - registers the two-stage detector
    retinanet,  # noqa: F401 - registers the RetinaNet detector
    small_cnn,  # noqa: F401 - registers the small CNNs
)
from kdkit.models.registry import MODELS, register_model
from kdkit.models.segmentation import torchvision_segmenter, torchvision_segmenters
from kdkit.params import check_params

#: Factory parameters kdkit fills in from the data (not settable in ``model.params``).
FIXED_PARAMS = ("num_classes", "in_channels", "image_size")
#: Environment variable that lets recipes name code to import (``--trust-code`` sets it).
TRUST_CODE_ENV = "KDKIT_TRUST_CODE"


def code_trusted() -> bool:
    """Whether the user allowed recipes to import and call the code they name (``package.module:factory``)."""
    return os.environ.get(TRUST_CODE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _external(prefix: str, name: str, num_classes: int, in_channels: int, params: dict[str, Any],
              where: str | None) -> nn.Module:
    if prefix == "timm":
        try:
            import timm
        except ImportError:
            raise KdkitError("'timm:' models need the timm package", fix="pip install 'kdkit[zoo]'",
                             where=where) from None
        if name not in timm.list_models():
            raise KdkitError(f"unknown timm model {name!r}", choices=timm.list_models(), bad=name,
                             fix="use a name from timm.list_models()", where=where)
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **params)
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        raise KdkitError(f"unknown torchvision model {name!r}", choices=names, bad=name,
                         fix="use a name from torchvision.models.list_models()", where=where)
    if name in torchvision_segmenters():  # dict outputs and a fixed 3-channel stem: adapted
        return torchvision_segmenter(name, num_classes=num_classes, in_channels=in_channels, params=params,
                                     where=where)
    if in_channels != 3:
        raise KdkitError(f"torchvision:{name} expects 3-channel images, the data has {in_channels}",
                         fix="use a kdkit or timm model (timm adapts the stem), or RGB data", where=where)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **params)


def _import_path(path: str, where: str | None) -> Any:
    if not code_trusted():  # before any import: importing a module already runs its code
        raise KdkitError(f"model {path!r} names code to import and call, which kdkit does only when you trust the "
                         "recipe's code", bad=path, where=where,
                         fix="run with --trust-code (or KDKIT_TRUST_CODE=1) if you trust it, or register the model "
                             "from an installed package (`kdkit.plugins` entry point)")
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise KdkitError(f"cannot import {module_name!r} for model {path!r}: {exc}",
                         fix="check the module path and that it is on PYTHONPATH", where=where) from None
    if not hasattr(module, attr):
        public = [n for n in dir(module) if not n.startswith("_")]
        raise KdkitError(f"module {module_name!r} has no attribute {attr!r}", choices=public, bad=attr,
                         fix="name a function or class that returns an nn.Module", where=where)
    factory = getattr(module, attr)
    # a model factory is a Python function or an nn.Module class, never e.g. a builtin such as os:system
    if not (inspect.isfunction(factory) or (inspect.isclass(factory) and issubclass(factory, nn.Module))):
        raise KdkitError(f"{path!r} is a {type(factory).__name__}, not a model factory", bad=path, where=where,
                         fix="name a Python function that returns an nn.Module, or an nn.Module class")
    return factory


def build_model(name: str, *, num_classes: int, in_channels: int = 3, image_size: int = 32,
                params: dict[str, Any] | None = None, where: str | None = None) -> nn.Module:
    """Build a model with random weights.

    Args:
        name: A registered name (``kdkit ls models``), ``timm:NAME``, ``torchvision:NAME`` or
            ``package.module:factory`` (called with ``num_classes``, ``in_channels``, ``image_size``
            when it accepts them, plus ``params``).
        num_classes: Classifier outputs.
        in_channels: Image channels.
        image_size: Image height/width.
        params: Extra keyword arguments of the factory (validated against its signature).
        where: Recipe location for error messages.

    Raises:
        KdkitError: Unknown name or bad parameters, with the closest valid choices.
    """
    params = dict(params or {})
    prefix, sep, rest = name.partition(":")
    if sep and prefix in ("timm", "torchvision"):
        return _external(prefix, rest, num_classes, in_channels, params, where)
    if sep:
        factory = _import_path(name, where)
    else:
        factory = MODELS.get(name, where=where)
        params_where = where.replace(".arch", ".params") if where else "params"
        params = check_params(factory, params, skip=FIXED_PARAMS, where=params_where, what=f"model {name!r}")
    fixed = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    accepted = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    fixed = {k: v for k, v in fixed.items() if takes_any or k in accepted}
    model = factory(**fixed, **params)
    if not isinstance(model, nn.Module):
        raise KdkitError(f"model factory {name!r} returned {type(model).__name__}, not an nn.Module",
                         fix="return an nn.Module whose forward gives logits", where=where)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those that require gradients)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["FIXED_PARAMS", "MODELS", "TRUST_CODE_ENV", "build_model", "code_trusted", "count_parameters",
           "register_model"]
