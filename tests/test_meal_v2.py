"""MEAL V2: the similarity term and the discriminator term against independent computations (the official code's
formulas, float64), the discriminator's place (trained with the student, never deployed), the refusals, and a tiny
two-teacher run end to end that resumes exactly."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import straight_and_resumed, write_recipe
from kdkit.cli import main
from kdkit.losses import LOSSES
from kdkit.methods.meal_v2 import Discriminator, meal_v2_discriminator_loss
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe


def logits(near: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Student and two teachers' float64 logits: random, or near-identical (every teacher ~ the student)."""
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(6, 5, generator=gen, dtype=torch.float64) * 2
    if near:
        return student, [student + 1e-6 * torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(2)]
    return student, [torch.randn(6, 5, generator=gen, dtype=torch.float64) * 3 for _ in range(2)]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("near", [False, True])
def test_similarity_is_the_official_soft_cross_entropy_minus_the_teachers_entropy(near: bool) -> None:
    """MEAL V2's similarity term is multi_teacher_kd at T=1: KL(p_bar || p_s), the official KLLoss
    (-sum p_bar log p_s, batch mean) minus the averaged teachers' entropy (a constant for the student)."""
    student, teachers = logits(near)
    s, ts = student.numpy(), [t.numpy() for t in teachers]
    p_bar = np.mean([softmax(t) for t in ts], axis=0)
    log_p_s = s - s.max(1, keepdims=True) - np.log(np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True))
    soft_ce = -(p_bar * log_p_s).sum(1).mean()
    entropy = -(p_bar * np.log(p_bar)).sum(1).mean()
    value = LOSSES.get("multi_teacher_kd")(temperature=1.0)(student, teachers, torch.zeros(6, dtype=torch.long))
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(soft_ce - entropy, rel=1e-10, abs=1e-12)
    if near:
        assert abs(value.item()) < 1e-10


def numpy_discriminator(disc: Discriminator, x: np.ndarray) -> np.ndarray:
    """The discriminator's logits computed apart, in float64 numpy, from its weights."""
    layers = [m for m in disc.layers if isinstance(m, torch.nn.Linear)]
    for i, layer in enumerate(layers):
        x = x @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()
        if i < len(layers) - 1 or disc.final_relu:
            x = np.maximum(x, 0)
    return x


def bce(z: np.ndarray, target: np.ndarray) -> float:
    """Mean binary cross-entropy with logits (torch's BCEWithLogitsLoss), in numpy."""
    return float(np.mean(np.maximum(z, 0) - z * target + np.log1p(np.exp(-np.abs(z)))))


def official_inputs(student: torch.Tensor, teachers: list[torch.Tensor], inputs: str) -> tuple[np.ndarray, ...]:
    s, ts = student.numpy(), [t.numpy() for t in teachers]
    if inputs == "logits":  # the official code: the student's logits and the teachers' mean logits (soft_no_softmax)
        return s, np.mean(ts, axis=0)
    return softmax(s), np.mean([softmax(t) for t in ts], axis=0)


