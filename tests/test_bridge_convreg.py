"""The FitNets ``convreg`` bridge: the four spatial cases, its options, its errors, and use in a recipe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdkit.bridges.convreg import ConvReg, convreg_bridge
from kdkit.errors import KdkitError
from kdkit.params import check_params


@pytest.mark.parametrize(("student", "teacher", "conv_type", "kernel"), [
    ((8, 7, 7), (16, 7, 7), nn.Conv2d, (3, 3)),  # equal: 3x3, padding 1
    ((8, 14, 12), (16, 7, 6), nn.Conv2d, (3, 3)),  # student 2x the teacher: 3x3 stride 2
    ((8, 4, 5), (16, 8, 10), nn.ConvTranspose2d, (4, 4)),  # student half the teacher: 4x4 transposed
    ((8, 9, 8), (16, 6, 3), nn.Conv2d, (4, 6)),  # otherwise (larger): kernel 1 + H_s - H_t, 1 + W_s - W_t
])
def test_output_shape_is_the_teacher_shape(student: tuple[int, ...], teacher: tuple[int, ...],
                                           conv_type: type, kernel: tuple[int, int]) -> None:
    bridge = convreg_bridge(student, teacher)
    assert isinstance(bridge, ConvReg) and type(bridge.conv) is conv_type and bridge.conv.kernel_size == kernel
    out = bridge(torch.randn(3, *student))
    assert out.shape == (3, *teacher)
    assert (out >= 0).all()  # ReLU by default


def test_relu_off_and_same_size_kernel_1_as_repdistiller() -> None:
    bridge = convreg_bridge((4, 5, 5), (6, 5, 5), relu=False, same_size_kernel=1)
    assert bridge.conv.kernel_size == (1, 1)
    out = bridge(torch.randn(4, 4, 5, 5))
    assert out.shape == (4, 6, 5, 5) and (out < 0).any()


def test_gradients_reach_the_bridge_and_the_input() -> None:
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    bridge = convreg_bridge((3, 8, 8), (5, 4, 4))
    bridge(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in bridge.parameters())


@pytest.mark.parametrize(("student", "teacher", "match"), [
    ((8, 3, 3), (16, 8, 8), "cannot map"),  # smaller, not half
    ((8, 8, 3), (16, 4, 4), "cannot map"),  # W smaller than the teacher's
    ((8, 16), (16, 4, 4), "3-d per-sample student"),
    ((8, 4, 4), (16,), "3-d per-sample teacher"),
])
def test_unmappable_shapes_raise_with_a_fix(student: tuple[int, ...], teacher: tuple[int, ...],
                                            match: str) -> None:
    with pytest.raises(KdkitError, match=match) as info:
        convreg_bridge(student, teacher)
    assert info.value.fix


def test_params_validated_from_the_signature() -> None:
    skip = ("student_shape", "teacher_shape")
    assert check_params(convreg_bridge, {"relu": False}, skip=skip, where="w", what="bridge") == {"relu": False}
    with pytest.raises(KdkitError):
        check_params(convreg_bridge, {"same_size_kernel": 5}, skip=skip, where="w", what="bridge")
    with pytest.raises(KdkitError, match="same_size_kernel"):
        convreg_bridge((4, 5, 5), (6, 5, 5), same_size_kernel=5)  # type: ignore[arg-type]


def test_fitnets_term_with_convreg_bridge_builds(tiny_kd: dict) -> None:
    from kdkit.build import plan
    from kdkit.losses.fitnets import fitnets_loss
    from kdkit.recipe import recipe_from_dict

    tiny_kd["distill"] = [{"loss": "fitnets", "student": "stage1", "teacher": "stage2", "bridge": "convreg",
                           "weight": 100}]
    built = plan(recipe_from_dict(tiny_kd), training=True)
    assert isinstance(built.student.bridges["fitnets"], ConvReg)
    x = torch.randn(4, 1, 8, 8)
    logits, per_term = built.student(x)
    teacher = built.teacher(x)
    assert per_term["fitnets"].shape == teacher["stage2"].shape
    out = built.objective(logits, torch.zeros(4, dtype=torch.long), per_term, teacher)
    assert out["fitnets"].item() == pytest.approx(fitnets_loss(per_term["fitnets"], teacher["stage2"]).item())
