"""The distiller grammar is exact: ``composed`` with the right pieces equals the hand-written losses, and every
transform and distance keeps the precision rules, is zero where it should be and has finite gradients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from conftest import write_recipe
from kdkit.cli import main
from kdkit.errors import KdkitError
from kdkit.losses.at import at_loss
from kdkit.losses.cka import cka_loss
from kdkit.losses.composed import ComposedLoss
from kdkit.losses.dist import dist_loss
from kdkit.losses.distances import DISTANCES
from kdkit.losses.kd import kd_loss
from kdkit.losses.pkd import pkd_loss
from kdkit.losses.sp import sp_loss
from kdkit.losses.transforms import TRANSFORMS, Misfit, Value, fit_chain

B = 8
EXACT = {"rtol": 1e-12, "atol": 1e-14}


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def composed(transforms: list[str], distance: str, **kwargs: Any) -> ComposedLoss:
    return ComposedLoss(transforms=tuple(transforms), distance=distance, **kwargs)


# -- equivalence with the registered losses ---------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 4.0, 0.5])
def test_softmax_t_then_kl_is_hinton_kd_times_t_squared(temperature: float) -> None:
    s, t = randn(B, 10, seed=1), randn(B, 10, seed=2) * 3
    loss = composed(["softmax_t"], "kl", transform_params={"softmax_t": {"temperature": temperature}})
    torch.testing.assert_close(loss(s, t, None), kd_loss(s, t, temperature), **EXACT)


@pytest.mark.parametrize("temperature", [2.0, 3.0])
def test_standardize_softmax_t_kl_is_logit_standardised_kd(temperature: float) -> None:
    s, t = randn(B, 10, seed=3) * 5 + 2, randn(B, 10, seed=4)
    loss = composed(["standardize", "softmax_t"], "kl", transform_params={"softmax_t": {"temperature": temperature}})
    torch.testing.assert_close(loss(s, t, None), kd_loss(s, t, temperature, standardize=True), **EXACT)


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_attention_l2_normalize_mse_is_attention_transfer(p: float) -> None:
    s, t = randn(B, 4, 5, 5, seed=5), randn(B, 7, 5, 5, seed=6)  # channels differ, as AT allows
    loss = composed(["attention", "l2_normalize"], "mse", transform_params={"attention": {"p": p}})
    torch.testing.assert_close(loss(s, t, None), at_loss(s, t, p), **EXACT)


def test_channel_std_mse_is_twice_pkd() -> None:
    s, t = randn(B, 6, 4, 4, seed=7) * 3 + 1, randn(B, 6, 4, 4, seed=8)
    loss = composed(["channel_std"], "mse")
    torch.testing.assert_close(loss(s, t, None), 2 * pkd_loss(s, t), **EXACT)


def test_cka_distance_is_the_cka_loss_on_any_widths() -> None:
    s, t = randn(B, 4, 3, 3, seed=9), randn(B, 10, seed=10)
    torch.testing.assert_close(composed([], "cka")(s, t, None), cka_loss(s, t), **EXACT)


def test_relation_mse_is_similarity_preserving_kd() -> None:
    s, t = randn(B, 4, 4, 4, seed=11), randn(B, 6, 2, 2, seed=12)
    torch.testing.assert_close(composed(["relation"], "mse")(s, t, None), sp_loss(s, t), **EXACT)


def test_softmax_t_pearson_is_dist_inter_class_term() -> None:
    s, t = randn(B, 10, seed=13), randn(B, 10, seed=14)
    loss = composed(["softmax_t"], "pearson", transform_params={"softmax_t": {"temperature": 4.0}})
    torch.testing.assert_close(loss(s, t, None), dist_loss(s, t, beta=1.0, gamma=0.0, temperature=4.0), **EXACT)


def test_js_and_reverse_kl_match_their_definitions() -> None:
    s, t = randn(B, 10, seed=15), randn(B, 10, seed=16)
    p_s, p_t = s.softmax(1), t.softmax(1)
    m = (p_s + p_t) / 2
    kl = lambda p, q: (p * (p / q).log()).sum(1).mean()  # noqa: E731
    one = {"softmax_t": {"temperature": 1.0}}
    torch.testing.assert_close(composed(["softmax_t"], "js", transform_params=one)(s, t, None),
                               0.5 * kl(p_s, m) + 0.5 * kl(p_t, m), **EXACT)
    torch.testing.assert_close(composed(["softmax_t"], "reverse_kl", transform_params=one)(s, t, None),
                               kl(p_s, p_t), **EXACT)


# -- properties of every transform and distance ----------------------------------------------------------------------

def shapes_for(name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-sample shapes the transform applies to: logits if it takes them, else feature maps."""
    for shape in ((10,), (4, 4, 4)):
        if not isinstance(TRANSFORMS.get(name).rule(shape, shape), str):
            return shape, shape
    raise AssertionError(f"{name} applies to neither logits nor maps")