@pytest.mark.parametrize("near", [False, True])
@pytest.mark.parametrize("inputs", ["probabilities", "logits"])
@pytest.mark.parametrize("final_relu", [False, True])
def test_joint_objective_is_the_official_discriminator_loss(near: bool, inputs: str, final_relu: bool) -> None:
    torch.manual_seed(0)
    disc = Discriminator(5, 7, final_relu).double()
    student, teachers = logits(near)
    s, t = official_inputs(student, teachers, inputs)
    target = np.array([[1.0, 0.0]] * len(s) + [[0.0, 1.0]] * len(t))  # the official [1, 0] student, [0, 1] teacher
    expected = bce(numpy_discriminator(disc, np.concatenate([s, t])), target)
    value = meal_v2_discriminator_loss(student, teachers, disc, inputs, "joint")
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("near", [False, True])
def test_adversarial_objective_trains_the_discriminator_to_tell_and_the_student_to_fool(near: bool) -> None:
    torch.manual_seed(0)
    disc = Discriminator(5, 7).double()
    student, teachers = logits(near)
    s, t = official_inputs(student, teachers, "probabilities")
    tell = bce(numpy_discriminator(disc, np.concatenate([s, t])),
               np.array([[1.0, 0.0]] * len(s) + [[0.0, 1.0]] * len(t)))
    fool = bce(numpy_discriminator(disc, s), np.array([[0.0, 1.0]] * len(s)))
    student = student.clone().requires_grad_(True)
    value = meal_v2_discriminator_loss(student, teachers, disc, "probabilities", "adversarial")
    assert value.item() == pytest.approx(tell + fool, rel=1e-10)
    value.backward()
    d_grads = [p.grad.clone() for p in disc.parameters()]
    s_grad = student.grad.clone()
    # the discriminator's gradient is the telling loss's alone (the student's output detached there) ...
    disc.zero_grad()
    joint = meal_v2_discriminator_loss(student.detach(), teachers, disc, "probabilities", "joint")
    joint.backward()
    for got, want in zip(d_grads, (p.grad for p in disc.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    # ... and the student's is the fooling loss's: its output called the teachers' by a fixed discriminator
    x = student.detach().clone().requires_grad_(True)
    z = disc(torch.softmax(x, 1))
    torch.nn.functional.binary_cross_entropy_with_logits(z, z.new_tensor([0.0, 1.0]).expand_as(z)).backward()
    torch.testing.assert_close(s_grad, x.grad, rtol=1e-10, atol=1e-14)


def test_the_student_fooling_the_discriminator_lowers_the_fooling_part() -> None:
    """Sign check: a student output the discriminator takes for the teachers' costs less than one it spots."""
    disc = Discriminator(2, 4)
    with torch.no_grad():
        for layer in disc.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
                layer.bias.zero_()
        disc.layers[0].weight[0, 0] = 1.0  # hidden unit 0 = p_0
        disc.layers[2].weight[0, 0] = 1.0
        disc.layers[4].weight[:, 0] = torch.tensor([-10.0, 10.0])  # p_0 high: "teacher"
    teachers = [torch.tensor([[5.0, 0.0]])]

    @torch.no_grad()
    def fooling(student: torch.Tensor) -> float:  # the adversarial value minus the telling part (= the joint value)
        return float(meal_v2_discriminator_loss(student, teachers, disc) -
                     meal_v2_discriminator_loss(student, teachers, disc, objective="joint"))

    assert fooling(torch.tensor([[5.0, 0.0]])) < 0.01 < 0.5 < fooling(torch.tensor([[0.0, 5.0]]))


TWO_TEACHERS_TERMS = [
    {"loss": "multi_teacher_kd", "name": "similarity", "teacher": ["a.logits", "b.logits"], "temperature": 1},
    {"loss": "meal_v2_discriminator", "name": "discriminator", "teacher": ["a.logits", "b.logits"], "hidden": 8},
]


def meal_recipe(tiny_kd: dict) -> dict:
    recipe = copy.deepcopy(tiny_kd)
    checkpoint = recipe.pop("teacher")["checkpoint"]
    recipe["teachers"] = {"a": {"arch": "cnn_teacher", "checkpoint": checkpoint},
                          "b": {"arch": "cnn_teacher", "checkpoint": checkpoint}}
    recipe["distill"] = copy.deepcopy(TWO_TEACHERS_TERMS)
    recipe["train"]["ce_weight"] = 0
    recipe["train"]["optimizer"]["weight_decay"] = 0
    return recipe


def test_the_shipped_recipe_validates(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "recipes/fashion_mnist/meal_v2.yaml"]) == 0


@pytest.mark.parametrize(("change", "message"), [
    ({"train": {"ce_weight": 0.1}}, "train.ce_weight is 0.1; set train.ce_weight: 0"),
    ({"teachers": None}, "no `teacher:` is given: distill.0 (multi_teacher_kd), distill.1 (meal_v2_discriminator); "
                         "add `teacher:` (one) or `teachers:`"),
    ({"teachers": {}}, "`teachers:` is empty"),
    ({"peers": {"p": {"arch": "cnn_student"}}}, "remove `peers:`"),
    ({"distill": [{**TWO_TEACHERS_TERMS[1], "objective": "minimax"}]}, "adversarial"),
    ({"distill": [{**TWO_TEACHERS_TERMS[1], "hidden": 0}]}, "hidden must be >= 1"),
    ({"distill": [{**TWO_TEACHERS_TERMS[1], "teacher": ["a.stage2", "b.stage2"]}]}, "needs (K,) logits"),
])
def test_recipes_meal_v2_cannot_work_with_are_refused(change: dict, message: str, tiny_kd: dict, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    recipe = meal_recipe(tiny_kd)
    for key, value in change.items():
        if isinstance(value, dict) and key == "train":
            recipe[key].update(value)
        elif value is None:
            recipe.pop(key)
        else:
            recipe[key] = value
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert message in capsys.readouterr().err


def test_the_discriminator_is_trained_with_the_student_and_not_deployed(tiny_kd: dict) -> None:
    seen = {}

    def inspect(engine: object, event: str) -> None:
        if event == "epoch" and not seen:
            disc = engine.objective.losses["discriminator"].discriminator  # type: ignore[attr-defined]
            optimised = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}  # type: ignore[attr-defined]
            seen["in_optimiser"] = all(id(p) in optimised for p in disc.parameters())
            seen["in_student"] = any(p is q for p in disc.parameters()
                                     for q in engine.student.parameters())  # type: ignore[attr-defined]
            seen["weights"] = [p.detach().clone() for p in disc.parameters()]

    recipe = meal_recipe(tiny_kd)
    recipe["train"]["epochs"] = 1
    recipe["data"]["subset"] = 64
    summary = run_recipe(recipe_from_dict(recipe), callbacks=[inspect])
    assert seen["in_optimiser"] and not seen["in_student"]
    disc_params = 10 * 8 + 8 + 8 * 8 + 8 + 8 * 2 + 2
    assert summary["loss_params"] == disc_params and summary["bridge_params"] == 0
    assert summary["deployed"]["params"] == summary["params"]  # the plain student, no discriminator


@pytest.mark.slow
def test_a_tiny_two_teacher_meal_v2_run_logs_both_terms_and_resumes_exactly(tiny_kd: dict, tmp_path: Path) -> None:
    recipe = meal_recipe(tiny_kd)
    straight, broken = straight_and_resumed(recipe, tmp_path, 8)
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((broken / "metrics.json").read_text())
    assert all("train_similarity" in r and "train_discriminator" in r and "train_ce" not in r for r in a)
    assert [(r["train_loss"], r["test_top1"]) for r in a] == [(r["train_loss"], r["test_top1"]) for r in b]


def test_one_teacher_is_enough(tiny_kd: dict, tmp_path: Path) -> None:
    """`teacher:` (one) instead of `teachers:`: the terms read its logits."""
    recipe = copy.deepcopy(tiny_kd)
    recipe["distill"] = [{"loss": "kd", "temperature": 1}, {"loss": "meal_v2_discriminator", "hidden": 8}]
    recipe["train"]["ce_weight"] = 0
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0
