"""One contract, checked on every registered loss and bridge (plugins included): new registrations are covered.

Each component describes the inputs it accepts with its default parameters -- a loss through
``DistillLoss.example_shapes`` / ``example_inputs``, a bridge through ``register_bridge(example_shapes=...)`` --
and its valid parameter ranges through the types of its signature. This file runs the same checks on all of them.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import json
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from conftest import write_recipe
from kdkit.bridges import BRIDGES, FUSING_BRIDGES, SHAPE_RULES, example_shapes
from kdkit.bridges.roles import StructuredBridge
from kdkit.cli import main
from kdkit.errors import KdkitError
from kdkit.losses import LOSSES, DistillLoss
from kdkit.params import Range, accepted_params, check_params, value_range
from kdkit.recipe import recipe_from_dict

LOSS_NAMES = LOSSES.names()
BRIDGE_NAMES = BRIDGES.names()
BRIDGE_SHAPE_PARAMS = ("student_shape", "teacher_shape", "student_shapes", "teacher_shapes")
BATCH = 8


# -- helpers ---------------------------------------------------------------------------------------------------------

def tree_map(fn: Callable[[Tensor], Any], x: Any) -> Any:
    """``fn`` applied to every tensor of ``x`` (tensors, lists, tuples, dataclasses such as FlowEstimates)."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, (list, tuple)):
        return type(x)(tree_map(fn, v) for v in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: tree_map(fn, getattr(x, f.name)) for f in dataclasses.fields(x)})
    return x


def tensors(x: Any) -> list[Tensor]:
    """Every tensor in ``x``."""
    found: list[Tensor] = []
    tree_map(found.append, x)
    return found


def as_dtype(x: Any, dtype: torch.dtype, grad: bool = False) -> Any:
    """Fresh leaves of ``dtype`` for the floating tensors of ``x`` (integer labels are kept)."""
    return tree_map(lambda t: t.detach().to(dtype).requires_grad_(grad) if t.is_floating_point() else t, x)


