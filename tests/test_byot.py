"""Be Your Own Teacher: the loss against an independent computation (the paper's formula and the re-implementation's
hint, float64), the shallow head (its shapes, training-only, in the optimiser), the refusals, and a tiny run end to
end that resumes exactly."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import edit_recipe, straight_and_resumed, write_recipe
from kdkit.cli import main
from kdkit.distill import Student
from kdkit.errors import KdkitError
from kdkit.methods.byot import byot_head, byot_loss
from kdkit.models import build_model
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe

TERM = {"loss": "byot", "name": "byot_stage1", "student": ["stage1", "stage2", "logits"], "bridge": "byot_head",
        "alpha": 0.3, "temperature": 3, "hint_weight": 0.01}


def inputs(near: bool) -> tuple[torch.Tensor, ...]:
    """A head's feature and logits and the deep ones (float64): random, or the head ~ the deepest classifier."""
    gen = torch.Generator().manual_seed(2)
    deep_feature = torch.randn(5, 3, 2, 2, generator=gen, dtype=torch.float64)
    deep_logits = torch.randn(5, 4, generator=gen, dtype=torch.float64) * 2
    if near:
        noise = 1e-7 * torch.randn(5, 4, generator=gen, dtype=torch.float64)
        return deep_feature.clone(), deep_logits + noise, deep_feature, deep_logits
    return (torch.randn(5, 3, 2, 2, generator=gen, dtype=torch.float64),
            torch.randn(5, 4, generator=gen, dtype=torch.float64) * 2, deep_feature, deep_logits)


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(1, keepdims=True))


def reference(feature: np.ndarray, logits: np.ndarray, deep_feature: np.ndarray, deep_logits: np.ndarray,
              labels: np.ndarray, alpha: float, t: float, lam: float, hint: str) -> float:
    """The paper's (1 - a) CE + a T^2 KL + lambda hint, from the re-implementation's pieces: its soft cross-entropy
    (train.py's kd_loss_function) minus the target's entropy is the KL; its feature_loss_function is `masked_sum`."""
    ce = -log_softmax(logits)[np.arange(len(labels)), labels].mean()
    target = np.exp(log_softmax(deep_logits / t))
    soft_ce = -(target * log_softmax(logits / t)).sum(1).mean()
    entropy = -(target * np.log(target)).sum(1).mean()
    kl = (soft_ce - entropy) * t**2
    diff = (feature - deep_feature) ** 2
    if hint == "l2":
        hint_value = diff.reshape(len(diff), -1).sum(1).mean()
    else:
        hint_value = np.abs(diff * ((feature > 0) | (deep_feature > 0))).sum()
    return (1 - alpha) * ce + alpha * kl + lam * hint_value


@pytest.mark.parametrize("near", [False, True])
@pytest.mark.parametrize("hint", ["l2", "masked_sum"])
@pytest.mark.parametrize(("alpha", "temperature", "lam"), [(0.1, 3.0, 1e-4), (0.5, 1.0, 0.3), (1.0, 4.0, 0.0)])
def test_loss_is_the_papers_formula(near: bool, hint: str, alpha: float, temperature: float, lam: float) -> None:
    feature, logits, deep_feature, deep_logits = inputs(near)
    labels = torch.tensor([0, 3, 1, 1, 2])
    value = byot_loss(feature, logits, deep_feature, deep_logits, labels, alpha, temperature, lam, hint)
    assert value.dtype == torch.float64
    expected = reference(*(x.numpy() for x in (feature, logits, deep_feature, deep_logits, labels)), alpha,
                         temperature, lam, hint)
    assert value.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    if near:  # the head matches the deepest classifier: only its cross-entropy is left
        ce = torch.nn.functional.cross_entropy(logits, labels)
        assert value.item() == pytest.approx((1 - alpha) * ce.item(), rel=1e-6, abs=1e-12)


def test_the_deep_feature_and_logits_are_targets_without_gradient() -> None:
    feature, logits, deep_feature, deep_logits = (x.clone().requires_grad_(True) for x in inputs(False))
    byot_loss(feature, logits, deep_feature, deep_logits, torch.tensor([0, 3, 1, 1, 2]), 0.3, 3.0, 0.1).backward()
    assert feature.grad is not None and logits.grad is not None
    assert deep_feature.grad is None and deep_logits.grad is None


