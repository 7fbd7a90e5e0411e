"""LELP (few-class projection): the projections against an independent numpy PCA, the loss against plain loops, the
deployed head, the refusals, and a tiny run end to end."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import edit_recipe, straight_and_resumed, write_recipe
from kdkit.bench.methods import method_recipes, suites
from kdkit.cli import main
from kdkit.methods.lelp import (
    LelpHead,
    class_logits,
    coordinates,
    lelp_loss,
    lelp_projections,
    random_rotation,
    subclass_targets,
)
from kdkit.models import build_model
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe

TERM = {"loss": "lelp", "student": "penultimate", "bridge": "lelp_head", "bridge_params": {"subclasses": 3},
        "subclass_temperature": 0.5}


# -- projections ------------------------------------------------------------------------------------------------------

def data(n: int = 80, d: int = 7, classes: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Anisotropic embeddings (so the principal directions are well separated), labels, an output weight."""
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, d)) * np.linspace(3.0, 0.5, d) + rng.normal(size=d)
    labels = np.arange(n) % classes
    h[labels == 1] += 2.0
    return h, labels, rng.normal(size=(classes, d))


def numpy_pca(h: np.ndarray, labels: np.ndarray, c: int, s: int, weight: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Independent reference: null space from the SVD of W, numpy's covariance and eigh, signs fixed the same way."""
    if weight is not None:
        _, sv, vt = np.linalg.svd(weight)
        basis = vt[int((sv > 1e-10).sum()):]  # rows spanning the null space
        h = h @ basis.T @ basis
    x = h[labels == c]
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
    top = vectors[:, ::-1][:, :s].T
    top = top * np.sign(top[np.arange(s), np.abs(top).argmax(1)])[:, None]
    return top, x.mean(0), np.sqrt(values[::-1][:s])


@pytest.mark.parametrize("null_space", [True, False])
def test_directions_are_each_classs_principal_components_of_the_projected_embeddings(null_space: bool) -> None:
    h, labels, weight = data()
    got = lelp_projections(torch.from_numpy(h), torch.from_numpy(labels), 2, 3,
                           weight=torch.from_numpy(weight) if null_space else None, rotate=False, seed=0)
    assert got.directions.shape == (2, 3, 7) and got.directions.dtype == torch.float64
    for c in range(2):
        top, mean, spread = numpy_pca(h, labels, c, 3, weight if null_space else None)
        np.testing.assert_allclose(got.directions[c].numpy(), top, atol=1e-10)
        np.testing.assert_allclose(got.means[c].numpy(), mean, atol=1e-10)
        np.testing.assert_allclose(got.spread[c].numpy(), spread, rtol=1e-10)


def test_directions_lie_in_the_null_space_of_the_output_weights() -> None:
    h, labels, weight = data()
    with_projection = lelp_projections(torch.from_numpy(h), torch.from_numpy(labels), 2, 3,
                                       weight=torch.from_numpy(weight), rotate=True, seed=0)
    without = lelp_projections(torch.from_numpy(h), torch.from_numpy(labels), 2, 3, weight=None, rotate=True, seed=0)
    w = torch.from_numpy(weight)
    assert torch.einsum("csd,kd->csk", with_projection.directions, w).abs().max() < 1e-10
    assert torch.einsum("csd,kd->csk", without.directions, w).abs().max() > 1e-2  # the projection changed them


def test_rotation_mixes_each_classs_directions_by_its_own_seeded_orthogonal_matrix() -> None:
    h, labels, weight = (torch.from_numpy(a) for a in data())
    plain = lelp_projections(h, labels, 2, 3, weight=weight, rotate=False, seed=5)
    rotated = lelp_projections(h, labels, 2, 3, weight=weight, rotate=True, seed=5)
    generator = torch.Generator().manual_seed(5)
    for c in range(2):
        q = random_rotation(3, generator)  # one per class, drawn in class order
        torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
        expected = (plain.directions[c].T @ q).T  # the columns of V_c Q_c
        torch.testing.assert_close(rotated.directions[c], expected, rtol=0, atol=1e-12)
        projected = coordinates(h[labels == c], rotated.directions, rotated.means)[:, c]
        torch.testing.assert_close(rotated.spread[c], projected.std(0), rtol=1e-12, atol=0)
    assert not torch.allclose(rotated.directions, plain.directions)
    again = lelp_projections(h, labels, 2, 3, weight=weight, rotate=True, seed=5)
    assert torch.equal(again.directions, rotated.directions)  # a pure function of its inputs and seed


def test_a_class_with_too_few_samples_or_too_many_directions_is_refused() -> None:
    h, labels, _ = (torch.from_numpy(a) for a in data(n=8))
    with pytest.raises(ValueError, match="needs more than 4 labelled training samples, got 4"):
        lelp_projections(h, labels, 2, 4, weight=None, rotate=False, seed=0)
    with pytest.raises(ValueError, match="9 directions per class from a 7-wide embedding"):
        lelp_projections(h, labels, 2, 9, weight=None, rotate=False, seed=0)


# -- loss and head ----------------------------------------------------------------------------------------------------

def loss_batch(classes: int = 3, subclasses: int = 2, d: int = 5, b: int = 4) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(b, classes * subclasses, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(b, classes, generator=gen, dtype=torch.float64) * 3
    h = torch.randn(b, d, generator=gen, dtype=torch.float64)
    directions = torch.randn(classes, subclasses, d, generator=gen, dtype=torch.float64)
    means = torch.randn(classes, d, generator=gen, dtype=torch.float64)
    return student, teacher, h, directions, means


def reference_loss(student: torch.Tensor, teacher: torch.Tensor, h: torch.Tensor, directions: torch.Tensor,
                   means: torch.Tensor, tau: float, beta: float) -> float:
    """The formula with plain Python loops and math (float64)."""
    classes, subclasses, d = directions.shape
    total = 0.0
    for i in range(len(student)):
        class_norm = sum(math.exp(teacher[i, k].item() / tau) for k in range(classes))
        sub_norm = sum(math.exp(student[i, j].item()) for j in range(classes * subclasses))
        for c in range(classes):
            z = [sum(directions[c, s, k].item() * (h[i, k].item() - means[c, k].item()) for k in range(d))
                 for s in range(subclasses)]
            split_norm = sum(math.exp(v / beta) for v in z)
            for s in range(subclasses):
                p = math.exp(teacher[i, c].item() / tau) / class_norm * math.exp(z[s] / beta) / split_norm
                q = math.exp(student[i, c * subclasses + s].item()) / sub_norm
                total += p * math.log(p / q)
    return total / len(student)


@pytest.mark.parametrize(("tau", "beta"), [(1.0, 1.0), (4.0, 0.5), (0.5, 3.0)])
def test_loss_is_the_papers_formula(tau: float, beta: float) -> None:
    batch = loss_batch()
    value = lelp_loss(*batch, temperature=tau, subclass_temperature=beta)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(reference_loss(*batch, tau, beta), rel=1e-12)


def test_targets_split_the_teachers_class_probabilities_and_a_matching_student_scores_zero() -> None:
    student, teacher, h, directions, means = loss_batch()
    log_p = subclass_targets(teacher / 1, coordinates(h, directions, means), 2.0, 0.7)
    torch.testing.assert_close(log_p.exp().unflatten(1, (3, 2)).sum(2), torch.softmax(teacher / 2.0, 1),
                               rtol=1e-12, atol=0)
    matching = log_p + 3.0  # softmax(u) = p (the student's softmax has no temperature)
    # so the deployed class probabilities of a student that matches the targets are the teacher's (softened) ones
    torch.testing.assert_close(torch.softmax(class_logits(matching, 3), 1), torch.softmax(teacher / 2.0, 1),
                               rtol=1e-12, atol=0)
    assert abs(lelp_loss(matching, teacher, h, directions, means, 2.0, 0.7).item()) < 1e-12
    assert lelp_loss(student, teacher, h, directions, means, 2.0, 0.7).item() > 1e-3


def test_loss_upcasts_half_precision_and_has_finite_gradients_on_extreme_logits() -> None:
    student, teacher, h, directions, means = loss_batch()
    value = lelp_loss(student.half(), teacher.half(), h.half(), directions.float(), means.float())
    assert value.dtype == torch.float32  # half inputs are upcast to float32
    extreme = (student * 1e3).float().requires_grad_(True)
    lelp_loss(extreme, teacher.float() * 1e3, h.float() * 1e3, directions.float(), means.float()).backward()
    assert extreme.grad is not None and torch.isfinite(extreme.grad).all()


def test_the_deployed_class_probability_is_the_sum_of_its_subclasses() -> None:
    head = LelpHead(features=6, classes=3, subclasses=4).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    sub = head(x)
    logits, for_loss = head.deploy(sub, None)
    assert for_loss is sub and logits.shape == (5, 3)
    torch.testing.assert_close(torch.softmax(logits, 1), torch.softmax(sub, 1).unflatten(1, (3, 4)).sum(2),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(class_logits(sub, 3), logits, rtol=0, atol=0)


# -- recipes ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def binary_teacher(tmp_path: Path) -> Path:
    """A (randomly initialised) 2-class cnn_teacher for digits."""
    torch.manual_seed(123)
    path = tmp_path / "teacher2.safetensors"
    model = build_model("cnn_teacher", num_classes=2, in_channels=1, image_size=8)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def lelp_recipe(tiny: dict, teacher: Path) -> dict:
    recipe = copy.deepcopy(tiny)
    recipe["data"]["subset"] = 400
    recipe["data"]["setting"] = {"name": "few_classes", "classes": [0, 6]}
    recipe["teacher"] = {"arch": "cnn_teacher", "checkpoint": str(teacher)}
    recipe["distill"] = [copy.deepcopy(TERM)]
    recipe["train"]["ce_weight"] = 0
    return recipe


@pytest.mark.parametrize(("change", "message"), [
    ({"teacher": None}, "add `teacher:`"),
    ({"distill.1": dict(TERM)}, "a second `lelp` term"),
    ({"teacher": None, "teachers": {"a": {"arch": "cnn_teacher", "checkpoint": "TEACHER"}}},
     "LELP projects one teacher's embeddings"),
    ({"distill.0.bridge": None}, "loss 'lelp' reads the output of the 'lelp_head' bridge"),
    ({"distill.0.loss": "kd"}, "the `lelp_head` bridge is trained by the `lelp` loss"),
    ({"distill.0.teacher": ["logits", "no_such_layer"]}, "no module at path 'no_such_layer'"),
    ({"distill.0.teacher": "penultimate"}, "LELP reads the teacher's logits and its embedding"),
    ({"distill.0.bridge_params.subclasses": 1}, "subclasses"),
    ({"distill.0.subclass_temperature": 0}, "subclass_temperature"),
])
def test_recipes_lelp_cannot_work_with_are_refused(change: dict, message: str, tiny: dict, binary_teacher: Path,
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    change = json.loads(json.dumps(change).replace("TEACHER", str(binary_teacher)))
    recipe = edit_recipe(lelp_recipe(tiny, binary_teacher), change)
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert message in capsys.readouterr().err


def test_an_embedding_that_feeds_no_linear_output_layer_is_refused_before_training(
        tiny: dict, binary_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = edit_recipe(lelp_recipe(tiny, binary_teacher), {"distill.0.teacher": ["logits", "stage2"]})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["validate", str(path)]) == 0  # a valid recipe: the null space needs the built teacher
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "null-space projection needs the teacher's output weights" in err and "null_space: false" in err
    assert not (Path(recipe["output"]["dir"]) / "metrics.json").exists()  # refused before the first batch
    edit_recipe(recipe, {"distill.0.null_space": False, "train.epochs": 1})
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe)), "--overwrite"]) == 0  # any tap without it


