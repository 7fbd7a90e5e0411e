"""Bridges: trainable student-side modules mapping a student tap into the teacher's space.

A bridge factory is called with the probed per-sample shapes of the two taps, so projectors are
sized from the taps, never hard-coded: ``factory(student_shape, teacher_shape, **params)``.
Bridges are trained with the student and saved in its checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.params import enforce_bounds
from kdkit.registry import Registry

BridgeFactory = Callable[..., nn.Module]
BRIDGES: Registry[BridgeFactory] = Registry("bridge", fix="run `kdkit ls bridges`")


#: Bridges that fuse all taps of a multi-tap term in one module (called once with the lists of shapes).
FUSING_BRIDGES: set[str] = set()
#: Per-sample ``(student_shape, teacher_shape)`` each bridge accepts with its default parameters (see
#: :func:`example_shapes`); declared at registration, read by the contract test.
EXAMPLE_SHAPES: dict[str, tuple[Any, Any]] = {}
#: Example shapes of a bridge that declares none: two flat vectors of different widths.
DEFAULT_EXAMPLE_SHAPES: tuple[Any, Any] = ((8,), (10,))


def register_bridge(name: str, help: str | None = None, *, fuses_taps: bool = False,
                    example_shapes: tuple[Any, Any] | None = None) -> Callable[[BridgeFactory], BridgeFactory]:
    """Register a bridge factory ``(student_shape, teacher_shape, **params) -> nn.Module``.

    The bounds declared in the factory's signature (``steps: Annotated[int, Ge(1)] = 8``) are checked on
    every call, as well as by the recipe check; the decorator returns the checking factory.

    Args:
        name: Recipe name.
        help: One line for ``kdkit ls bridges``.
        fuses_taps: With a list of taps, call the factory once with the lists of shapes (ReviewKD's ABF)
            instead of once per tap.
        example_shapes: Per-sample ``(student_shape, teacher_shape)`` the bridge maps with its default
            parameters (lists of shapes for a fusing bridge); default :data:`DEFAULT_EXAMPLE_SHAPES`.
    """
    if fuses_taps:
        FUSING_BRIDGES.add(name)
    if example_shapes is not None:
        EXAMPLE_SHAPES[name] = example_shapes

    def deco(factory: BridgeFactory) -> BridgeFactory:
        return BRIDGES.register(name, help)(enforce_bounds(factory, what=f"bridge {name!r}"))

    return deco


def example_shapes(name: str) -> tuple[Any, Any]:
    """The per-sample ``(student_shape, teacher_shape)`` that bridge ``name`` maps with its default parameters."""
    BRIDGES.get(name)  # loads the plugins, which declare theirs at registration
    return EXAMPLE_SHAPES.get(name, DEFAULT_EXAMPLE_SHAPES)


def _need(rank: int, shape: tuple[int, ...], side: str, bridge: str) -> None:
    if len(shape) != rank:
        raise KdkitError(f"bridge {bridge!r} needs a {rank}-d per-sample {side} tap, got shape {shape}",
                         choices=["linear (any shape -> flat)", "conv1x1 / conv3x3 (C,H,W) -> (C',H,W)"],
                         fix="pick a bridge that fits the taps' shapes, or tap other layers")


class Flatten(nn.Module):
    """Flatten all but the batch dimension, then apply a linear layer and reshape to ``out_shape``."""

    def __init__(self, in_features: int, out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.out_shape = tuple(out_shape)
        out_features = 1
        for size in out_shape:
            out_features *= size
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, ...) -> (B, *out_shape)``."""
        return self.linear(x.flatten(1)).view(x.shape[0], *self.out_shape)


@register_bridge("linear", help="flatten + linear layer to the teacher tap's size",
                 example_shapes=((4, 3, 3), (6, 2)))
def linear_bridge(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """A linear projector from the flattened student tap to the teacher tap's shape."""
    in_features = 1
    for size in student_shape:
        in_features *= size
    return Flatten(in_features, teacher_shape)


def _conv_bridge(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], kernel: int, name: str) -> nn.Module:
    _need(3, tuple(student_shape), "student", name)
    _need(3, tuple(teacher_shape), "teacher", name)
    if tuple(student_shape[1:]) != tuple(teacher_shape[1:]):
        raise KdkitError(f"bridge {name!r} keeps the spatial size, but the student tap is "
                         f"{tuple(student_shape[1:])} and the teacher tap {tuple(teacher_shape[1:])}",
                         fix="tap layers with the same spatial size, or use the 'linear' bridge")
    return nn.Sequential(
        nn.Conv2d(student_shape[0], teacher_shape[0], kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(teacher_shape[0]),
    )


@register_bridge("conv1x1", help="1x1 conv + BN from student channels to teacher channels (same H, W)",
                 example_shapes=((4, 5, 5), (6, 5, 5)))
def conv1x1_bridge(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """1x1 conv + BN regressor (the usual FitNets / feature-KD connector)."""
    return _conv_bridge(student_shape, teacher_shape, 1, "conv1x1")


@register_bridge("conv3x3", help="3x3 conv + BN from student channels to teacher channels (same H, W)",
                 example_shapes=((4, 5, 5), (6, 5, 5)))
def conv3x3_bridge(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """3x3 conv + BN regressor (FitNets' convolutional regressor)."""
    return _conv_bridge(student_shape, teacher_shape, 3, "conv3x3")


__all__ = ["BRIDGES", "EXAMPLE_SHAPES", "FUSING_BRIDGES", "conv1x1_bridge", "conv3x3_bridge", "example_shapes",
           "linear_bridge", "register_bridge"]


# Bridges in their own modules register on import (after BRIDGES exists).
from kdkit.bridges import abf, convreg  # noqa: E402, F401
