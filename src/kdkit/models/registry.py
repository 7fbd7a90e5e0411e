"""The model registry and the one function that builds any model by name."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from kdkit.registry import Registry

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry("model", fix="run `kdkit ls models`, or use 'timm:NAME', "
                                          "'torchvision:NAME' or, with --trust-code, an import path "
                                          "'package.module:factory'")


def register_model(name: str, help: str | None = None) -> Callable[[ModelFactory], ModelFactory]:
    """Register a model factory.

    The factory is called as ``factory(num_classes=..., in_channels=..., image_size=..., **params)``
    and must return an ``nn.Module`` whose ``forward(x)`` returns logits. It may set
    ``model.feature_taps``: a dict of friendly tap names (``"stage1"``) to module paths
    (``"layer1"``, or ``"fc:input"`` to capture a module's input).
    """
    return MODELS.register(name, help)