@pytest.mark.slow
def test_a_tiny_lelp_run_installs_the_teachers_projections_and_deploys_its_head(tiny: dict,
                                                                                 binary_teacher: Path) -> None:
    from kdkit.build import plan
    from kdkit.methods.lelp.method import install_projections

    recipe = recipe_from_dict(lelp_recipe(tiny, binary_teacher))
    summary = run_recipe(recipe)
    lelp = summary["lelp"]
    assert (lelp["classes"], lelp["subclasses"], lelp["null_space"], lelp["rotate"]) == (2, 3, True, True)
    head = 64 * 2 * 3 + 2 * 3  # cnn_student's 64-wide penultimate on 8x8 digits -> 6 subclass logits
    assert summary["bridge_params"] == head
    # what the run installed is what an independent plan of the same recipe computes (and was checkpointed)
    built = plan(recipe, training=True)
    term = built.objective.terms[0]
    projections = install_projections(built, term, recipe.train.seed)
    folder = sorted((Path(recipe.output.dir) / "checkpoints").glob("epoch_*"))[-1]
    stored = load_file(str(folder / "model.safetensors"))
    for name in ("directions", "means"):
        torch.testing.assert_close(stored[f"objective.losses.lelp.{name}"], getattr(projections, name).float(),
                                   rtol=0, atol=0)
    # the deployed network is the student up to its embedding plus the head: class logit = logsumexp of subclasses
    assert summary["deployed"]["params"] == summary["params"] + head
    rows = json.loads((Path(recipe.output.dir) / "metrics.json").read_text())
    assert all("train_lelp" in r for r in rows)


@pytest.mark.slow
def test_lelp_resumes_exactly(tiny: dict, binary_teacher: Path, tmp_path: Path) -> None:
    recipe = edit_recipe(lelp_recipe(tiny, binary_teacher), {"train.epochs": 3})  # 2 steps per epoch
    straight, broken = straight_and_resumed(recipe, tmp_path, 3)
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((broken / "metrics.json").read_text())
    assert [(r["train_loss"], r["test_top1"]) for r in a] == [(r["train_loss"], r["test_top1"]) for r in b]


def test_the_few_class_suite_is_a_benchmark_suite_with_its_baselines_first() -> None:
    assert "few_classes" in suites()
    assert method_recipes("few_classes") == ["student_ce", "kd", "lelp"]
