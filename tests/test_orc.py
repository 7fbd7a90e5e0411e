"""ORC: ranking and promotion, error samples and their mixup on hand-checked cases, the losses against independent
float64 computations, what trains what, the refusals, and a tiny run end to end that resumes exactly."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import edit_recipe, straight_and_resumed, write_recipe
from kdkit.build import plan
from kdkit.checkpoint import resolve_weights
from kdkit.cli import main
from kdkit.errors import KdkitError
from kdkit.methods.orc import (
    OrcBatch,
    OrcLoss,
    OrcMethod,
    feedback_mask,
    group_loss,
    intensive_loss,
    mix_with_feedback,
    promoted,
    ranking_losses,
)
from kdkit.recipe import load_recipe, recipe_from_dict
from kdkit.runner import run_recipe, train_weights_first

F64 = torch.float64
LABELS = torch.tensor([0, 1, 2, 0])
# Three students' logits on four samples of three classes, chosen so that the cross-entropies order B < A < C and
# the arg-maxes are: A right on 0, 1, 2, wrong on 3 (predicts 1); B right everywhere; C wrong on 1 and 3.
A = torch.tensor([[2.0, 0, 0], [0, 2, 0], [0, 0, 2], [0, 1, 0]], dtype=F64)
B = torch.tensor([[3.0, 0, 0], [0, 3, 0], [0, 0, 3], [1, 0, 0]], dtype=F64)
C = torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1]], dtype=F64)


def ce(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy, written out."""
    total = 0.0
    for row, y in zip(logits.tolist(), labels.tolist(), strict=True):
        total += math.log(sum(math.exp(v) for v in row)) - row[y]
    return total / len(labels)


