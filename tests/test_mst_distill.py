"""MST-Distill: routing, load balance and masked teachers against independent computations (plain loops), the
masking module and gate, the refusals (one teacher, k above the teachers, ...), and a tiny two-modality run end to
end (masks trained, routing reported) with an exact resume across the masking phase."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import edit_recipe, straight_and_resumed, write_recipe
from kdkit.bench.methods import method_recipes, suites
from kdkit.cli import main
from kdkit.errors import KdkitError
from kdkit.methods.mst_distill import (
    GateNet,
    MaskNet,
    MstDistillLoss,
    load_balance,
    masked_logits,
    topk_routed_kd,
    weighted_routed_kd,
)
from kdkit.models import build_model
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe

TEACHER_TAPS = ["mm.logits", "edges.logits", "mm.stage2", "edges.stage2"]


def softmax(row: list[float]) -> list[float]:
    top = max(row)
    e = [math.exp(v - top) for v in row]
    return [v / sum(e) for v in e]


def kl_by_hand(teacher: list[float], student: list[float], temp: float) -> float:
    p_t, p_s = softmax([v / temp for v in teacher]), softmax([v / temp for v in student])
    return temp**2 * sum(a * math.log(a / b) for a, b in zip(p_t, p_s, strict=True))


def routing_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    teachers = torch.randn(4, 3, 3, generator=gen, dtype=torch.float64) * 2  # (B, M, K)
    gate = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3], [0.4, 0.35, 0.25]], dtype=torch.float64)
    return student, teachers, gate


def test_top1_routing_distils_each_sample_from_its_highest_routed_teacher() -> None:
    s, t, g = routing_batch()
    loss, chosen = topk_routed_kd(s, t, g, k=1, temperature=4.0)
    assert chosen.flatten().tolist() == [0, 2, 1, 0]
    expected = sum(kl_by_hand(t[i, m].tolist(), s[i].tolist(), 4.0) for i, m in enumerate([0, 2, 1, 0])) / 4
    assert float(loss) == pytest.approx(expected, abs=1e-12)


def test_top2_routing_averages_the_two_ranks() -> None:
    s, t, g = routing_batch()
    loss, chosen = topk_routed_kd(s, t, g, k=2, temperature=2.0)
    ranks = [[0, 1], [2, 1], [1, 2], [0, 1]]
    assert chosen.tolist() == ranks
    expected = sum(kl_by_hand(t[i, m].tolist(), s[i].tolist(), 2.0) for i, r in enumerate(ranks) for m in r) / 8
    assert float(loss) == pytest.approx(expected, abs=1e-12)


def test_weighted_routing_distils_the_probability_weighted_teacher_logits() -> None:
    s, t, g = routing_batch()
    expected = 0.0
    for i in range(4):
        mixed = [sum(float(g[i, m]) * float(t[i, m, c]) for m in range(3)) for c in range(3)]
        expected += kl_by_hand(mixed, s[i].tolist(), 4.0) / 4
    assert float(weighted_routed_kd(s, t, g, 4.0)) == pytest.approx(expected, abs=1e-12)


def test_load_balance_kl_and_cv_by_hand() -> None:
    _, _, g = routing_batch()
    mean = [sum(float(g[i, m]) for i in range(4)) / 4 for m in range(3)]
    kl = sum((1 / 3) * (math.log(1 / 3) - math.log(v)) for v in mean) / 3  # KLDivLoss(batchmean) over M entries
    assert float(load_balance(g, "kl")) == pytest.approx(kl, abs=1e-12)
    sums = [4 * v for v in mean]
    mu = sum(sums) / 3
    std = math.sqrt(sum((v - mu) ** 2 for v in sums) / 2)  # torch.std: unbiased
    assert float(load_balance(g, "cv")) == pytest.approx(std / mu, abs=1e-12)
    uniform = torch.full((5, 3), 1 / 3, dtype=torch.float64)
    assert float(load_balance(uniform, "kl")) == pytest.approx(0.0, abs=1e-15)


def test_masked_logits_reapply_the_classifier_to_the_masked_flattened_map() -> None:
    gen = torch.Generator().manual_seed(1)
    fc = torch.nn.Linear(2 * 2 * 2, 3).double()
    f = torch.randn(2, 2, 2, 2, generator=gen, dtype=torch.float64)
    assert torch.allclose(masked_logits(f, torch.ones(2, 2, dtype=torch.float64), fc), fc(f.flatten(1)))
    mask = torch.tensor([[1.0, 0.0], [0.5, 0.25]], dtype=torch.float64)
    by_hand = torch.stack([fc(torch.cat([(f[i, c] * mask[i, c]).flatten() for c in range(2)])) for i in range(2)])
    assert torch.allclose(masked_logits(f, mask, fc), by_hand)


def test_mask_and_gate_shapes() -> None:
    mask = MaskNet(12, heads=3, hidden_factor=2)
    assert mask.hidden == 6  # 12 // (2 * 3) * 3, the official width rule
    out = mask(torch.randn(5, 12, 4, 4))
    assert out.shape == (5, 12) and bool(((out > 0) & (out < 1)).all())
    assert GateNet(10, 3)(torch.randn(4, 10)).shape == (4, 3)


def test_the_loss_refuses_one_teacher_and_more_routes_than_teachers() -> None:
    loss = MstDistillLoss()
    problem = loss.check_shapes((10,), [(10,), (4, 3, 3)])
    assert isinstance(problem, KdkitError) and "a router over one teacher" in str(problem)
    assert isinstance(MstDistillLoss(k=3).check_shapes((10,), [(10,), (10,), (4, 3, 3), (4, 3, 3)]), KdkitError)
    assert MstDistillLoss(k=2).check_shapes((10,), [(10,), (10,), (4, 3, 3), (4, 3, 3)]) is None


def test_warmup_sums_every_teachers_kd_and_route_adds_the_balance() -> None:
    gen = torch.Generator().manual_seed(2)
    loss = MstDistillLoss(temperature=3.0, balance_weight=0.5)
    loss.setup((3,), [(3,), (3,), (2, 1, 1), (2, 1, 1)], num_samples=10)
    loss.double()
    s = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    teacher = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(2)] + \
              [torch.randn(4, 2, 1, 1, generator=gen, dtype=torch.float64) for _ in range(2)]
    loss.stage = "warmup"
    warm = sum(kl_by_hand(teacher[m][i].tolist(), s[i].tolist(), 3.0) for m in range(2) for i in range(4)) / 4
    assert float(loss(s, teacher, torch.zeros(4))) == pytest.approx(warm, abs=1e-12)
    loss.stage = "route"
    probs = loss.gate(s).softmax(1)
    stacked = torch.stack(teacher[:2], dim=1)
    expected = topk_routed_kd(s, stacked, probs, 1, 3.0)[0] + 0.5 * load_balance(probs, "kl")
    assert float(loss(s, teacher, torch.zeros(4)).detach()) == pytest.approx(float(expected.detach()), abs=1e-12)
    assert float(loss.routed.sum()) == 4


@pytest.fixture
def two_teachers(tmp_path: Path) -> dict[str, str]:
    """Random-weight teachers for 2-channel 8x8 digits: both channels, and the edge channel only."""
    paths = {}
    for name, params in (("mm", {}), ("edges", {"channels": [1]})):
        torch.manual_seed(5)
        model = build_model("cnn_teacher", num_classes=10, in_channels=2, image_size=8, params=params)
        paths[name] = str(tmp_path / f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, paths[name])
    return paths


def mst_recipe(tiny: dict, two_teachers: dict[str, str]) -> dict:
    recipe = copy.deepcopy(tiny)
    recipe["model"] = {"arch": "cnn_student", "params": {"channels": [0]}}
    recipe["data"]["setting"] = {"name": "two_modalities"}
    recipe["teachers"] = {"mm": {"arch": "cnn_teacher", "checkpoint": two_teachers["mm"]},
                          "edges": {"arch": "cnn_teacher", "params": {"channels": [1]},
                                    "checkpoint": two_teachers["edges"]}}
    recipe["distill"] = [{"loss": "mst_distill", "teacher": list(TEACHER_TAPS)}]
    recipe["mst_distill"] = {"route_epoch": 1, "mask_epochs": 0.5}
    recipe["train"]["ce_weight"] = 1.0
    return recipe


@pytest.mark.parametrize(("change", "message"), [
    ({"distill.0.teacher": ["mm.logits", "mm.stage2"]}, "a router over one teacher has nothing to choose"),
    ({"distill.0.k": 3}, "k 3 routes each sample to more teachers than the 2 there are"),
    ({"distill.1": {"loss": "mst_distill", "teacher": TEACHER_TAPS}}, "2 `mst_distill` terms"),
    ({"mst_distill.route_epoch": 2}, "routing would never start"),
    ({"distill.0.routing": "random"}, "routing"),
])
def test_recipes_mst_distill_cannot_work_with_are_refused(change: dict, message: str, tiny: dict, two_teachers: dict,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = edit_recipe(mst_recipe(tiny, two_teachers), change)
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert message in capsys.readouterr().err


def test_the_default_route_epoch_is_refused_before_training_when_it_is_the_last_epoch(
        tiny: dict, two_teachers: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = mst_recipe(tiny, two_teachers)
    recipe.pop("mst_distill")  # default route_epoch 1
    recipe["train"]["epochs"] = 1
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert "routing would never start" in capsys.readouterr().err
    assert not (Path(tiny["output"]["dir"]) / "metrics.json").exists()


def test_a_pooled_head_teacher_is_refused_before_training(tiny: dict, two_teachers: dict, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(5)
    pooled = build_model("cnn_teacher", num_classes=10, in_channels=2, image_size=8, params={"head": "pool"})
    save_file({k: v.contiguous() for k, v in pooled.state_dict().items()}, str(tmp_path / "pool.safetensors"))
    recipe = mst_recipe(tiny, two_teachers)
    recipe["teachers"]["mm"] = {"arch": "cnn_teacher", "params": {"head": "pool"},
                                "checkpoint": str(tmp_path / "pool.safetensors")}
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert "does not read 'stage2' flattened" in capsys.readouterr().err
    assert not (Path(tiny["output"]["dir"]) / "metrics.json").exists()


@pytest.mark.slow
def test_a_tiny_two_modality_run_trains_the_masks_and_routes(tiny: dict, two_teachers: dict) -> None:
    summary = run_recipe(recipe_from_dict(mst_recipe(tiny, two_teachers)))
    mst = summary["mst_distill"]
    assert mst["teachers"] == ["mm.stage2", "edges.stage2"]
    assert mst["masks"]["steps"] == 3 and math.isfinite(mst["masks"]["mask_kl"])  # half of 7 batches, rounded up
    assert len(mst["routed_share"]) == 2 and sum(mst["routed_share"]) == pytest.approx(1.0)


@pytest.mark.slow
def test_mst_distill_resumes_exactly_across_the_masking_phase(tiny: dict, two_teachers: dict, tmp_path: Path) -> None:
    straight, broken = straight_and_resumed(mst_recipe(tiny, two_teachers), tmp_path, 9)
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((broken / "metrics.json").read_text())
    assert [(r["train_loss"], r["test_top1"]) for r in a] == [(r["train_loss"], r["test_top1"]) for r in b]


def test_the_two_modality_suite_is_a_benchmark_suite_with_its_baselines_first() -> None:
    assert "two_modalities" in suites()
    assert method_recipes("two_modalities") == ["student_ce", "kd", "mst_distill"]