def term_for_transform(name: str) -> ComposedLoss:
    return composed([name], "kl" if TRANSFORMS.get(name).distribution else "mse")


def term_for_distance(name: str) -> ComposedLoss:
    return composed(["softmax_t"] if DISTANCES.get(name).needs_distribution else [], name)


def inputs(shape: tuple[int, ...], dtype: torch.dtype = torch.float64, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    return randn(B, *shape, seed=20, dtype=torch.float64).to(dtype) * scale, \
        randn(B, *shape, seed=21, dtype=torch.float64).to(dtype) * scale


TRANSFORM_NAMES = TRANSFORMS.names()
DISTANCE_NAMES = DISTANCES.names()


def test_the_grammar_has_the_pieces_the_papers_search() -> None:
    assert {"identity", "softmax_t", "log_softmax_t", "standardize", "attention", "channel_std", "l2_normalize",
            "relation", "pool", "random_mask", "teacher_mask"} <= set(TRANSFORM_NAMES)
    assert {"kl", "reverse_kl", "js", "mse", "l1", "smooth_l1", "cosine", "pearson", "cka"} <= set(DISTANCE_NAMES)


@pytest.mark.parametrize("name", TRANSFORM_NAMES)
def test_transform_output_shape_is_what_its_rule_says(name: str) -> None:
    shape, _ = shapes_for(name)
    s, t = inputs(shape)
    torch.manual_seed(0)
    out_s, out_t = TRANSFORMS.get(name).apply(Value(s), Value(t), composed([name], "mse" if not TRANSFORMS.get(
        name).distribution else "kl").transform_params[name])
    rule = fit_chain([name], {}, shape, shape)
    assert not isinstance(rule, Misfit)
    expected = tuple(B if d == -1 else d for d in rule[0])
    assert tuple(out_s.x.shape[1:]) == expected and tuple(out_t.x.shape[1:]) == expected
    assert out_s.x.dtype == torch.float64 and out_t.x.dtype == torch.float64


@pytest.mark.parametrize("name", TRANSFORM_NAMES)
def test_transform_term_keeps_float64_and_upcasts_half_precisions(name: str) -> None:
    shape, _ = shapes_for(name)
    loss = term_for_transform(name)
    s, t = inputs(shape)
    torch.manual_seed(0)
    value64 = loss(s, t, None)
    assert value64.dtype == torch.float64
    for half in (torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        value = loss(s.to(half), t.to(half), None)
        assert value.dtype == half and torch.isfinite(value.float())
        # computed in float32 from the rounded inputs: within the inputs' rounding, not the half's accumulation
        torch.manual_seed(0)
        value32 = loss(s.to(half).float(), t.to(half).float(), None)
        torch.testing.assert_close(value.float(), value32.to(half).float(), rtol=0, atol=0)


@pytest.mark.parametrize("name", TRANSFORM_NAMES)
def test_transform_term_is_zero_for_identical_taps(name: str) -> None:
    shape, _ = shapes_for(name)
    s, _ = inputs(shape)
    torch.manual_seed(0)
    assert term_for_transform(name)(s, s.clone(), None).abs().item() < 1e-12


@pytest.mark.parametrize("scale", [1.0, 1e4, 1e-6])
@pytest.mark.parametrize("name", TRANSFORM_NAMES)
def test_transform_term_gradients_are_finite_on_extreme_and_near_identical_inputs(name: str, scale: float) -> None:
    shape, _ = shapes_for(name)
    s, t = inputs(shape, scale=scale)
    for teacher in (t, s + 1e-9 * t):  # far apart, and nearly identical
        student = s.clone().requires_grad_(True)
        torch.manual_seed(0)
        value = term_for_transform(name)(student, teacher, None)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(student.grad).all(), (name, scale)


@pytest.mark.parametrize("name", DISTANCE_NAMES)
def test_distance_is_zero_for_identical_inputs_and_positive_otherwise(name: str) -> None:
    s, t = inputs((10,))
    loss = term_for_distance(name)
    assert loss(s, s.clone(), None).abs().item() < 1e-9
    assert loss(s, t, None).item() > 1e-3


@pytest.mark.parametrize("name", DISTANCE_NAMES)
def test_distance_keeps_float64_upcasts_half_and_has_finite_gradients(name: str) -> None:
    loss = term_for_distance(name)
    for scale in (1.0, 1e4, 1e-6):
        s, t = inputs((10,), scale=scale)
        for teacher in (t, s + 1e-9 * t):
            student = s.clone().requires_grad_(True)
            value = loss(student, teacher, None)
            value.backward()
            assert value.dtype == torch.float64 and torch.isfinite(value), (name, scale)
            assert torch.isfinite(student.grad).all(), (name, scale)
    s, t = inputs((10,))
    value = loss(s.to(torch.bfloat16), t.to(torch.bfloat16), None)
    value32 = loss(s.to(torch.bfloat16).float(), t.to(torch.bfloat16).float(), None)
    assert value.dtype == torch.bfloat16
    torch.testing.assert_close(value.float(), value32.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_random_mask_zeroes_the_same_positions_on_both_sides() -> None:
    s, t = randn(B, 3, 6, 6, seed=30), randn(B, 5, 6, 6, seed=31)
    torch.manual_seed(0)
    out_s, out_t = TRANSFORMS.get("random_mask").fn(s, t, ratio=0.5)
    zero_s, zero_t = (out_s == 0).all(dim=1), (out_t == 0).all(dim=1)
    assert torch.equal(zero_s, zero_t) and 0.3 < zero_s.double().mean().item() < 0.7


def test_teacher_mask_keeps_the_teachers_most_attended_positions() -> None:
    t = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    t[0, :, 0, 1] = 5.0  # the one position the teacher attends to
    t[0, :, 1, 0] = 1.0
    s = torch.ones(1, 3, 2, 2, dtype=torch.float64)
    out_s, _ = TRANSFORMS.get("teacher_mask").fn(s, t, keep=0.25)
    assert out_s[0, 0].tolist() == [[0.0, 1.0], [0.0, 0.0]]


def test_softmax_t_on_maps_is_a_distribution_over_each_channels_positions() -> None:
    s, t = randn(B, 3, 4, 4, seed=34), randn(B, 3, 4, 4, seed=35)
    loss = composed(["softmax_t"], "kl", transform_params={"softmax_t": {"temperature": 2.0}})
    log_p_s, log_p_t = (x.flatten(2).div(2.0).log_softmax(-1) for x in (s, t))
    expected = 4.0 * (log_p_t.exp() * (log_p_t - log_p_s)).sum() / B  # channel-wise distillation, T² batch mean
    torch.testing.assert_close(loss(s, t, None), expected, **EXACT)


def test_a_softmax_ends_the_chain() -> None:
    with pytest.raises(KdkitError, match="ends a chain") as err:
        composed(["softmax_t", "l2_normalize"], "mse")
    assert err.value.where == "transforms.0"


def test_pool_makes_maps_of_different_sizes_comparable() -> None:
    s, t = randn(B, 4, 8, 8, seed=32), randn(B, 4, 4, 4, seed=33)
    loss = composed(["pool"], "mse")
    assert loss.check_shapes((4, 8, 8), (4, 4, 4)) is None
    assert loss(s, t, None).item() > 0


# -- bad input -------------------------------------------------------------------------------------------------------

def test_unknown_transform_and_distance_name_the_closest_choices() -> None:
    with pytest.raises(KdkitError) as err:
        composed(["softmaxt"], "kl")
    assert err.value.choices[0] == "softmax_t" and err.value.where == "transforms.0"
    with pytest.raises(KdkitError) as err:
        composed(["softmax_t"], "kld")
    assert err.value.choices[0] == "kl" and err.value.where == "distance"


def test_divergence_after_a_chain_without_softmax_is_refused_naming_the_plain_distances() -> None:
    with pytest.raises(KdkitError, match="end `transforms:` with softmax_t") as err:
        composed(["relation"], "kl")
    assert "mse" in err.value.choices and "kl" not in err.value.choices


def test_repeated_transform_and_params_of_a_missing_transform_are_refused() -> None:
    with pytest.raises(KdkitError, match="appears twice"):
        composed(["l2_normalize", "l2_normalize"], "mse")
    with pytest.raises(KdkitError, match="not in the chain") as err:
        composed(["softmax_t"], "kl", transform_params={"softmax": {"temperature": 2}})
    assert err.value.choices == ["softmax_t"]
    with pytest.raises(KdkitError, match="temperature must be > 0"):
        composed(["softmax_t"], "kl", transform_params={"softmax_t": {"temperature": 0}})


def test_misfit_transform_names_the_transforms_that_apply() -> None:
    problem = composed(["attention", "l2_normalize"], "mse").check_shapes((10,), (10,))
    assert isinstance(problem, KdkitError) and "'attention' does not apply" in problem.message
    assert "attention" not in problem.choices and "softmax_t" in problem.choices and "pool" not in problem.choices
    problem = composed([], "mse").check_shapes((16, 4, 4), (32, 4, 4))
    assert isinstance(problem, KdkitError) and problem.choices == ["cka"]


def recipe(tmp_path: Path, term: dict[str, Any]) -> Path:
    data = {"name": "grammar", "model": {"arch": "cnn_student"}, "data": {"dataset": "digits"},
            "teacher": {"arch": "cnn_teacher", "checkpoint": str(tmp_path / "teacher.safetensors")},
            "distill": [{"loss": "composed", **term}], "train": {"epochs": 1},
            "output": {"dir": str(tmp_path / "run")}}
    return write_recipe(tmp_path / "recipe.yaml", data)


@pytest.mark.parametrize(("term", "expected"), [
    ({"transforms": ["standardise", "softmax_t"]},
     "distill.0.transforms.0: unknown transform 'standardise'; valid choices: standardize"),
    ({"transforms": ["softmax_t"], "distance": "kll"}, "distill.0.distance: unknown distance 'kll'; valid choices: kl"),
    ({"transforms": ["attention"], "distance": "mse"},
     "distill.0: transform 'attention' does not apply to student (10,) and teacher (10,)"),
])
def test_validate_exits_2_before_training_naming_the_bad_piece(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], term: dict[str, Any], expected: str) -> None:
    assert main(["validate", str(recipe(tmp_path, term))]) == 2
    assert expected in capsys.readouterr().err


def test_a_valid_composed_recipe_validates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    term = {"student": "stage2", "teacher": "stage2", "transforms": ["attention", "l2_normalize"], "distance": "mse"}
    assert main(["validate", str(recipe(tmp_path, term))]) == 0, capsys.readouterr().err
