"""Bridges: trainable student-side modules mapping a student tap into the teacher's space.

A bridge factory is called with the probed per-sample shapes of the two taps, so projectors are
sized from the taps, never hard-coded: ``factory(student_shape, teacher_shape, **params)``.
Bridges are trained with the student and saved in its checkpoints.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.params import enforce_bounds
from kdkit.registry import Registry

BridgeFactory = Callable[..., nn.Module]
#: A bridge's declared shape rule: why it cannot map a student tap of per-sample shape ``student`` onto a
#: teacher tap of shape ``teacher``, or ``None`` when it can.
ShapeRule = Callable[[tuple[int, ...], tuple[int, ...]], "str | None"]
BRIDGES: Registry[BridgeFactory] = Registry("bridge", fix="run `kdkit ls bridges`")


#: Bridges that fuse all taps of a multi-tap term in one module (called once with the lists of shapes).
FUSING_BRIDGES: set[str] = set()
#: Per-sample ``(student_shape, teacher_shape)`` each bridge accepts with its default parameters (see
#: :func:`example_shapes`); declared at registration, read by the contract test.
EXAMPLE_SHAPES: dict[str, tuple[Any, Any]] = {}
#: Example shapes of a bridge that declares none: two flat vectors of different widths.
DEFAULT_EXAMPLE_SHAPES: tuple[Any, Any] = ((8,), (10,))
#: Factory parameters kdkit fills in from the probed taps (not settable in ``bridge_params``).
SHAPE_PARAMS = ("student_shape", "teacher_shape", "student_shapes", "teacher_shapes")
#: The shape rule each general-purpose bridge declares (``register_bridge(maps=...)``): the bridges that map one
#: tensor onto the teacher tap's shape for any loss. Hints suggest exactly these, from these rules.
SHAPE_RULES: dict[str, ShapeRule] = {}


def register_bridge(name: str, help: str | None = None, *, fuses_taps: bool = False,
                    example_shapes: tuple[Any, Any] | None = None,
                    maps: ShapeRule | None = None) -> Callable[[BridgeFactory], BridgeFactory]:
    """Register a bridge factory ``(student_shape, teacher_shape, **params) -> nn.Module``.

    The bounds declared in the factory's signature (``steps: Annotated[int, Ge(1)] = 8``) are checked on
    every call, as well as by the recipe check; so is the declared shape rule. The decorator returns the
    checking factory.

    Args:
        name: Recipe name.
        help: One line for ``kdkit ls bridges``.
        fuses_taps: With a list of taps, call the factory once with the lists of shapes (ReviewKD's ABF)
            instead of once per tap.
        example_shapes: Per-sample ``(student_shape, teacher_shape)`` the bridge maps with its default
            parameters (lists of shapes for a fusing bridge); default :data:`DEFAULT_EXAMPLE_SHAPES`.
        maps: The shapes the bridge maps (a bridge whose output is the teacher tap's shape, usable by any
            loss): ``maps(student_shape, teacher_shape)`` says why it cannot, or ``None``. Its docstring's
            first line describes it in ``kdkit ls bridges NAME``; hints suggest the bridges whose rule
            accepts the shapes at hand (:func:`bridges_for`), and the factory refuses the others.
    """
    if fuses_taps:
        FUSING_BRIDGES.add(name)
    if example_shapes is not None:
        EXAMPLE_SHAPES[name] = example_shapes
    if maps is not None:
        SHAPE_RULES[name] = maps

    def deco(factory: BridgeFactory) -> BridgeFactory:
        checked = _refusing_other_shapes(name, factory, maps) if maps is not None else factory
        return BRIDGES.register(name, help)(enforce_bounds(checked, what=f"bridge {name!r}"))

    return deco


def _refusing_other_shapes(name: str, factory: BridgeFactory, maps: ShapeRule) -> BridgeFactory:
    """``factory``, refusing the shapes its declared rule does not map (naming the bridges that do)."""

    @functools.wraps(factory)
    def checked(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], **params: Any) -> nn.Module:
        student, teacher = tuple(student_shape), tuple(teacher_shape)
        problem = maps(student, teacher)
        if problem:
            able = bridges_for(student, teacher)  # smallest first: the closest choice is the cheapest that maps
            raise KdkitError(f"bridge {name!r} cannot map a student tap of shape {student} onto the teacher "
                             f"tap's {teacher}: {problem}", choices=able, fix=bridge_hint(student, teacher, able))
        return factory(student_shape, teacher_shape, **params)

    return checked


def bridges_for(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> list[str]:
    """The registered bridges whose declared rule maps ``student_shape`` onto ``teacher_shape``, smallest first.

    Ordered by the parameters each would have for these shapes with its defaults (built on the meta device:
    nothing is allocated), so the first is the smallest bridge that does the job.
    """
    student, teacher = tuple(student_shape), tuple(teacher_shape)
    BRIDGES.names()  # loads the plugins, which declare their rules at registration
    able = [name for name, rule in SHAPE_RULES.items() if rule(student, teacher) is None]

    def size(name: str) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in BRIDGES.get(name)(student, teacher).parameters())

    return sorted(able, key=lambda name: (size(name), name))


def bridge_hint(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], able: list[str] | None = None) -> str:
    """The fix for a student tap that must be mapped onto the teacher's shape: the bridges that can, or other taps.

    Args:
        student_shape: Per-sample student tap shape.
        teacher_shape: Per-sample teacher tap shape.
        able: :func:`bridges_for` of these shapes, if already computed.
    """
    able = bridges_for(student_shape, teacher_shape) if able is None else able
    if not able:
        return (f"no bridge maps {tuple(student_shape)} onto {tuple(teacher_shape)}: tap layers whose shapes a "
                "bridge maps (`kdkit ls bridges NAME` says which)")
    others = f" (or {', '.join(able[1:])})" if able[1:] else ""
    return f"use `bridge: {able[0]}`{others}, which maps {tuple(student_shape)} onto {tuple(teacher_shape)}"


def example_shapes(name: str) -> tuple[Any, Any]:
    """The per-sample ``(student_shape, teacher_shape)`` that bridge ``name`` maps with its default parameters."""
    BRIDGES.get(name)  # loads the plugins, which declare theirs at registration
    return EXAMPLE_SHAPES.get(name, DEFAULT_EXAMPLE_SHAPES)


def maps_any(student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
    """Any student shape onto any teacher shape."""
    return None


def maps_equal_spatial_size(student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
    """(C, H, W) maps of the same H, W; any channels."""
    for side, shape in (("student", student), ("teacher", teacher)):
        if len(shape) != 3:
            return f"it needs a 3-d per-sample {side} tap (C, H, W), got shape {shape}"
    if student[1:] != teacher[1:]:
        return f"it keeps the spatial size, but the student tap is {student[1:]} and the teacher tap {teacher[1:]}"
    return None


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
                 example_shapes=((4, 3, 3), (6, 2)), maps=maps_any)
def linear_bridge(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """A linear projector from the flattened student tap to the teacher tap's shape."""
    in_features = 1
    for size in student_shape:
        in_features *= size
    return Flatten(in_features, teacher_shape)


def _conv_bridge(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], kernel: int) -> nn.Module:
    """Conv + BN over (C, H, W) maps of one spatial size (:func:`maps_equal_spatial_size`, checked at the call)."""
    return nn.Sequential(
        nn.Conv2d(student_shape[0], teacher_shape[0], kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(teacher_shape[0]),
    )


@register_bridge("conv1x1", help="1x1 conv + BN from student channels to teacher channels (same H, W)",
                 example_shapes=((4, 5, 5), (6, 5, 5)), maps=maps_equal_spatial_size)
def conv1x1_bridge(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """1x1 conv + BN regressor (the usual FitNets / feature-KD connector)."""
    return _conv_bridge(student_shape, teacher_shape, 1)


@register_bridge("conv3x3", help="3x3 conv + BN from student channels to teacher channels (same H, W)",
                 example_shapes=((4, 5, 5), (6, 5, 5)), maps=maps_equal_spatial_size)
def conv3x3_bridge(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """3x3 conv + BN regressor (FitNets' convolutional regressor)."""
    return _conv_bridge(student_shape, teacher_shape, 3)


__all__ = ["BRIDGES", "EXAMPLE_SHAPES", "FUSING_BRIDGES", "SHAPE_PARAMS", "SHAPE_RULES", "bridge_hint", "bridges_for",
           "conv1x1_bridge", "conv3x3_bridge", "example_shapes", "linear_bridge", "maps_any",
           "maps_equal_spatial_size", "register_bridge"]


# Bridges in their own modules register on import (after BRIDGES exists).
from kdkit.bridges import abf, convreg, mgd  # noqa: E402, F401
