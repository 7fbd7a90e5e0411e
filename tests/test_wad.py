"""WAD (weight-aware distillation under class mismatch): class scores, pseudo-labels, weights and the loss against
independent computations of the official code's formulas, the refusals, and a tiny class-mismatch run end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import edit_recipe, straight_and_resumed, write_recipe
from kdkit.bench.methods import method_recipes, suites
from kdkit.build import plan
from kdkit.cli import main
from kdkit.data import UNLABELLED
from kdkit.methods.wad import WadLoss, class_similarities, pseudo_labels_and_weights, weighted_pseudo_label_ce
from kdkit.methods.wad.method import knowledge, teacher_features
from kdkit.methods.wad.rounds import most_confident, promotion_fraction, round_starts
from kdkit.models import build_model
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe


def test_class_scores_are_the_cosine_to_the_nearest_labelled_sample_of_each_class_by_hand() -> None:
    labelled = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])  # class 0, class 1, class 1
    classes = torch.tensor([0, 1, 1])
    unlabelled = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    scores = class_similarities(unlabelled, labelled, classes, 2)
    r = 1 / np.sqrt(2)
    expected = [[1.0, r],  # class 1's best is (3, 3) at 45 degrees
                [r, 1.0],  # (1, 1) is (3, 3)'s direction
                [-1.0, 0.0]]  # opposite (1, 0); orthogonal to (0, 2)
    np.testing.assert_allclose(scores.numpy(), expected, atol=1e-6)
    pseudo, weight = pseudo_labels_and_weights(scores)
    assert pseudo.tolist() == [0, 1, 1]
    np.testing.assert_allclose(weight.numpy(), [1 - r, 1 - r, 1.0], atol=1e-6)


def official_knowledge(u: np.ndarray, v: np.ndarray, y: np.ndarray, classes: int) -> tuple[list, list]:
    """The official knowledge_generation with one shift: per class, max cosine; weight s1 * (1 - s2 / s1)."""
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    labels, weights = [], []
    for row in u:
        logits = [max(float(row @ v[j]) for j in range(len(v)) if y[j] == c) for c in range(classes)]
        ordered = sorted(logits)
        labels.append(int(np.argmax(logits)))
        weights.append(ordered[-1] * (1 - ordered[-2] / ordered[-1]))
    return labels, weights


def test_pseudo_labels_and_weights_match_the_official_loops_in_chunks() -> None:
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(12, 5, generator=gen, dtype=torch.float64).abs()  # positive: s1 > 0 as in the official division
    y = torch.arange(12) % 4
    u = torch.randn(9, 5, generator=gen, dtype=torch.float64).abs()
    scores = class_similarities(u, v, y, 4, chunk=4)  # three blocks
    assert scores.dtype == torch.float64
    pseudo, weight = pseudo_labels_and_weights(scores)
    labels, weights = official_knowledge(u.numpy(), v.numpy(), y.numpy(), 4)
    assert pseudo.tolist() == labels
    np.testing.assert_allclose(weight.numpy(), weights, rtol=1e-10, atol=1e-12)


def test_a_class_without_a_labelled_sample_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"classes \[2\]"):
        class_similarities(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 1]), 3)


def test_knowledge_keeps_the_labels_of_labelled_samples_and_scores_the_unlabelled() -> None:
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.5, 0.5]])
    labels = torch.tensor([0, 1, UNLABELLED, UNLABELLED])
    pseudo, weight = knowledge(features, labels, 2)
    assert pseudo[:2].tolist() == [0, 1] and pseudo[2] == 0
    assert weight[3] == pytest.approx(0.0, abs=1e-6)  # equidistant from both classes: no say
    assert weight[2] > 0.8


def test_the_loss_is_the_weighted_pseudo_label_ce_over_the_unlabelled_rows() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, UNLABELLED, 2, UNLABELLED, UNLABELLED])
    pseudo = torch.tensor([1, 2, 0, 0, 1])
    weight = torch.tensor([9.0, 0.5, 9.0, 0.0, 2.0], dtype=torch.float64)
    value = weighted_pseudo_label_ce(logits, labels, pseudo, weight)
    z = logits.detach().numpy()
    ce = [-(z[i, pseudo[i]] - np.log(np.exp(z[i]).sum())) for i in (1, 3, 4)]
    assert value.dtype == torch.float64
    assert float(value) == pytest.approx((0.5 * ce[0] + 0.0 * ce[1] + 2.0 * ce[2]) / 3, rel=1e-12)
    value.backward()
    assert torch.equal(logits.grad[[0, 2, 3]], torch.zeros(3, 3, dtype=torch.float64))  # labelled, or weight 0


def test_the_loss_reads_its_tables_by_sample_index() -> None:
    loss = WadLoss()
    loss.setup((3,), (8,), 6)
    loss.set_knowledge(torch.tensor([0, 0, 2, 1, 0, 2]), torch.tensor([1.0, 1.0, 0.5, 2.0, 1.0, 1.0]))
    logits = torch.randn(2, 3)
    labels = torch.full((2,), UNLABELLED)
    got = loss.compute(logits, None, labels, index=torch.tensor([3, 2]))
    expected = weighted_pseudo_label_ce(logits, labels, torch.tensor([1, 2]), torch.tensor([2.0, 0.5]))
    assert float(got) == pytest.approx(float(expected))


@pytest.fixture
def wad_teacher(tmp_path: Path) -> Path:
    """A (randomly initialised) cnn_teacher for digits' 6 known classes (class_mismatch's default), as safetensors."""
    torch.manual_seed(123)
    model = build_model("cnn_teacher", num_classes=6, in_channels=1, image_size=8)
    path = tmp_path / "teacher6.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def wad_recipe(tiny_kd: dict, wad_teacher: Path) -> dict:
    recipe = copy.deepcopy(tiny_kd)
    recipe["teacher"]["checkpoint"] = str(wad_teacher)
    recipe["data"]["setting"] = {"name": "class_mismatch", "labelled": 60, "unlabelled": 100, "mismatch": 0.5}
    recipe["distill"] = [{"loss": "wad", "weight": 1.0, "teacher": "penultimate"}]
    recipe["train"]["ce_weight"] = 1.0
    return recipe


@pytest.mark.parametrize(("change", "message"), [
    ({"data.setting": None}, "but the recipe has no data.setting"),
    ({"data.setting": {"name": "long_tailed"}}, "data.setting 'long_tailed'"),
    ({"data.setting": {"name": "novel_classes"}}, "data.setting 'novel_classes'"),
    ({"train.ce_weight": 0.0}, "set train.ce_weight > 0"),
    ({"distill.1": {"loss": "wad"}}, "keep one `wad` term"),
])
def test_recipes_wad_cannot_work_with_are_refused(change: dict, message: str, tiny_kd: dict, wad_teacher: Path,
                                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = edit_recipe(wad_recipe(tiny_kd, wad_teacher), change)
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert message in capsys.readouterr().err


def test_wad_without_a_teacher_is_refused(tiny_kd: dict, wad_teacher: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    recipe = wad_recipe(tiny_kd, wad_teacher)
    del recipe["teacher"]
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert "teacher" in capsys.readouterr().err


def test_the_tables_are_the_teachers_knowledge_before_the_first_step(tiny_kd: dict, wad_teacher: Path) -> None:
    recipe = recipe_from_dict(wad_recipe(tiny_kd, wad_teacher))
    built = plan(recipe, training=True)
    from kdkit.methods.wad import WadMethod

    WadMethod().attach(built, None)
    loss = built.objective.terms[0].loss
    data = built.data
    unlabelled = data.train_labels == UNLABELLED
    assert int(unlabelled.sum()) == 100 and len(loss.pseudo) == len(data.train_labels)
    assert torch.equal(loss.pseudo[~unlabelled], data.train_labels[~unlabelled])
    weights = loss.weight[unlabelled]
    assert (weights >= 0).all() and (weights <= 2).all() and len(weights.unique()) > 50  # margins, not placeholders
    features = teacher_features(built.teacher, "penultimate", data, torch.device("cpu")).double()
    labelled = ~unlabelled
    labels, official = official_knowledge(features[unlabelled].reshape(100, -1).numpy(),
                                          features[labelled].reshape(int(labelled.sum()), -1).numpy(),
                                          data.train_labels[labelled].numpy(), data.num_classes)
    assert loss.pseudo[unlabelled].tolist() == labels
    np.testing.assert_allclose(weights.numpy(), official, atol=1e-5)
    assert set(loss.pseudo[unlabelled].tolist()) <= set(range(data.num_classes))


@pytest.mark.slow
def test_a_tiny_class_mismatch_wad_run_trains_the_term(tiny_kd: dict, wad_teacher: Path) -> None:
    recipe = wad_recipe(tiny_kd, wad_teacher)
    recipe["train"]["epochs"] = 1
    summary = run_recipe(recipe_from_dict(recipe))
    rows = json.loads((Path(recipe["output"]["dir"]) / "metrics.json").read_text())
    assert all(r["train_wad"] > 0 for r in rows) and summary["last_top1"] >= 0


def test_the_class_mismatch_suite_is_a_benchmark_suite_with_its_baselines_first() -> None:
    assert "class_mismatch" in suites()
    assert method_recipes("class_mismatch") == ["student_ce", "kd", "wad", "wad_contrastive", "wad_rounds"]


def test_data_without_unlabelled_samples_or_with_an_unlabelled_class_is_refused_before_training() -> None:
    from kdkit.data import apply_setting, load_dataset
    from kdkit.methods.wad.method import data_problems

    all_labelled = apply_setting(load_dataset("digits"), "few_classes", {"classes": [0, 1, 2]}, seed=0)
    (problem,) = data_problems(all_labelled)
    assert "all" in problem.message and "are labelled" in problem.message and problem.where == "data.setting"
    mismatch = apply_setting(load_dataset("digits"), "class_mismatch", {"labelled": 60, "unlabelled": 100}, seed=0)
    assert data_problems(mismatch) == []
    labels = mismatch.train_labels.clone()
    labels[labels == 2] = UNLABELLED
    (problem,) = data_problems(type(mismatch)(**{**mismatch.__dict__, "train_labels": labels}))
    assert "classes [2] have none" in problem.message


@pytest.mark.slow
def test_wad_resumes_exactly(tiny_kd: dict, wad_teacher: Path, tmp_path: Path) -> None:
    # the tables are not checkpointed: a resumed run recomputes them from the frozen teacher, the same numbers
    straight, broken = straight_and_resumed(wad_recipe(tiny_kd, wad_teacher), tmp_path, 8)
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((broken / "metrics.json").read_text())
    assert [(r["train_loss"], r["test_top1"]) for r in a] == [(r["train_loss"], r["test_top1"]) for r in b]


def official_polynomial_decay(current_step: int, max_rate: float, min_rate: float, decay_steps: int,
                              power: int = 2) -> float:
    """The official ``datasets.polynomial_decay``, transcribed."""
    if current_step > decay_steps:
        current_step = decay_steps
    return (max_rate - min_rate) * (1 - float(current_step) / float(decay_steps)) ** power + min_rate


def test_the_promoted_share_follows_the_official_polynomial_decay() -> None:
    # the code's defaults: split 5 (rounds 6), alpha 0.1; its loop asks for i = 1 .. split + 1
    for rounds, alpha in [(6, 0.1), (3, 0.5), (4, 0.2)]:
        got = [promotion_fraction(i, rounds, alpha) for i in range(1, rounds)]
        assert got == pytest.approx([official_polynomial_decay(i, alpha, 0, rounds - 1) for i in range(1, rounds)])
    assert [round(promotion_fraction(i, 6, 0.1), 6) for i in range(1, 6)] == [0.064, 0.036, 0.016, 0.004, 0.0]
    assert round_starts(8, 4) == [0, 2, 4, 6] and round_starts(8, 6) == [0, 1, 2, 4, 5, 6]


def test_the_most_confident_are_the_smallest_ce_to_the_pseudo_label_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [5.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    pseudo = torch.tensor([0, 1, 0, 1, 1])
    # CE: log(1+e^-2)=0.127, log(1+e^-3)=0.049, log 2=0.693, log(1+e^5)=5.007, log(1+e^-0.5)=0.474
    assert most_confident(logits, pseudo, 3).tolist() == [1, 0, 4]
    assert most_confident(logits, pseudo, 0).tolist() == []
    ce = torch.nn.functional.cross_entropy(logits, pseudo, reduction="none")
    assert set(most_confident(logits, pseudo, 2).tolist()) == set(torch.topk(-ce, 2).indices.tolist())  # official


def rounds_fixture(labels: torch.Tensor, features: torch.Tensor, rounds: int, alpha: float) -> tuple:
    """A WadRounds over hand-made data and an engine stand-in whose student maps a 2-pixel image to its logits."""
    from types import SimpleNamespace

    from kdkit.methods.wad.method import WadRounds, WadSpec

    images = (features + 10).to(torch.uint8).reshape(len(features), 1, 1, -1)  # integer features, offset by 10
    data = SimpleNamespace(train_labels=labels, train_images=images, mean=(10 / 255,), std=(1 / 255,), num_classes=2)
    loss = WadLoss()
    loss.setup((2,), (2,), len(labels))
    pseudo, weight = knowledge(features, labels, 2)
    loss.set_knowledge(pseudo, weight)
    student = SimpleNamespace(model=torch.nn.Flatten(), recorder=None)  # logits = the two normalised pixels
    engine = SimpleNamespace(batch=0, epoch=0, train_loader=SimpleNamespace(labels=labels.clone()), student=student,
                             phase_stats={})
    return WadRounds(loss, features, data, WadSpec(rounds=rounds, alpha=alpha), epochs=rounds), loss, engine


def test_a_round_promotes_the_best_agreeing_samples_and_rescores_the_rest_by_hand() -> None:
    # class axes: sample 0 (class 0) along x, sample 1 (class 1) along y; four unlabelled samples
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [4.0, 1.0], [1.0, 3.0], [2.0, 3.0], [2.0, -1.0]])
    labels = torch.tensor([0, 1, UNLABELLED, UNLABELLED, UNLABELLED, UNLABELLED])
    wad_rounds, loss, engine = rounds_fixture(labels, features, rounds=3, alpha=1.0)
    assert loss.pseudo[2:].tolist() == [0, 1, 1, 0]
    engine.epoch = 1  # round 2's first epoch
    assert wad_rounds.due(engine)
    stats = engine.phase_stats["wad_rounds"] = wad_rounds.run(engine)
    # share after round 1 of 3: 1 * (1 - 1/2)^2 = 0.25 of 4 -> 1 sample; the student's logits are the features:
    # CE to the pseudo-label is smallest for [4, 1] -> 0 (log(1 + e^-3)); next [2, -1] -> 0 (log(1 + e^-3)) ties,
    # the lower index first
    assert stats == {"completed": 1, "promoted": 1,
                     "per_round": [{"round": 1, "fraction": 0.25, "promoted": 1, "pool_before": 4}]}
    assert wad_rounds.state.labels.tolist() == [0, 1, 0, UNLABELLED, UNLABELLED, UNLABELLED]
    assert engine.train_loader.labels.tolist() == wad_rounds.state.labels.tolist()  # the CE now trains it
    # sample 2 is a class-0 axis now: [2, -1] is scored against it too, the tables are recomputed
    expected = knowledge(features, wad_rounds.state.labels, 2)
    assert torch.equal(loss.pseudo, expected[0]) and torch.equal(loss.weight, expected[1])
    assert not wad_rounds.due(engine)  # once per round
    engine.epoch, engine.batch = 2, 3
    assert not wad_rounds.due(engine)  # only at a round's first step
    engine.batch = 0
    assert wad_rounds.due(engine)
    stats = wad_rounds.run(engine)  # after round 2 of 3 the official schedule's share is 0: the pool stays
    assert stats["per_round"][1] == {"round": 2, "fraction": 0.0, "promoted": 0, "pool_before": 3}
    assert int(wad_rounds.state.completed) == 2 and not wad_rounds.due(engine)


def test_resumed_rounds_restore_the_promoted_labels_into_the_loader_and_tables() -> None:
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [4.0, 1.0], [1.0, 3.0], [2.0, 3.0], [2.0, -1.0]])
    labels = torch.tensor([0, 1, UNLABELLED, UNLABELLED, UNLABELLED, UNLABELLED])
    finished, _, _ = rounds_fixture(labels, features, rounds=3, alpha=1.0)
    finished.state.labels[3] = 1
    finished.state.completed.fill_(1)
    resumed, loss, engine = rounds_fixture(labels, features, rounds=3, alpha=1.0)
    resumed.state.load_state_dict(finished.state.state_dict())  # what the engine does with Hooks.state
    resumed.sync(engine, "epoch_start")
    assert engine.train_loader.labels.tolist() == [0, 1, UNLABELLED, 1, UNLABELLED, UNLABELLED]
    assert torch.equal(loss.pseudo, knowledge(features, engine.train_loader.labels, 2)[0])
    engine.epoch = 1
    assert not resumed.due(engine)


@pytest.mark.parametrize(("wad", "message"), [
    ({"rounds": 2}, "wad.rounds 2 promotes nothing"),
    ({"rounds": 5}, "wad.rounds 5 splits train.epochs 4"),
    ({"contrastive": {"epochs": 3}}, "add `representation: contrastive` to the term"),
    ({"alpha": 0.0}, "alpha"),
])
def test_bad_rounds_are_refused(wad: dict, message: str, tiny_kd: dict, wad_teacher: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    recipe = wad_recipe(tiny_kd, wad_teacher)
    recipe["train"]["epochs"] = 4
    recipe["wad"] = wad
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert message in capsys.readouterr().err
    recipe["wad"] = {"rounds": 4, "alpha": 0.5}  # rounds with the teacher's representation: fine
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0


@pytest.mark.slow
def test_wad_rounds_promote_train_and_resume_exactly(tiny_kd: dict, wad_teacher: Path, tmp_path: Path) -> None:
    recipe = wad_recipe(tiny_kd, wad_teacher)
    recipe["train"]["epochs"] = 4
    recipe["wad"] = {"rounds": 4, "alpha": 0.5}  # 5 steps per epoch; promotions at the starts of epochs 2 and 3
    straight, broken = straight_and_resumed(recipe, tmp_path, 12)  # interrupted in epoch 3, after both
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((broken / "metrics.json").read_text())
    assert [(r["train_loss"], r["test_top1"]) for r in a] == [(r["train_loss"], r["test_top1"]) for r in b]
    rounds = json.loads((straight / "summary.json").read_text())["wad"]["rounds"]
    assert rounds == json.loads((broken / "summary.json").read_text())["wad"]["rounds"]
    # 100 unlabelled: int(0.5 (1 - 1/3)^2 100) = 22, then int(0.5 (1/3)^2 78) = 4; round 3 of 3 splits promotes 0
    assert [(r["promoted"], r["pool_before"]) for r in rounds["per_round"]] == [(22, 100), (4, 78), (0, 74)]