def bounded_params(factory: Callable[..., Any], skip: tuple[str, ...] = ()) -> dict[str, Range]:
    """The parameters whose type declares a numeric range (``Annotated[float, Gt(0)]`` ...), from the signature."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    hints = typing.get_type_hints(target, include_extras=True)
    found = {name: value_range(hints.get(name)) for name in accepted_params(factory, skip)}
    return {name: bounds for name, bounds in found.items() if bounds is not None}


def outside(bounds: Range) -> float:
    """A value just outside ``bounds`` (below the lower bound if there is one)."""
    assert bounds.low is not None or bounds.high is not None
    return bounds.low - 1 if bounds.low is not None else bounds.high + 1  # type: ignore[operator]


@dataclasses.dataclass
class Case:
    """A loss built with its defaults and set up on its example shapes, with a batch of its example inputs."""

    cls: type[DistillLoss]
    params: dict[str, Any]
    loss: DistillLoss
    student: Any
    teacher: Any
    labels: Tensor
    index: Tensor

    def fresh(self) -> DistillLoss:
        """Another instance built and set up the same way (its own random state)."""
        loss = self.cls(**self.params)
        loss.setup(*self.cls.example_shapes(), num_samples=64)
        return loss

    def compute(self, loss: DistillLoss | None = None, dtype: torch.dtype = torch.float32,
                grad: bool = False) -> tuple[Tensor, Any]:
        """The loss value on the example inputs in ``dtype`` (student leaves with ``requires_grad`` if ``grad``)."""
        student = as_dtype(self.student, dtype, grad)
        teacher = as_dtype(self.teacher, dtype)
        torch.manual_seed(1)  # same draws for every call (e.g. CRD's bank negatives)
        return (loss or self.loss).compute(student, teacher, self.labels, self.index), student


def build_case(name: str) -> Case:
    torch.manual_seed(0)
    cls = LOSSES.get(name)
    params = check_params(cls, {}, where="distill.0", what=f"loss {name!r}")
    loss = cls(**params)
    loss.setup(*cls.example_shapes(), num_samples=64)
    student, teacher, labels, index = cls.example_inputs(BATCH, torch.Generator().manual_seed(0))
    return Case(cls, params, loss, student, teacher, labels, index)


# -- losses ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_accepts_its_example_and_gives_a_finite_scalar(name: str) -> None:
    case = build_case(name)
    s_shape, t_shape = case.cls.example_shapes()
    pairs = list(zip(s_shape, t_shape, strict=True)) if isinstance(s_shape, list) and case.loss.pairwise \
        else [(s_shape, t_shape)]
    for s, t in pairs:
        assert case.loss.check_shapes(s, t) is None
    value, _ = case.compute()
    assert value.dim() == 0 and torch.isfinite(value), value


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_gradients_are_finite(name: str) -> None:
    case = build_case(name)
    value, student = case.compute(grad=True)
    value.backward()
    grads = [t.grad for t in tensors(student) if t.grad is not None]
    assert grads, "no gradient reaches the student input"
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(torch.isfinite(p.grad).all() for p in case.loss.parameters() if p.grad is not None)


def shifted(case: Case, loss: DistillLoss, directions: list[Tensor], step: float) -> Tensor:
    """The loss on the float64 example inputs with every floating tensor (student and teacher) moved by
    ``step * direction`` (same random draws in every call; no gradient, so nothing depends on the step count)."""
    moves = iter(directions)

    def move(t: Tensor) -> Tensor:
        return t.detach().double() + step * next(moves) if t.is_floating_point() else t

    student, teacher = tree_map(move, case.student), tree_map(move, case.teacher)
    torch.manual_seed(1)  # same draws for every call (e.g. CRD's bank negatives)
    with torch.no_grad():
        return loss.compute(student, teacher, case.labels, case.index)


def slope(case: Case, loss: DistillLoss, directions: list[Tensor], step: float) -> float:
    """Central difference of the loss along ``directions`` with ``step``."""
    return ((shifted(case, loss, directions, step) - shifted(case, loss, directions, -step)) / (2 * step)).item()


@pytest.mark.parametrize("state", ["as built", "double()"])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_computes_in_float64_when_given_float64(name: str, state: str) -> None:
    """Float64 inputs give a float64 loss computed in float64 throughout, whatever precision the loss's own state
    (CRD's heads and memories, FM-KT's teacher transform) was built in.

    The inputs are moved by 1e-7 along a random direction on both sides: a loss computed in float64 changes by
    ``1e-7 * slope`` (the slope is the one measured with a 1e-4 step, to ~1e-4), i.e. it resolves inputs 1e-7
    apart to ~1e-12 of its value. Any float32 rounding inside (an input, a weight, a stored constant) makes the
    change noise of the order of the loss itself (relative error ~1).
    """
    case = build_case(name)
    loss = copy.deepcopy(case.loss) if state == "as built" else copy.deepcopy(case.loss).double()
    loss.eval()  # no memory or statistics updates between the shifted calls
    generator = torch.Generator().manual_seed(3)
    leaves = [t for t in tensors(case.student) + tensors(case.teacher) if t.is_floating_point()]
    directions = [torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in leaves]
    value = shifted(case, loss, directions, 0.0)  # also sets state estimated on the first batch (CRD's Z)
    assert value.dtype == torch.float64
    coarse, fine = slope(case, loss, directions, 1e-4), slope(case, loss, directions, 1e-7)
    assert abs(coarse) > 1e-6, f"{name}: the loss does not change along the direction; the check would be vacuous"
    assert fine == pytest.approx(coarse, rel=1e-4), f"{name} is not computed in float64 throughout"
    value32, _ = case.compute(copy.deepcopy(case.loss).eval())  # and it is the same loss as the float32 one
    torch.testing.assert_close(value.float(), value32.float(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_is_finite_on_bfloat16(name: str) -> None:
    case = build_case(name)
    value, _ = case.compute(dtype=torch.bfloat16)
    assert value.dim() == 0 and torch.isfinite(value.float()), value


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_state_round_trips(name: str) -> None:
    case = build_case(name)
    case.compute()  # a training step first: state that changes (CRD's memory, BatchNorm statistics) has changed
    other = case.fresh()
    other.load_state_dict(case.loss.state_dict(), strict=True)
    case.loss.eval()
    other.eval()
    torch.testing.assert_close(case.compute(other)[0], case.compute()[0], rtol=0, atol=0)


def recipe_default(default: Any) -> str:
    """A signature default as a recipe writes it (written out here, apart from kdkit's own formatting)."""
    if isinstance(default, str):
        return default
    return json.dumps(list(default) if isinstance(default, tuple) else default)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_ls_loss_lists_every_parameter_with_its_default_and_description(
        name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", "losses", name]) == 0
    out = capsys.readouterr().out
    for param, p in accepted_params(LOSSES.get(name)).items():
        default = "required" if p.default is p.empty else f"= {recipe_default(p.default)}"
        line = next((line for line in out.splitlines() if line.startswith(f"  {param}: ")), None)
        assert line is not None and f" {default}" in line, (param, out)
        described = out.splitlines()[out.splitlines().index(line) + 1]
        assert described.startswith("      ") and described.strip(), f"{name}.{param} has no `Args:` entry"


#: What a one-term recipe may need to be schema- and method-valid, tried in order: the plain recipe, no hard labels
#: (MEAL V2 refuses them), two views (MDCS, also without hard labels), or the data a method is for (Cr-KD's novel
#: classes seen in two views; WAD's mismatched unlabelled pool).
CONTEXTS: list[dict[str, Any]] = [
    {"train": {"ce_weight": 1.0}},
    {"train": {"ce_weight": 0.0}},
    {"train": {"ce_weight": 1.0}, "data": {"views": 2}},
    {"train": {"ce_weight": 0.0}, "data": {"views": 2}},
    {"train": {"ce_weight": 1.0}, "data": {"setting": {"name": "novel_classes"}, "views": 2}},
    {"train": {"ce_weight": 1.0}, "data": {"setting": {"name": "class_mismatch", "labelled": 60, "unlabelled": 100}}},
    # CTCL's terms: a CNN and a ViT segmenter trained together, each term reading both networks' taps
    {"train": {"ce_weight": 1.0}, "data": {"dataset": "fashion_mnist_scenes"},
     "top": {"task": "segmentation", "model": {"arch": "segnet_student"},
             "peers": {"vit": {"arch": "vit_seg_student"}}},
     "student": {"hfd": ["model.stage1", "vit.low"], "pixel_bsd": ["model.logits", "vit.logits"],
                 "region_bsd": ["model.decoder1", "vit.high", "model.logits", "vit.logits"]}},
    # UniKD's term: a detector pair and the method's section (its AKE's pretraining)
    {"train": {"ce_weight": 1.0}, "data": {"dataset": "fashion_mnist_scenes"},
     "top": {"task": "detection", "model": {"arch": "det_student"},
             "teacher": {"arch": "det_teacher", "checkpoint": "teacher.safetensors"}, "unikd": {}}},
]


def one_term_recipe(term: dict[str, Any], context: dict[str, Any], **top: Any) -> dict[str, Any]:
    """A one-term recipe on digits in ``context`` (one of :data:`CONTEXTS`: its ``data``, ``train`` and ``top`` keys,
    and the ``student`` taps it gives the term's loss)."""
    taps = context.get("student", {}).get(term["loss"])
    return {"name": "probe", "model": {"arch": "cnn_student"}, "data": {"dataset": "digits", **context.get("data", {})},
            "teacher": {"arch": "cnn_teacher", "checkpoint": "teacher.safetensors"},
            "distill": [{"student": taps, **term} if taps else term], "train": {"epochs": 1, **context["train"]},
            **context.get("top", {}), **top}


def context_allowed(name: str) -> dict[str, Any]:
    """The first of :data:`CONTEXTS` in which the one-term recipe with loss ``name`` is schema- and method-valid, so
    that the recipe's problem is the parameter under test."""

    def accepted(context: dict[str, Any]) -> bool:
        try:
            recipe_from_dict(one_term_recipe({"loss": name}, context))
        except (KdkitError, ValueError):
            return False
        return True

    return next((c for c in CONTEXTS if accepted(c)), CONTEXTS[0])


BOUNDED_LOSS_PARAMS = [(name, param) for name in LOSS_NAMES for param in bounded_params(LOSSES.get(name))]


@pytest.mark.parametrize(("name", "param"), BOUNDED_LOSS_PARAMS)
def test_loss_parameter_out_of_bounds_fails_validation_naming_the_bound(
        name: str, param: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bounds = bounded_params(LOSSES.get(name))[param]
    bad = outside(bounds)
    recipe = one_term_recipe({"loss": name, param: bad}, context_allowed(name), output={"dir": str(tmp_path / "run")})
    recipe["teacher"]["checkpoint"] = str(tmp_path / "teacher.safetensors")
    assert main(["validate", str(write_recipe(tmp_path / "recipe.yaml", recipe))]) == 2
    err = capsys.readouterr().err
    expected = f"distill.0.{param}: loss {name!r}: {param} must be {bounds}"
    assert expected in err and f"(got {bad!r})" in err and "fix: set" in err, err
    with pytest.raises(KdkitError, match=f"{param} must be"):  # direct construction checks the same bound
        LOSSES.get(name)(**{param: bad})


# -- bridges ---------------------------------------------------------------------------------------------------------

def build_bridge(name: str) -> tuple[torch.nn.Module, Any, Any]:
    torch.manual_seed(0)
    factory = BRIDGES.get(name)
    s_shape, t_shape = example_shapes(name)
    params = check_params(factory, {}, skip=BRIDGE_SHAPE_PARAMS, where="distill.0.bridge_params",
                          what=f"bridge {name!r}")
    return factory(s_shape, t_shape, **params), s_shape, t_shape


def bridge_input(s_shape: Any, batch: int = 4) -> Any:
    gen = torch.Generator().manual_seed(0)
    if isinstance(s_shape, list):
        return [torch.randn(batch, *s, generator=gen, requires_grad=True) for s in s_shape]
    return torch.randn(batch, *s_shape, generator=gen, requires_grad=True)


@pytest.mark.parametrize("name", BRIDGE_NAMES)
def test_bridge_maps_its_example_to_the_expected_shape_with_finite_gradients(name: str) -> None:
    bridge, s_shape, t_shape = build_bridge(name)
    x = bridge_input(s_shape)
    out = bridge(x)
    if isinstance(bridge, StructuredBridge):
        # a structure: every tensor holds per-sample `output_shape` items (after any leading step dimension)
        expected = tuple(bridge.output_shape(s_shape))
        found = tensors(out)
        assert found and all(t.shape[-len(expected) - 1:] == (4, *expected) for t in found), \
            [tuple(t.shape) for t in found]
    elif name in FUSING_BRIDGES:
        assert [tuple(o.shape) for o in out] == [(4, *t) for t in t_shape]
    else:
        assert tuple(out.shape) == (4, *t_shape)
    sum(t.float().square().mean() for t in tensors(out)).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in tensors(x))
    # every parameter is trained (an unused one would also stall DistributedDataParallel)
    unused = [n for n, p in bridge.named_parameters() if p.grad is None]
    assert not unused, unused
    assert all(torch.isfinite(p.grad).all() for p in bridge.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", BRIDGE_NAMES)
def test_bridge_state_round_trips(name: str) -> None:
    bridge, s_shape, t_shape = build_bridge(name)
    x = tree_map(lambda t: t.detach(), bridge_input(s_shape))
    bridge(x)  # a training forward first (BatchNorm statistics change)
    other = BRIDGES.get(name)(s_shape, t_shape)
    other.load_state_dict(bridge.state_dict(), strict=True)
    bridge.eval()
    other.eval()
    with torch.no_grad():
        for a, b in zip(tensors(bridge(x)), tensors(other(x)), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


#: Per-sample shapes whose every (student, teacher) pair each declared shape rule is checked on.
RULE_SHAPES = [(6,), (4, 6), (4, 6, 6), (6, 3, 3), (5, 12, 12), (4, 6, 3), (4, 3, 3), (6, 12, 6), (4, 7, 7)]


@pytest.mark.parametrize("name", sorted(SHAPE_RULES))
def test_bridge_maps_exactly_what_its_shape_rule_declares(name: str) -> None:
    """Hints suggest a bridge from its declared rule: the rule must be true. Every pair it accepts is mapped onto
    the teacher's shape; every pair it refuses is refused by the factory with the rule's reason."""
    factory, rule = BRIDGES.get(name), SHAPE_RULES[name]
    assert rule(*example_shapes(name)) is None
    for s_shape, t_shape in itertools.product(RULE_SHAPES, repeat=2):
        problem = rule(s_shape, t_shape)
        if problem is None:
            bridge = factory(s_shape, t_shape).eval()
            assert tuple(bridge(torch.randn(2, *s_shape)).shape) == (2, *t_shape), (s_shape, t_shape)
        else:
            with pytest.raises(KdkitError, match=re.escape(problem)):
                factory(s_shape, t_shape)


@pytest.mark.parametrize("name", [n for n in BRIDGE_NAMES if bounded_params(BRIDGES.get(n), BRIDGE_SHAPE_PARAMS)])
def test_bridge_parameter_out_of_bounds_is_refused_naming_the_bound(name: str) -> None:
    factory = BRIDGES.get(name)
    s_shape, t_shape = example_shapes(name)
    for param, bounds in bounded_params(factory, BRIDGE_SHAPE_PARAMS).items():
        bad = outside(bounds)
        with pytest.raises(KdkitError) as info:
            check_params(factory, {param: bad}, skip=BRIDGE_SHAPE_PARAMS, where="distill.0.bridge_params",
                         what=f"bridge {name!r}")
        text = str(info.value)
        assert f"distill.0.bridge_params.{param}: bridge {name!r}: {param} must be {bounds}" in text, text
        assert f"(got {bad!r})" in text and "fix: set" in text, text
        with pytest.raises(KdkitError, match=f"{param} must be"):  # a direct call checks the same bound
            factory(s_shape, t_shape, **{param: bad})
