"""KD³: each part of the loss against an independent computation (plain loops in float64), MixDistribution's
moments, the refusals, and a tiny shifted run end to end (with an exact resume)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import edit_recipe, straight_and_resumed, write_recipe
from kdkit.bench.methods import method_recipes, suites
from kdkit.cli import main
from kdkit.methods.kd3 import (
    Kd3Loss,
    classifier_alignment,
    draw_mix,
    mix_contrast,
    mix_distribution,
    select_instances,
    selected_kd,
    weighted_feature_alignment,
)
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe

TAPS = ["logits", "penultimate"]
TERM = {"loss": "kd3", "student": TAPS, "teacher": TAPS}


def softmax(row: list[float]) -> list[float]:
    top = max(row)
    e = [math.exp(v - top) for v in row]
    return [v / sum(e) for v in e]


def test_selection_thresholds_the_combined_confidence_by_hand() -> None:
    # teacher sure of class 0, student of class 1: the combined prediction decides
    s = torch.tensor([[0.0, 4.0, 0.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[4.0, 0.0, 0.0], [5.0, 0.0, 0.0], [3.0, 0.0, 0.0]], dtype=torch.float64)
    mask, weights = select_instances(s, t, teacher_weight=0.5, threshold=0.6)
    expected_conf = []
    for srow, trow in zip(s.tolist(), t.tolist(), strict=True):
        combined = [0.5 * a + 0.5 * b for a, b in zip(softmax(trow), softmax(srow), strict=True)]
        expected_conf.append(max(combined))
    # row 0: 0.5 * 0.964 + 0.5 * 0.018 = 0.491 < 0.6; row 1: 0.5 * 0.987 + 0.5 / 3 = 0.660; row 2: 0.910
    assert mask.tolist() == [0.0, 1.0, 1.0]
    assert weights.tolist() == pytest.approx([0.0, expected_conf[1], expected_conf[2]], abs=1e-12)
    # the teacher alone (teacher_weight 1) selects row 0 as well
    assert select_instances(s, t, teacher_weight=1.0, threshold=0.6)[0].tolist() == [1.0, 1.0, 1.0]


def test_selection_gives_no_gradient() -> None:
    s = torch.randn(4, 3, requires_grad=True)
    mask, weights = select_instances(s, torch.randn(4, 3))
    assert not mask.requires_grad and not weights.requires_grad


def test_selected_kd_averages_the_kl_over_selected_instances_only() -> None:
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randn(5, 4, generator=gen, dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    temp = 3.0
    total = 0.0
    for i in (0, 2, 3):
        p_t, p_s = softmax((t[i] / temp).tolist()), softmax((s[i] / temp).tolist())
        total += temp**2 * sum(a * math.log(a / b) for a, b in zip(p_t, p_s, strict=True))
    assert float(selected_kd(s, t, mask, temp)) == pytest.approx(total / 3, abs=1e-12)
    assert float(selected_kd(s, t, torch.zeros(5, dtype=torch.float64), temp)) == 0.0


def test_weighted_feature_alignment_by_hand() -> None:
    projected = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 3.0]], dtype=torch.float64)
    teacher = torch.tensor([[1.0, 0.0], [5.0, 5.0], [0.0, 3.0]], dtype=torch.float64)
    weights = torch.tensor([0.5, 0.0, 0.25], dtype=torch.float64)
    # per-instance mean squared gap: 2, 25 (weight 0), 4.5 -> (0.5 * 2 + 0.25 * 4.5) / 0.75
    assert float(weighted_feature_alignment(projected, teacher, weights)) == pytest.approx(2.125 / 0.75, abs=1e-12)
    assert float(weighted_feature_alignment(projected, teacher, torch.zeros(3, dtype=torch.float64))) == 0.0


def test_classifier_alignment_is_zero_exactly_when_the_classifiers_agree_through_the_projector() -> None:
    gen = torch.Generator().manual_seed(1)
    w_t, b_t = torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)
    a, a_b = torch.randn(4, 2, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)
    w_s, b_s = w_t @ a, w_t @ a_b + b_t
    assert float(classifier_alignment(w_s, b_s, w_t, b_t, a, a_b)) == pytest.approx(0.0, abs=1e-24)
    # functional check: the two classifiers then give the same logits on any student feature
    f = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    assert torch.allclose(f @ w_s.T + b_s, (f @ a.T + a_b) @ w_t.T + b_t)
    # by hand with loops: off by one in one weight entry and 2 in one bias entry
    w_s2, b_s2 = w_s.clone(), b_s.clone()
    w_s2[1, 0] += 1.0
    b_s2[2] -= 2.0
    assert float(classifier_alignment(w_s2, b_s2, w_t, b_t, a, a_b)) == pytest.approx(1 / 6 + 4 / 3, abs=1e-12)


def test_mix_contrast_is_infonce_by_hand() -> None:
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(4, 3, generator=gen, dtype=torch.float64)
    tau = 0.2

    def unit(v: list[float]) -> list[float]:
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    qs, ks = [unit(r) for r in q.tolist()], [unit(r) for r in k.tolist()]
    total = 0.0
    for i in range(4):
        sims = [sum(a * b for a, b in zip(qs[i], ks[j], strict=True)) / tau for j in range(4)]
        total -= sims[i] - math.log(sum(math.exp(v) for v in sims))
    assert float(mix_contrast(q, k, tau)) == pytest.approx(total / 4, abs=1e-12)


def test_mix_distribution_gives_each_image_the_mixed_moments_and_keeps_its_pattern() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(4, 2, 5, 5, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5, 2.0],
                                                                                dtype=torch.float64).view(4, 1, 1, 1)
    lam, perm = torch.tensor([1.0, 0.0, 0.3, 0.7], dtype=torch.float64), torch.tensor([1, 2, 3, 0])
    out = mix_distribution(x, lam, perm)
    mu, sd = x.mean((2, 3)), x.std((2, 3), unbiased=False)
    for i in range(4):
        j, lm = int(perm[i]), float(lam[i])
        assert torch.allclose(out[i].mean((1, 2)), lm * mu[i] + (1 - lm) * mu[j])
        assert torch.allclose(out[i].std((1, 2), unbiased=False), lm * sd[i] + (1 - lm) * sd[j])
        # the standardised pattern is the image's own
        z_in = (x[i] - mu[i].view(-1, 1, 1)) / sd[i].view(-1, 1, 1)
        z_out = (out[i] - out[i].mean((1, 2), keepdim=True)) / out[i].std((1, 2), unbiased=False, keepdim=True)
        assert torch.allclose(z_in, z_out)
    assert torch.allclose(out[0], x[0], atol=1e-14)  # lam 1 keeps the image (up to rounding)


def test_mix_draws_are_a_function_of_seed_epoch_and_step() -> None:
    a, b = draw_mix(8, 0.1, 0, 1, 2), draw_mix(8, 0.1, 0, 1, 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], draw_mix(8, 0.1, 0, 1, 3)[0])


def test_the_loss_sums_its_parts_on_the_halves_of_the_batch() -> None:
    gen = torch.Generator().manual_seed(4)
    loss = Kd3Loss(temperature=2.0, threshold=0.3, feature_weight=0.5, classifier_weight=2.0, contrast_weight=0.25)
    loss.setup([(3,), (2,)], [(3,), (4,)], num_samples=10)
    loss.double()
    s_fc, t_fc = torch.nn.Linear(2, 3).double(), torch.nn.Linear(4, 3).double()
    loss.bind_classifiers(s_fc, t_fc)
    s = [torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randn(6, 2, generator=gen, dtype=torch.float64)]
    t = [torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randn(6, 4, generator=gen, dtype=torch.float64)]
    value = loss(s, t, torch.full((6,), -1))
    p = loss.projector
    proj = s[1] @ p.weight.T + p.bias
    mask, weights = select_instances(s[0][:3], t[0][:3], 0.5, 0.3)
    expected = (selected_kd(s[0][:3], t[0][:3], mask, 2.0)
                + 0.5 * weighted_feature_alignment(proj[:3], t[1][:3], weights)
                + 2.0 * classifier_alignment(s_fc.weight, s_fc.bias, t_fc.weight, t_fc.bias, p.weight, p.bias)
                + 0.25 * mix_contrast(proj[3:], t[1][:3], 0.1))
    assert float(value.detach()) == pytest.approx(float(expected.detach()), abs=1e-12)
    assert loss.seen == 3 and loss.selected == float(mask.sum())
    with pytest.raises(ValueError, match="even size"):
        loss([x[:5] for x in s], [x[:5] for x in t], torch.full((5,), -1))


def kd3_recipe(tiny_kd: dict) -> dict:
    recipe = copy.deepcopy(tiny_kd)
    recipe["data"]["setting"] = {"name": "shifted", "pool": 0.5}
    recipe["distill"] = [dict(TERM)]
    recipe["kd3"] = {"mix_alpha": 0.1}
    recipe["train"]["ce_weight"] = 0
    return recipe


@pytest.mark.parametrize(("change", "message"), [
    ({"distill.0": {"loss": "kd"}}, "0 `kd3` terms in distill"),  # the kd3: section without its term
    ({"distill.0.student": "logits"}, "it needs both [logits, penultimate]"),
    ({"distill.1": dict(TERM)}, "2 `kd3` terms"),
    ({"teacher": None}, "add `teacher:`"),
    ({"teachers": "two"}, "remove `teachers:`/`peers:`"),
    ({"data.views": 2}, "set data.views: 1"),
    ({"kd3.mix_alpha": 0}, "mix_alpha"),
    ({"distill.0.threshold": 1.5}, "threshold"),
    ({"teacher.cache": {"views": 2}}, "kd3"),
])
def test_recipes_kd3_cannot_work_with_are_refused(change: dict, message: str, tiny_kd: dict, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    recipe = kd3_recipe(tiny_kd)
    for key, value in change.items():
        if value is None:  # a top-level section left out
            recipe.pop(key)
        elif value == "two":  # two teachers by name instead of one
            one = recipe.pop("teacher")
            recipe["teachers"] = {"a": one, "b": copy.deepcopy(one)}
            recipe["distill"][0]["teacher"] = ["a.logits", "a.penultimate"]
        else:
            edit_recipe(recipe, {key: value})
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_tiny_shifted_kd3_run_binds_the_classifiers_and_reports_the_selection(tiny_kd: dict) -> None:
    summary = run_recipe(recipe_from_dict(kd3_recipe(tiny_kd)))
    kd3 = summary["kd3"]
    assert kd3["originals_seen"] > 0 and 0.0 <= kd3["selected_share"] <= 1.0
    rows = json.loads((Path(tiny_kd["output"]["dir"]) / "metrics.json").read_text())
    assert all(math.isfinite(r["train_kd3"]) for r in rows)


@pytest.mark.slow
def test_kd3_resumes_exactly(tiny_kd: dict, tmp_path: Path) -> None:
    straight, broken = straight_and_resumed(kd3_recipe(tiny_kd), tmp_path, 4)
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((broken / "metrics.json").read_text())
    assert [(r["train_loss"], r["test_top1"]) for r in a] == [(r["train_loss"], r["test_top1"]) for r in b]


def test_the_shifted_suite_is_a_benchmark_suite_with_kd_before_kd3() -> None:
    assert "shifted" in suites()
    assert method_recipes("shifted") == ["student_ce", "kd", "kd3"]