def kd(student: np.ndarray, teacher: np.ndarray, t: float) -> float:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), mean over samples, written out."""
    total = 0.0
    for s, q in zip(student.tolist(), teacher.tolist(), strict=True):
        zs, zq = sum(math.exp(v / t) for v in s), sum(math.exp(v / t) for v in q)
        for vs, vq in zip(s, q, strict=True):
            p_t, p_s = math.exp(vq / t) / zq, math.exp(vs / t) / zs
            total += p_t * (math.log(p_t) - math.log(p_s))
    return t * t * total / len(student)


def test_ranking_is_each_students_cross_entropy_and_the_lowest_are_promoted() -> None:
    ranking = ranking_losses([A, B, C], LABELS)
    expected = [ce(s.numpy(), LABELS.numpy()) for s in (A, B, C)]
    torch.testing.assert_close(ranking, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=0)
    assert expected[1] < expected[0] < expected[2]  # the case is what its comment says
    assert promoted(ranking, 1).tolist() == [1]
    assert promoted(ranking, 2).tolist() == [1, 0]


def test_a_tie_promotes_the_lower_index_and_one_student_always_stays() -> None:
    assert promoted(torch.tensor([0.5, 0.2, 0.2]), 1).tolist() == [1]
    with pytest.raises(ValueError, match="at least one must stay a student"):
        promoted(torch.tensor([0.5, 0.2, 0.2]), 3)


def test_error_samples_are_those_any_or_all_students_got_wrong() -> None:
    assert feedback_mask([A, B, C], LABELS, "any").tolist() == [False, True, False, True]
    assert feedback_mask([A, C], LABELS, "all").tolist() == [False, False, False, True]
    assert feedback_mask([A, B, C], LABELS, "all").tolist() == [False, False, False, False]


def test_each_sample_is_mixed_with_the_error_sample_its_draw_picks() -> None:
    x = torch.arange(4, dtype=F64).view(4, 1, 1, 1) * 10  # sample i is the image 10 * i
    mask = torch.tensor([False, True, False, True])  # errors: samples 1 and 3
    draw = torch.tensor([0.0, 0.6, 0.49, 0.99], dtype=F64)  # floor(draw * 2): 0, 1, 0, 1 -> samples 1, 3, 1, 3
    mixed, partner = mix_with_feedback(x, LABELS, mask, draw, 0.25)
    assert partner.tolist() == [1, 0, 1, 0]  # the labels of samples 1, 3, 1, 3
    assert mixed.flatten().tolist() == [0.25 * 0 + 0.75 * 10, 0.25 * 10 + 0.75 * 30, 0.25 * 20 + 0.75 * 10,
                                        0.25 * 30 + 0.75 * 30]
    with pytest.raises(ValueError, match="at least one error sample"):
        mix_with_feedback(x, LABELS, torch.zeros(4, dtype=torch.bool), draw, 0.5)


def test_intensive_loss_is_lam_ce_of_the_label_plus_one_minus_lam_ce_of_the_partners() -> None:
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    partner = torch.tensor([1, 0, 1, 0])
    want = 0.3 * ce(z.numpy(), LABELS.numpy()) + 0.7 * ce(z.numpy(), partner.numpy())
    assert abs(float(intensive_loss(z, LABELS, partner, 0.3)) - want) < 1e-12


@pytest.mark.parametrize("teaching", ["individual", "mean"])
def test_private_and_group_teaching_match_the_papers_formulas(teaching: str) -> None:
    pivot = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=F64) * 2
    beta, t, y = 0.3, 2.0, LABELS.numpy()
    a, b, c, p = (m.numpy() for m in (A, B, C, pivot))
    # B is the temporary teacher: it learns from the pivot alone; A and C from the pivot and B
    want = (1 - beta) * ce(b, y) + beta * kd(b, p, t)
    for s in (a, c):
        distil = kd(s, p, t) + kd(s, b, t) if teaching == "individual" else kd(s, (p + b) / 2, t)
        want += (1 - beta) * ce(s, y) + beta * distil
    got = group_loss([A, B, C], pivot, LABELS, torch.tensor([1]), beta, t, teaching)  # type: ignore[arg-type]
    assert got.dtype == F64 and abs(float(got) - want) < 1e-12


def orc_case(refine: torch.nn.Module | None) -> tuple[OrcLoss, list[torch.Tensor]]:
    loss = OrcLoss(beta=0.3, temperature=2.0)
    loss.setup([(3,)] * 4, (3,), 4)
    if refine is not None:
        loss.refine = refine.__call__
    return loss, [m.clone().requires_grad_(True) for m in (A, B, C, torch.zeros(4, 3, dtype=F64))]


def test_the_loss_adds_the_pivots_refinement_and_each_network_gets_only_its_own_gradient() -> None:
    pivot_net = torch.nn.Linear(1, 3).double()
    loss, taps = orc_case(pivot_net)
    x = torch.arange(4, dtype=F64).view(4, 1)
    draw = torch.tensor([0.0, 0.6, 0.49, 0.99], dtype=F64)
    loss.batch = OrcBatch(x, draw, 0.25)
    value = loss.compute(taps, None, LABELS)
    students = [t.detach() for t in taps[:3]]
    mixed, partner = mix_with_feedback(x, LABELS, feedback_mask(students, LABELS), draw, 0.25)
    with torch.no_grad():
        want = group_loss(students, taps[3].detach(), LABELS, torch.tensor([1]), 0.3, 2.0) + \
            intensive_loss(pivot_net(mixed), LABELS, partner, 0.25)
    torch.testing.assert_close(value, want, rtol=1e-12, atol=0)
    value.backward()
    assert taps[3].grad is None  # the pivot's logits on the batch are only a target
    assert pivot_net.weight.grad is not None and pivot_net.weight.grad.abs().sum() > 0  # refined on x~
    own = (1 - 0.3) * torch.nn.functional.cross_entropy(taps[1], LABELS)  # B's own part, from the pivot alone
    from kdkit.losses.kd import kd_loss
    own = own + 0.3 * kd_loss(taps[1], taps[3].detach(), 2.0)
    (grad_b,) = torch.autograd.grad(own, taps[1])
    torch.testing.assert_close(taps[1].grad, grad_b, rtol=1e-12, atol=1e-15)
    assert loss.batch is None  # one batch, one refinement
    assert (loss.promotions.tolist(), loss.roles.tolist(), int(loss.steps), int(loss.refined),
            int(loss.feedback_samples)) == ([0, 1, 0], [0, 1, 0], 1, 1, 2)


def test_a_batch_without_error_samples_does_not_refine_the_pivot() -> None:
    calls = []
    loss, taps = orc_case(None)
    loss.refine = lambda x: calls.append(x) or x
    right = [B.clone(), B.clone() * 2, B.clone() * 3, taps[3]]
    loss.batch = OrcBatch(torch.zeros(4, 1, dtype=F64), torch.zeros(4, dtype=F64), 0.5)
    value = loss.compute(right, None, LABELS)
    want = group_loss(right[:3], taps[3], LABELS, torch.tensor([2]), 0.3, 2.0)
    torch.testing.assert_close(value, want, rtol=0, atol=0)
    assert calls == [] and int(loss.refined) == 0 and loss.promotions.tolist() == [0, 0, 1]


def test_a_refining_loss_without_its_batch_fails_loudly() -> None:
    loss, taps = orc_case(torch.nn.Linear(1, 3).double())
    with pytest.raises(RuntimeError, match="no batch was handed over"):
        loss.compute(taps, None, LABELS)


def test_orc_refuses_to_run_under_ddp() -> None:
    with pytest.raises(KdkitError, match="one process"):
        OrcMethod().attach(None, SimpleNamespace(enabled=True, world_size=2))


def test_the_shipped_recipe_validates() -> None:
    assert main(["validate", "recipes/fashion_mnist/orc.yaml"]) == 0


def orc_recipe(tiny: dict, teacher_file: Path) -> dict:
    recipe = copy.deepcopy(tiny)
    recipe["peers"] = {"peer": {"arch": "cnn_student"},
                       "pivot": {"arch": "cnn_teacher", "checkpoint": str(teacher_file)}}
    recipe["distill"] = [{"loss": "orc", "student": ["model.logits", "peer.logits", "pivot.logits"]}]
    recipe["orc"] = {"alpha": 1.0}
    recipe["train"]["ce_weight"] = 0
    return recipe


@pytest.mark.parametrize(("change", "message"), [
    ({"peers": {"pivot": {"arch": "cnn_teacher", "checkpoint": "x"}},
      "distill.0.student": ["model.logits", "pivot.logits"]}, "2 networks (model, pivot) are too few"),
    ({"distill.0.promote": 2}, "3 networks (model, peer, pivot) are too few"),
    ({"peers.pivot.checkpoint": None}, "peers.pivot.checkpoint and peers.pivot.recipe are None"),
    ({"teacher": {"arch": "cnn_teacher", "checkpoint": "x"}}, "a frozen `teacher:`/`teachers:` cannot be"),
    ({"train.ce_weight": 1.0}, "set train.ce_weight: 0"),
    ({"distill.0.student": ["model.logits", "peer.logits"]}, "reads each trained network's logits once"),
    ({"distill.0.student": ["model.logits", "peer.stage1", "pivot.logits"]}, "reads each trained network's logits"),
    ({"distill.0.student": ["peer.logits", "pivot.logits", "model.logits"]}, "is 'model', the deployed network"),
    ({"distill.1": {"loss": "kd", "student": "logits", "teacher": "peer.logits"}}, "is another term"),
    ({"distill.1": {"loss": "orc", "student": ["model.logits", "peer.logits", "pivot.logits"]}}, "a second `orc`"),
    ({"distill.0.teacher": "peer.logits"}, "remove `teacher:` from the term"),
    ({"peers": None}, "ORC trains a group of networks"),
    ({"distill.0.beta": 1.0}, "beta"),
    ({"orc.alpha": 0}, "alpha"),
    ({"orc.feedback": "most"}, "feedback"),
    ({"distill.0": {"loss": "kd", "student": "logits", "teacher": "peer.logits"}}, "and distill has none"),
    ({"distill.0.teaching": "vote"}, "teaching"),
    ({"data.setting": {"name": "semi_supervised", "labelled": 50}}, "reads the class labels"),
])
def test_recipes_orc_cannot_work_with_are_refused(change: dict, message: str, tiny: dict, teacher_file: Path,
                                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = edit_recipe(orc_recipe(tiny, teacher_file), change)
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_tiny_orc_run_refines_the_pivot_deploys_the_model_and_resumes_exactly(tiny: dict, teacher_file: Path,
                                                                                 tmp_path: Path) -> None:
    recipe = orc_recipe(tiny, teacher_file)
    straight, broken = straight_and_resumed(recipe, tmp_path, 9)  # 6 steps an epoch: mid-epoch 2
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight, broken))
    assert [(r["train_loss"], r["test_top1"]) for r in a] == [(r["train_loss"], r["test_top1"]) for r in b]
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (straight, broken))
    assert sa["orc"] == sb["orc"]  # the role counters are checkpointed
    assert sa["orc"]["steps"] == 12 and sum(sa["orc"]["promotions"].values()) == 12
    assert sa["orc"]["refined_steps"] > 0
    assert sa["deployed"]["params"] < sa["params"]  # only `model` is deployed
    plan_recipe = recipe_from_dict(recipe, [f"output.dir={tmp_path / 'once'}", "train.epochs=1"])
    seen = {}

    def pivot_moves(engine: object, event: str) -> None:
        pivot = engine.student.model.pivot  # type: ignore[attr-defined]
        if event == "epoch_start":
            seen["before"] = [p.detach().clone() for p in pivot.parameters()]
        elif event == "epoch":
            seen["moved"] = any(not torch.equal(p, q) for p, q in zip(pivot.parameters(), seen["before"], strict=True))

    run_recipe(plan_recipe, callbacks=[pivot_moves])
    assert seen["moved"]


def test_a_pivot_named_by_its_recipe_is_trained_first_and_starts_from_that_run(tiny: dict, teacher_file: Path,
                                                                                 tmp_path: Path) -> None:
    teacher = {**copy.deepcopy(tiny), "name": "pivot_teacher", "model": {"arch": "cnn_teacher"},
               "output": {"dir": str(tmp_path / "teacher_run"), "progress": False}}
    teacher["train"]["epochs"] = 1
    write_recipe(tmp_path / "teacher.yaml", teacher)
    recipe = edit_recipe(orc_recipe(tiny, teacher_file), {"peers.pivot": {"arch": "cnn_teacher",
                                                                           "recipe": "teacher.yaml"}})
    source = write_recipe(tmp_path / "orc.yaml", recipe)
    loaded = load_recipe(source)
    assert loaded.weights_sources()["peers.pivot"].recipe == "teacher.yaml"
    train_weights_first(loaded, source)
    assert (tmp_path / "teacher_run" / "summary.json").is_file()  # trained first, by its own recipe
    pivot = plan(loaded, training=True, source=source).student.model.pivot
    trained = load_file(str(resolve_weights(tmp_path / "teacher_run")))
    assert all(torch.equal(value, trained[f"model.{name}"]) for name, value in pivot.state_dict().items())


def test_a_pivot_recipe_that_is_not_there_is_named_with_the_places_searched(
        tiny: dict, teacher_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = edit_recipe(orc_recipe(tiny, teacher_file), {"peers.pivot": {"arch": "cnn_teacher",
                                                                           "recipe": "no_teacher.yaml"}})
    assert main(["validate", str(write_recipe(tmp_path / "orc.yaml", recipe))]) == 2
    assert "peers.pivot.recipe: no recipe file 'no_teacher.yaml'" in capsys.readouterr().err


def test_the_report_says_how_often_each_student_taught() -> None:
    summary = {"orc": {"pivot": "pivot", "promotions": {"model": 1, "peer": 3}, "steps": 4, "refined_steps": 2,
                       "feedback_samples": 7}}
    text = OrcMethod().report_section("run", summary, Path("runs/x"))
    assert "model 25.0 %, peer 75.0 % of 4 steps" in text and "refined in 2 steps on 7 error samples" in text
    assert OrcMethod().report_section("run", {}, Path("runs/x")) == ""
