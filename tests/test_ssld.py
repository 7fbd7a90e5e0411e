"""SSLD label-free distillation (kdkit.methods.ssld): the loss against plain loops, its properties, the refusals and
a tiny run that reads no label."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import edit_recipe, write_recipe
from kdkit.cli import main
from kdkit.methods.ssld import ssld_loss
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe


def softmax(row: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def js_reference(student: torch.Tensor, teacher: torch.Tensor, t: float) -> float:
    """Mean over the batch of 0.5 KL(p_t || m) + 0.5 KL(p_s || m), m the average, in Python floats."""
    total = 0.0
    for zs, zt in zip(student.tolist(), teacher.tolist(), strict=True):
        ps, pt = softmax(zs, t), softmax(zt, t)
        m = [(a + b) / 2 for a, b in zip(ps, pt, strict=True)]
        total += 0.5 * sum(a * math.log(a / c) for a, c in zip(pt, m, strict=True))
        total += 0.5 * sum(a * math.log(a / c) for a, c in zip(ps, m, strict=True))
    return total / len(student)


def soft_ce_reference(student: torch.Tensor, teacher: torch.Tensor, t: float) -> float:
    total = 0.0
    for zs, zt in zip(student.tolist(), teacher.tolist(), strict=True):
        total -= sum(b * math.log(a) for a, b in zip(softmax(zs, t), softmax(zt, t), strict=True))
    return total / len(student)


@pytest.mark.parametrize("t", [1.0, 3.0])
def test_js_and_soft_ce_match_plain_loops(t: float) -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g,
                                                                                       dtype=torch.float64) * 3
    js = ssld_loss(student, teacher, "js", t)
    assert js.dtype == torch.float64 and float(js) == pytest.approx(js_reference(student, teacher, t), rel=1e-10)
    ce = ssld_loss(student, teacher, "soft_ce", t)
    assert float(ce) == pytest.approx(soft_ce_reference(student, teacher, t), rel=1e-10)


def test_js_is_zero_when_identical_symmetric_and_below_ln2() -> None:
    z = torch.randn(4, 10, dtype=torch.float64)
    assert float(ssld_loss(z, z.clone())) == pytest.approx(0, abs=1e-12)
    a, b = torch.randn(4, 10, dtype=torch.float64) * 50, torch.randn(4, 10, dtype=torch.float64) * 50
    assert float(ssld_loss(a, b)) == pytest.approx(float(ssld_loss(b, a)), rel=1e-12)
    assert float(ssld_loss(a, b)) <= math.log(2) + 1e-12


def test_gradients_stay_finite_on_saturated_logits_and_half_is_upcast() -> None:
    student = (torch.randn(4, 10) * 1e4).requires_grad_()
    loss = ssld_loss(student, torch.randn(4, 10) * -1e4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    half = ssld_loss(torch.randn(4, 10).half() * 100, torch.randn(4, 10).half() * 100)
    assert half.dtype == torch.float16 and torch.isfinite(half)


def ssld_recipe(tiny_kd: dict) -> dict:
    recipe = copy.deepcopy(tiny_kd)
    recipe["data"]["setting"] = {"name": "semi_supervised", "labelled": 50}
    recipe["distill"] = [{"loss": "ssld"}]
    recipe["train"]["ce_weight"] = 0
    return recipe


def test_the_shipped_recipe_validates() -> None:
    assert main(["validate", "recipes/semi_supervised/label_free.yaml"]) == 0


@pytest.mark.parametrize(("change", "message"), [
    ({"train.ce_weight": 0.5}, "train.ce_weight is 0.5; set train.ce_weight: 0"),
    ({"distill.1": {"loss": "kd"}}, "the recipe also has ['kd']; remove them"),
    ({"distill.0.divergence": "kl"}, "js"),
    ({"peers": {"p": {"arch": "cnn_student"}}}, "remove `peers:`"),
])
def test_recipes_ssld_cannot_work_with_are_refused(change: dict, message: str, tiny_kd: dict, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    recipe = edit_recipe(ssld_recipe(tiny_kd), change)
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert message in capsys.readouterr().err


def test_no_teacher_is_refused(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = copy.deepcopy(tiny)
    recipe["distill"] = [{"loss": "ssld"}]
    recipe["train"]["ce_weight"] = 0
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert "teacher" in capsys.readouterr().err


@pytest.mark.slow
def test_a_tiny_label_free_run_learns_from_the_teacher_alone(tiny_kd: dict) -> None:
    summary = run_recipe(recipe_from_dict(ssld_recipe(tiny_kd)))
    rows = json.loads((Path(tiny_kd["output"]["dir"]) / "metrics.json").read_text())
    assert all("train_ssld" in r and "train_ce" not in r for r in rows)
    assert summary["epochs"] == 2


@pytest.mark.slow
def test_the_shipped_label_free_recipe_runs_on_a_slice(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from kdkit.models import build_model
    from kdkit.recipe import find_recipe, load_recipe

    torch.manual_seed(0)
    teacher = build_model("cnn_teacher", num_classes=10, in_channels=1, image_size=28)
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp_path / "t.safetensors"))
    overrides = ["train.epochs=1", "data.subset=600", "data.setting.labelled=300", "train.batch_size=64",
                 f"teacher.checkpoint={tmp_path / 't.safetensors'}", "teacher.recipe=null",
                 f"output.dir={tmp_path / 'run'}", "output.progress=false"]
    summary = run_recipe(load_recipe(find_recipe("semi_supervised/label_free"), overrides))
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["epochs"] == 1 and all("train_ssld" in r and "train_ce" not in r for r in rows)