def test_the_head_maps_the_shallow_map_onto_the_deep_features_shape() -> None:
    head = byot_head([(8, 14, 14), (16, 7, 7), (10,)], (10,))
    feature, logits, deep, out_logits = head([torch.randn(2, 8, 14, 14), torch.randn(2, 16, 7, 7),
                                              torch.randn(2, 10)])
    assert feature.shape == (2, 16, 7, 7) and logits.shape == (2, 10)
    assert deep.shape == (2, 16, 7, 7) and out_logits.shape == (2, 10)
    pooled = byot_head([(8, 14, 14), (16,), (10,)], (10,))  # a vector deep feature: pooled, as the ResNets
    assert pooled([torch.randn(2, 8, 14, 14), torch.randn(2, 16), torch.randn(2, 10)])[0].shape == (2, 16)
    with pytest.raises(KdkitError, match="one integer stride"):
        byot_head([(8, 14, 14), (16, 5, 5), (10,)], (10,))
    with pytest.raises(KdkitError, match="three student taps"):
        byot_head([(8, 14, 14), (10,)], (10,))


def test_the_head_is_training_only_the_deployed_network_is_the_plain_model() -> None:
    torch.manual_seed(0)
    model = build_model("cnn_student", num_classes=10, in_channels=1, image_size=8)
    head = byot_head([(8, 4, 4), (16, 2, 2), (10,)], (10,))
    student = Student(model, {"byot": ("stage1", "stage2", "logits")}, {"byot": head})
    x = torch.randn(3, 1, 8, 8)
    student.eval()
    torch.testing.assert_close(student.predict(x), model(x))
    _, per_term = student(x)
    torch.testing.assert_close(per_term["byot"][3], model(x))  # the deepest classifier's logits, as they are
    torch.testing.assert_close(per_term["byot"][2], model.stage2(model.stage1(x)))


def byot_recipe(tiny: dict) -> dict:
    recipe = copy.deepcopy(tiny)
    recipe["distill"] = [copy.deepcopy(TERM)]
    recipe["train"]["ce_weight"] = 0.7
    return recipe


def test_the_shipped_recipe_validates() -> None:
    assert main(["validate", "recipes/fashion_mnist/byot.yaml"]) == 0


@pytest.mark.parametrize(("change", "message"), [
    ({"train.ce_weight": 0}, "set train.ce_weight to 1 - alpha"),
    ({"distill.0.bridge": None}, "loss 'byot' reads the output of the 'byot_head' bridge"),
    ({"distill.0.student": ["stage1", "logits"]}, "byot_head reads three student taps"),
    ({"distill.0.student": ["stage2", "stage1", "logits"]}, "one integer stride"),
    ({"distill.0.alpha": 1.5}, "alpha must be in [0, 1]"),
    ({"distill.0.hint": "l1"}, "hint"),
    ({"distill.0.loss": "ofmkt"}, "the `byot_head` bridge feeds the `byot` loss"),
    ({"peers": {"p": {"arch": "cnn_student"}}}, "remove `peers:`"),
    ({"data.setting": {"name": "semi_supervised", "labelled": 50}}, "loss 'byot' reads the class labels"),
])
def test_recipes_byot_cannot_work_with_are_refused(change: dict, message: str, tiny: dict, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    recipe = byot_recipe(tiny)
    edit_recipe(recipe, change)
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert message in capsys.readouterr().err


def test_the_head_is_trained_with_the_student_and_not_deployed(tiny: dict) -> None:
    seen = {}

    def inspect(engine: object, event: str) -> None:
        if event == "epoch" and not seen:
            head = engine.student.bridges["byot_stage1"]  # type: ignore[attr-defined]
            optimised = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}  # type: ignore[attr-defined]
            seen["in_optimiser"] = all(id(p) in optimised for p in head.parameters())

    recipe = byot_recipe(tiny)
    recipe["train"]["epochs"] = 1
    recipe["data"]["subset"] = 64
    summary = run_recipe(recipe_from_dict(recipe), callbacks=[inspect])
    assert seen["in_optimiser"]
    assert summary["bridge_params"] > 0 and summary["deployed"]["params"] == summary["params"]


@pytest.mark.slow
def test_a_tiny_byot_run_logs_its_term_and_resumes_exactly(tiny: dict, tmp_path: Path) -> None:
    straight, broken = straight_and_resumed(byot_recipe(tiny), tmp_path, 8)
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((broken / "metrics.json").read_text())
    assert all("train_byot_stage1" in r and "train_ce" in r for r in a)
    assert [(r["train_loss"], r["test_top1"]) for r in a] == [(r["train_loss"], r["test_top1"]) for r in b]
