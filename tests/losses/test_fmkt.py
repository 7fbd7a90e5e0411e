"""FM-KT / OFM-KT losses: per-step formula, wrapped metrics, Dirac shuffle, Theta, teacher-less recipes."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

from kdkit.build import plan
from kdkit.distill import Objective, Term
from kdkit.errors import RecipeErrors
from kdkit.losses import LOSSES, KDLoss, kd_loss
from kdkit.methods.fmkt import FlowEstimates
from kdkit.methods.fmkt.losses import FMKTLoss, OFMKTLoss, dirac_shuffle, smoothed_ce
from kdkit.recipe import Recipe


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_kd(s: np.ndarray, t: np.ndarray, temp: float) -> float:
    log_ps, log_pt = np_log_softmax(s / temp), np_log_softmax(t / temp)
    return float((np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1).mean() * temp**2)


def np_ce(z: np.ndarray, y: np.ndarray, smoothing: float = 0.0) -> float:
    log_p = np_log_softmax(z)
    total = 0.0
    for b in range(len(y)):
        for k in range(z.shape[1]):
            q = 1.0 - smoothing if k == y[b] else smoothing / (z.shape[1] - 1)
            total -= q * log_p[b, k]
    return total / len(y)


def sample(n: int = 3, b: int = 6, k: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, b, k, generator=g, dtype=torch.float64), torch.randn(b, k, generator=g, dtype=torch.float64),
            torch.randint(0, k, (b,), generator=g))


def test_fmkt_is_the_step_mean_of_metric_plus_ce() -> None:
    steps, teacher, y = sample()
    loss = FMKTLoss(metric="kd", metric_params={"temperature": 2.0}, ce_weight=0.5)
    got = loss(FlowEstimates(steps), teacher, y).item()
    s, t, labels = steps.numpy(), teacher.numpy(), y.numpy()
    expected = sum(np_kd(s[i], t, 2.0) + 0.5 * np_ce(s[i], labels) for i in range(3)) / 3
    assert got == pytest.approx(expected, rel=1e-6)


def test_fmkt_is_zero_ce_free_at_identity() -> None:
    _, teacher, y = sample()
    same = FlowEstimates(teacher.expand(3, -1, -1).clone())
    assert FMKTLoss(metric="kd", ce_weight=0.0)(same, teacher, y).item() == pytest.approx(0.0, abs=1e-12)


def test_theta_trains_the_plain_logits_on_the_detached_ensemble() -> None:
    steps, teacher, y = sample()
    plain = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    steps.requires_grad_(True)
    loss = FMKTLoss(metric="kd", metric_params={"temperature": 4.0}, ce_weight=1.0)
    with_theta = loss(FlowEstimates(steps, plain), teacher, y)
    without = loss(FlowEstimates(steps), teacher, y)
    ens = steps.detach().numpy().mean(0)
    extra = np_kd(plain.detach().numpy(), ens, 4.0) + np_ce(plain.detach().numpy(), y.numpy())
    assert (with_theta - without).item() == pytest.approx(extra, rel=1e-6)
    # the Theta term sends no gradient into the chain (the ensemble is detached)
    g_with = torch.autograd.grad(with_theta, steps, retain_graph=True)[0]
    g_without = torch.autograd.grad(without, steps)[0]
    torch.testing.assert_close(g_with, g_without)


def test_ofmkt_formula() -> None:
    steps, _, y = sample(seed=3)
    loss = OFMKTLoss(metric="kd", metric_params={"temperature": 3.0}, label_smoothing=0.2)
    got = loss(FlowEstimates(steps), None, y).item()
    s, labels = steps.numpy(), y.numpy()
    ens = s.mean(0)
    expected = sum(np_ce(s[i], labels, 0.2) + np_kd(s[i], ens, 3.0) for i in range(3)) / 3
    assert got == pytest.approx(expected, rel=1e-6)


def test_smoothed_ce_puts_eps_over_k_minus_1_off_target() -> None:
    z, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 5, 2, 2])
    assert smoothed_ce(z, y, 0.1).item() == pytest.approx(np_ce(z.numpy(), y.numpy(), 0.1), rel=1e-6)


def test_ofmkt_gradients_are_finite_and_skip_the_detached_target() -> None:
    steps, _, y = sample()
    steps.requires_grad_(True)
    OFMKTLoss()(FlowEstimates(steps), None, y).backward()
    assert torch.isfinite(steps.grad).all() and steps.grad.abs().sum() > 0


# -- Dirac ratio ----------------------------------------------------------------------------------

def test_dirac_shuffle_permutes_the_first_rows_into_a_new_tensor() -> None:
    torch.manual_seed(0)
    teacher = torch.arange(40.0).view(10, 4)
    before = teacher.clone()
    out = dirac_shuffle(teacher, 0.3)  # 7 of 10 rows shuffled among themselves
    torch.testing.assert_close(teacher, before)
    assert out.data_ptr() != teacher.data_ptr()
    torch.testing.assert_close(out[7:], teacher[7:])
    assert sorted(out[:7, 0].tolist()) == sorted(teacher[:7, 0].tolist())
    assert dirac_shuffle(teacher, 1.0) is teacher


def test_dirac_shuffle_leaves_other_terms_inputs_untouched() -> None:
    torch.manual_seed(1)
    steps, teacher, y = sample(b=16)
    teacher = teacher.float()
    logits = torch.randn(16, 5)
    original = teacher.clone()
    terms = [Term("fmkt", FMKTLoss(metric="kd", dirac_ratio=0.0), "stage2", "logits"),
             Term("kd", KDLoss(temperature=4.0), "logits", "logits")]
    out = Objective(terms, ce_weight=0.0)(logits, y, {"fmkt": FlowEstimates(steps.float()), "kd": logits},
                                          {"logits": teacher})
    torch.testing.assert_close(teacher, original)
    assert out["kd"].item() == pytest.approx(kd_loss(logits, original, 4.0).item())


def test_dirac_ratio_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="dirac_ratio"):
        FMKTLoss(dirac_ratio=1.5)


# -- validation through the recipe machinery ------------------------------------------------------

def fmkt_recipe(tiny: dict[str, Any], **term: Any) -> Recipe:
    recipe = copy.deepcopy(tiny)
    recipe["distill"] = [{"loss": "fmkt", "student": "stage2", "bridge": "flow", **term}]
    recipe["train"]["ce_weight"] = 0.0
    return Recipe.model_validate(recipe)


def test_unknown_metric_fails_before_training_with_closest_choices(tiny_kd: dict[str, Any]) -> None:
    with pytest.raises(RecipeErrors) as info:
        plan(fmkt_recipe(tiny_kd, metric="dkdd"), training=False)
    error = info.value.errors[0]
    assert error.where == "distill.0.metric" and "unknown loss 'dkdd'" in error.message
    assert error.choices[0] == "dkd"


def test_bad_metric_param_fails_before_training(tiny_kd: dict[str, Any]) -> None:
    with pytest.raises(RecipeErrors) as info:
        plan(fmkt_recipe(tiny_kd, metric="kd", metric_params={"temprature": 4}), training=False)
    error = info.value.errors[0]
    assert error.where == "distill.0.metric_params.temprature" and error.choices[0] == "temperature"


def test_a_flow_loss_needs_the_flow_bridge(tiny_kd: dict[str, Any]) -> None:
    recipe = fmkt_recipe(tiny_kd)
    bad = Recipe.model_validate({**recipe.to_dict(), "distill": [{"loss": "fmkt", "student": "stage2"}]})
    with pytest.raises(RecipeErrors, match="add `bridge: flow`"):
        plan(bad, training=False)


def test_fmkt_plans_with_the_metric_set_up(tiny_kd: dict[str, Any]) -> None:
    built = plan(fmkt_recipe(tiny_kd, metric="dist", metric_params={"temperature": 4.0}), training=True)
    assert built.tap_shapes["fmkt"] == ((10,), (10,))
    assert built.student.deploy_term == "fmkt"
    assert isinstance(built.objective.terms[0].loss.metric, LOSSES.get("dist"))


def test_ofmkt_needs_no_teacher_and_fmkt_does(tiny: dict[str, Any]) -> None:
    online = copy.deepcopy(tiny)
    online["distill"] = [{"loss": "ofmkt", "student": "stage2", "bridge": "flow", "bridge_params": {"steps": 2}}]
    built = plan(Recipe.model_validate(online), training=True)
    assert built.teacher is None and built.objective.terms[0].teacher_tap is None
    assert built.tap_shapes["ofmkt"] == ((10,), (10,))
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    logits, per_term = built.student(x)
    comps = built.objective(logits, y, per_term, {})
    assert torch.isfinite(comps["loss"])
    offline = copy.deepcopy(tiny)
    offline["distill"] = [{"loss": "fmkt", "student": "stage2", "bridge": "flow"}]
    with pytest.raises(ValueError, match="no `teacher:` is given"):
        Recipe.model_validate(offline)
