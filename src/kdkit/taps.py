"""Taps: named intermediate tensors captured with forward hooks (models are never edited).

A tap spec is a string:

* ``"logits"`` -- the model's output;
* a friendly name from ``model.feature_taps`` (``"stage2"``, ``"penultimate"``);
* a module path from ``model.named_modules()`` (``"layer3.1.conv2"``), optionally suffixed with
  ``":input"`` to capture the module's input instead of its output.

Specs are resolved and validated before the first batch (:func:`resolve_tap`), and shapes are probed
once with a tiny forward (:func:`probe_shapes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from kdkit.errors import KdkitError

LOGITS = "logits"


@dataclass(frozen=True)
class Tap:
    """A resolved tap.

    Attributes:
        spec: What the user wrote (also the key the captured tensor is stored under).
        path: Module path inside the model ("" for the logits).
        capture: ``"output"``, ``"input"`` or ``"logits"``.
    """

    spec: str
    path: str
    capture: Literal["output", "input", "logits"]


def tap_choices(model: nn.Module) -> list[str]:
    """Every valid tap spec of ``model``: logits, friendly names, module paths."""
    friendly = list(getattr(model, "feature_taps", {}) or {})
    paths = [name for name, _ in model.named_modules() if name]
    return [LOGITS, *friendly, *paths]


def resolve_tap(model: nn.Module, spec: str, where: str | None = None) -> Tap:
    """Turn a tap spec into a :class:`Tap`, or raise a :class:`KdkitError` with the closest paths.

    Args:
        model: The model the tap belongs to.
        spec: The tap spec (see module docstring).
        where: Recipe location for the error message.
    """
    if spec == LOGITS:
        return Tap(spec, "", "logits")
    friendly = getattr(model, "feature_taps", {}) or {}
    target = friendly.get(spec, spec)
    path, _, capture = target.partition(":")
    capture = capture or "output"
    modules = dict(model.named_modules())
    if path not in modules and path in friendly and ":" not in friendly[path]:
        path = friendly[path]  # a model that forwards module paths (a group reading its deployed member's paths)
    if capture not in ("output", "input"):
        raise KdkitError(f"tap {spec!r} has an unknown capture {capture!r}", choices=["output", "input"],
                         bad=capture, fix="write 'path' for a module's output or 'path:input' for its input",
                         where=where)
    if not path or path not in modules:
        raise KdkitError(f"tap {spec!r}: no module at path {path!r} in {type(model).__name__}",
                         choices=tap_choices(model), bad=path,
                         fix="use 'logits', a name from the model's feature_taps, or a module path from "
                             "model.named_modules() (`kdkit ls taps MODEL`)", where=where)
    return Tap(spec, path, capture)  # type: ignore[arg-type]


class TapRecorder:
    """Capture tapped tensors with forward hooks; :meth:`pop` returns and clears them.

    Args:
        model: The model to observe (never modified, only hooked).
        taps: Resolved taps; logits taps need no hook.
    """

    def __init__(self, model: nn.Module, taps: list[Tap]) -> None:
        self.taps = list(taps)
        self._store: dict[str, Tensor] = {}
        self._handles = []
        modules = dict(model.named_modules())
        for tap in self.taps:
            if tap.capture == "logits":
                continue
            module = modules[tap.path]
            if tap.capture == "output":
                self._handles.append(module.register_forward_hook(self._output_hook(tap.spec)))
            else:
                self._handles.append(module.register_forward_pre_hook(self._input_hook(tap.spec)))

    def _output_hook(self, key: str):
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            self._store[key] = output

        return hook

    def _input_hook(self, key: str):
        def hook(_module: nn.Module, inputs: tuple) -> None:
            self._store[key] = inputs[0]

        return hook

    def pop(self) -> dict[str, Tensor]:
        """The tensors captured since the last call (the buffer is cleared so nothing is kept alive)."""
        out, self._store = self._store, {}
        return out

    def remove(self) -> None:
        """Detach every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@torch.no_grad()
def probe_shapes(model: nn.Module, taps: list[Tap], example: Tensor, *,
                 only_tensors: bool = False) -> dict[str, tuple[int, ...]]:
    """Shapes (without the batch dimension) of each tap, from one forward in eval mode.

    Args:
        model: The model.
        taps: Resolved taps.
        example: A small input batch (B >= 1) on the model's device.
        only_tensors: Leave out the taps that capture no tensor (a container such as an ``nn.ModuleList`` that
            the forward only iterates, a module returning a dict) instead of failing (for listing a model's taps).

    Raises:
        KdkitError: When a tapped module produces something other than a tensor.
    """
    recorder = TapRecorder(model, taps)
    was_training = model.training
    model.eval()
    try:
        logits = model(example)
        captured = recorder.pop()
    finally:
        recorder.remove()
        model.train(was_training)
    shapes: dict[str, tuple[int, ...]] = {}
    for tap in taps:
        value = logits if tap.capture == "logits" else captured.get(tap.spec)
        if only_tensors and not isinstance(value, Tensor):
            continue
        if not isinstance(value, Tensor):
            raise KdkitError(f"tap {tap.spec!r} ({tap.path}:{tap.capture}) captured {type(value).__name__}, "
                             "not a tensor", fix="tap a module whose output (or first input) is a tensor")
        shapes[tap.spec] = tuple(value.shape[1:])
    return shapes


def tap_shapes(model: nn.Module, specs: list[str], input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Resolve tap specs and probe their per-sample shapes for inputs of ``input_shape`` = ``(C, H, W)``."""
    device = next(model.parameters()).device
    return probe_shapes(model, [resolve_tap(model, s) for s in specs], torch.zeros(2, *input_shape, device=device))
