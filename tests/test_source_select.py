"""DistillNearest / DistillWeighted (kdkit.methods.source_select): the GBC score, the selection and weights, the target
heads and the source_kd loss against independent computations; the refusals; a tiny run that records its scores."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression

from conftest import edit_recipe, straight_and_resumed, write_recipe
from kdkit.cli import main
from kdkit.errors import KdkitError
from kdkit.losses import LOSSES
from kdkit.losses.kd import kd_loss
from kdkit.methods.source_select import (
    SourceKDLoss,
    fit_target_head,
    gbc_score,
    pca_project,
    selection_weights,
    source_kd_loss,
)
from kdkit.models import build_model
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe

# -- the score -------------------------------------------------------------------------------------------------------

def test_gbc_of_two_unit_gaussians_two_apart_is_minus_twice_exp_minus_half() -> None:
    """Hand-checked: class 0 at {-1, 1} (mean 0, population variance 1), class 1 at {1, 3} (mean 2, variance 1):
    D_B = (1/8) * 2^2 / 1 + 0 = 0.5, BC = e^-0.5, counted for (0, 1) and (1, 0)."""
    features = torch.tensor([[-1.0], [1.0], [1.0], [3.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert gbc_score(features, labels, 2, pca_dims=0) == pytest.approx(-2 * math.exp(-0.5), rel=1e-12)


def gbc_reference(features: np.ndarray, labels: np.ndarray, classes: int) -> float:
    """GBC with full (diagonal) covariance matrices, numpy determinants and inverses, and plain loops."""
    stats = []
    for c in range(classes):
        x = features[labels == c]
        stats.append((x.mean(0), np.diag(x.var(0))))
    total = 0.0
    for i in range(classes):
        for j in range(classes):
            if i == j:
                continue
            (mi, si), (mj, sj) = stats[i], stats[j]
            s = (si + sj) / 2
            d = mi - mj
            db = d @ np.linalg.inv(s) @ d / 8 + 0.5 * math.log(np.linalg.det(s) / math.sqrt(np.linalg.det(si)
                                                                                          * np.linalg.det(sj)))
            total -= math.exp(-db)
    return total


def test_gbc_matches_a_determinant_computation_on_random_classes() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(12)
    features = torch.randn(36, 4, generator=g, dtype=torch.float64) + labels[:, None] * 0.7
    expected = gbc_reference(features.numpy(), labels.numpy(), 3)
    assert gbc_score(features, labels, 3, pca_dims=0) == pytest.approx(expected, rel=1e-10)


def test_better_separated_classes_score_higher_and_the_score_is_at_most_zero() -> None:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(4).repeat_interleave(20)
    noise = torch.randn(80, 8, generator=g)
    near = gbc_score(noise + labels[:, None] * 0.2, labels, 4, pca_dims=4)
    far = gbc_score(noise + labels[:, None] * 2.0, labels, 4, pca_dims=4)
    assert near < far <= 0


def test_more_principal_directions_than_features_are_refused() -> None:
    labels = torch.arange(2).repeat_interleave(5)
    with pytest.raises(KdkitError, match="pca_dims 64 exceeds the 8 principal directions"):
        gbc_score(torch.randn(10, 8), labels, 2)


def test_a_class_with_one_labelled_image_is_refused() -> None:
    with pytest.raises(KdkitError, match="class 1 has 1 labelled training image"):
        gbc_score(torch.randn(4, 2), torch.tensor([0, 0, 0, 1]), 2, pca_dims=0)


def test_randomized_pca_finds_the_largest_variances_of_a_wide_matrix() -> None:
    """400 x 300 features with a decaying spectrum: 8 directions + 10 extra columns < 300 take the randomized path."""
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(400, 300, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64)).Q
    x = u @ torch.diag(0.7 ** torch.arange(300, dtype=torch.float64) * 100) @ v.T
    projected = pca_project(x, 8)
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(x.numpy(), rowvar=False, bias=True)))[::-1][:8]
    np.testing.assert_allclose(projected.var(0, unbiased=False).numpy(), eigenvalues, rtol=1e-8)
    assert torch.equal(projected, pca_project(x, 8))  # the seeded draw: the same projection every time


def test_pca_directions_carry_the_largest_variances() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    projected = pca_project(x, 3)
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(x.numpy(), rowvar=False, bias=True)))[::-1][:3]
    np.testing.assert_allclose(projected.var(0, unbiased=False).numpy(), eigenvalues, rtol=1e-9)
    assert torch.allclose(projected.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-12)


# -- selection and weights -------------------------------------------------------------------------------------------

def test_nearest_puts_all_the_weight_on_the_highest_score_and_the_first_on_a_tie() -> None:
    assert selection_weights(torch.tensor([-3.0, -1.0, -2.0]), "nearest").tolist() == [0.0, 1.0, 0.0]
    assert selection_weights(torch.tensor([-1.0, -1.0, -2.0]), "nearest").tolist() == [1.0, 0.0, 0.0]


def test_weighted_is_the_softmax_of_the_scores_over_the_temperature() -> None:
    scores = [-3.0, -1.0, -2.0]
    for temperature in (1.0, 0.5, 4.0):
        exps = [math.exp(s / temperature) for s in scores]
        expected = [e / sum(exps) for e in exps]
        got = selection_weights(torch.tensor(scores, dtype=torch.float64), "weighted", temperature).tolist()
        assert got == pytest.approx(expected, rel=1e-12)


# -- the target heads ------------------------------------------------------------------------------------------------

def test_the_target_head_is_scikit_learns_multinomial_logistic_regression() -> None:
    """sklearn minimises 0.5 ||W||^2 + C sum_i CE_i, i.e. mean CE + ||W||^2 / (2 C N): the same minimiser at
    l2 = 1 / (2 C N); neither penalises the bias."""
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(3).repeat_interleave(30)
    features = torch.randn(90, 5, generator=g, dtype=torch.float64) + torch.randn(3, 5, generator=g,
                                                                                  dtype=torch.float64)[labels]
    c = 0.5
    weight, bias = fit_target_head(features, labels, 3, steps=500, l2=1 / (2 * c * len(labels)))
    ref = LogisticRegression(C=c, tol=1e-10, max_iter=1000).fit(features.numpy(), labels.numpy())
    ours = torch.softmax(features @ weight.T + bias, 1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(features.numpy()), atol=1e-6)


# -- the loss --------------------------------------------------------------------------------------------------------

def source_kd_reference(student: torch.Tensor, sources: list[torch.Tensor], weights: list[float], t: float) -> float:
    """T^2 sum_s w_s mean_b sum_k p_s log(p_s / q) in Python floats."""
    total = 0.0
    for w, src in zip(weights, sources, strict=True):
        for zs, zt in zip(student.tolist(), src.tolist(), strict=True):
            q = [math.exp(v / t) for v in zs]
            p = [math.exp(v / t) for v in zt]
            q, p = [v / sum(q) for v in q], [v / sum(p) for v in p]
            total += w * sum(pk * math.log(pk / qk) for pk, qk in zip(p, q, strict=True)) / len(student)
    return total * t * t


def test_source_kd_is_the_weighted_sum_of_one_kd_per_source() -> None:
    g = torch.Generator().manual_seed(4)
    student = torch.randn(6, 5, generator=g, dtype=torch.float64)
    sources = [torch.randn(6, 5, generator=g, dtype=torch.float64) * 2 for _ in range(3)]
    weights = [0.2, 0.5, 0.3]
    got = source_kd_loss(student, sources, torch.tensor(weights, dtype=torch.float64), 2.0)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(source_kd_reference(student, sources, weights, 2.0), rel=1e-10)


def test_nearest_weights_give_plain_kd_of_the_selected_source() -> None:
    g = torch.Generator().manual_seed(5)
    student, a, b = (torch.randn(4, 10, generator=g) for _ in range(3))
    got = source_kd_loss(student, [a, b], torch.tensor([0.0, 1.0]), 4.0)
    assert torch.allclose(got, kd_loss(student, b, 4.0), rtol=1e-6)


def test_source_kd_is_zero_when_every_source_agrees_with_the_student_and_half_is_upcast() -> None:
    z = torch.randn(4, 10)
    assert float(source_kd_loss(z, [z.clone(), z.clone()], torch.tensor([0.4, 0.6]))) == pytest.approx(0, abs=1e-6)
    half = source_kd_loss(z.half() * 100, [z.half() * -100], torch.tensor([1.0]))
    assert half.dtype == torch.float16 and torch.isfinite(half)


def test_wide_taps_need_their_fitted_heads() -> None:
    loss = LOSSES.get("source_kd")(temperature=1.0)
    loss.setup((10,), [(10,), (32,)], num_samples=8)
    student, logits, feature = torch.randn(3, 10), torch.randn(3, 10), torch.randn(3, 32)
    with pytest.raises(RuntimeError, match=r"source\(s\) \[1\] read a feature wider"):
        loss(student, [logits, feature], torch.zeros(3, dtype=torch.long))
    weight, bias = torch.randn(10, 32), torch.randn(10)
    loss.configure(torch.tensor([0.25, 0.75]), {1: (weight, bias)})
    expected = source_kd_loss(student, [logits, feature @ weight.T + bias], torch.tensor([0.25, 0.75]))
    assert torch.allclose(loss(student, [logits, feature], torch.zeros(3, dtype=torch.long)), expected)
    assert isinstance(loss, SourceKDLoss) and set(loss.state_dict()) == {
        "weights", "head_weight_0", "head_bias_0", "head_weight_1", "head_bias_1"}


def test_a_source_of_weight_zero_needs_no_head() -> None:
    """DistillNearest fits the selected source's head only: the others are skipped, not refused."""
    loss = LOSSES.get("source_kd")(temperature=2.0)
    loss.setup((10,), [(16,), (16,)], num_samples=8)
    weight, bias = torch.randn(10, 16), torch.randn(10)
    loss.configure(torch.tensor([0.0, 1.0]), {1: (weight, bias)})
    student, a, b = torch.randn(3, 10), torch.randn(3, 16), torch.randn(3, 16)
    got = loss(student, [a, b], torch.zeros(3, dtype=torch.long))
    assert torch.allclose(got, kd_loss(student, b @ weight.T + bias, 2.0), rtol=1e-6)


# -- recipes ---------------------------------------------------------------------------------------------------------

def teacher_files(tmp_path: Path, seeds: tuple[int, ...] = (1, 2, 3)) -> dict[str, str]:
    """Randomly initialised digits cnn_teachers, one per seed, saved as safetensors."""
    files = {}
    for seed in seeds:
        torch.manual_seed(seed)
        model = build_model("cnn_teacher", num_classes=10, in_channels=1, image_size=8)
        path = tmp_path / f"teacher{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        files[f"s{seed}"] = str(path)
    return files


def select_recipe(tiny: dict, tmp_path: Path, mode: str = "weighted") -> dict:
    recipe = copy.deepcopy(tiny)
    files = teacher_files(tmp_path)
    recipe["teachers"] = {name: {"arch": "cnn_teacher", "checkpoint": path} for name, path in files.items()}
    recipe["data"]["setting"] = {"name": "semi_supervised", "labelled": 100}
    recipe["distill"] = [{"loss": "source_kd", "weight": 0.5, "temperature": 2,
                          "teacher": [f"{n}.penultimate" for n in files]}]
    recipe["source_select"] = {"mode": mode, "pca_dims": 8, "probe_steps": 20}
    recipe["train"]["ce_weight"] = 0.5
    return recipe


@pytest.mark.parametrize("recipe", ["distill_weighted", "distill_nearest"])
def test_the_shipped_recipes_validate(recipe: str) -> None:
    assert main(["validate", f"recipes/semi_supervised/{recipe}.yaml"]) == 0


@pytest.mark.parametrize(("change", "message"), [
    ({"teachers": {"s1": {"arch": "cnn_teacher", "checkpoint": "x"}}, "distill.0.teacher": ["s1.penultimate"]},
     "source_select selects among or weighs several source models: 1 teacher(s)"),
    ({"source_select": None}, "distill.0.teacher reads a feature: source_kd needs the weights and target heads"),
    ({"distill": []}, "source_select configures one source_kd term, the recipe has 0"),
    ({"distill.0.teacher": ["s1.logits", "s2.logits", "s3.logits"]},
     "head: probe fits each source's target head on its 'penultimate' feature"),
    ({"source_select.head": "source"}, "choices: ['s1.logits', 's2.logits', 's3.logits']"),
    ({"distill.0.teacher": ["s1.penultimate", "s2.penultimate"]}, "one tap per teacher of `teachers:`"),
    ({"teachers.s1.cache": {"views": 2}}, "remove teachers.s1.cache"),
    ({"source_select.mode": "closest"}, "weighted"),
    ({"source_select.temperature": 0}, "temperature"),
])
def test_recipes_source_select_cannot_work_with_are_refused(change: dict, message: str, tiny: dict, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    recipe = select_recipe(tiny, tmp_path)
    for key, value in change.items():
        if value is None:
            recipe.pop(key)
        else:
            edit_recipe(recipe, {key: value})
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert message in capsys.readouterr().err


def test_the_term_alone_on_the_teachers_logits_is_uniform_multi_teacher_kd(tiny: dict, tmp_path: Path) -> None:
    recipe = select_recipe(tiny, tmp_path)
    recipe.pop("source_select")
    recipe["distill"][0]["teacher"] = ["s1.logits", "s2.logits", "s3.logits"]
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0


def test_a_single_teacher_is_refused(tiny_kd: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = copy.deepcopy(tiny_kd)
    recipe["distill"] = [{"loss": "source_kd", "teacher": "penultimate"}]
    recipe["source_select"] = {"mode": "nearest"}
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert "`teacher:` (one) (choices: 2 or more named teachers)" in capsys.readouterr().err


def test_a_source_of_another_class_count_is_refused_before_training(tiny: dict, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """kdkit builds every teacher with the run's classes: a 5-class source does not load (exit code 2), whatever head
    the section asks for."""
    recipe = select_recipe(tiny, tmp_path)
    torch.manual_seed(7)
    five = build_model("cnn_teacher", num_classes=5, in_channels=1, image_size=8)
    save_file({k: v.contiguous() for k, v in five.state_dict().items()}, str(tmp_path / "five.safetensors"))
    recipe["teachers"]["s2"]["checkpoint"] = str(tmp_path / "five.safetensors")
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert "teachers.s2.checkpoint" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["weighted", "nearest"])
def test_a_tiny_run_records_the_scores_of_the_labelled_training_images(mode: str, tiny: dict,
                                                                      tmp_path: Path) -> None:
    """The recorded scores are GBC recomputed here from each source's own penultimate features of the labelled
    training images; the weights follow them; the run trains."""
    from kdkit.build import plan
    from kdkit.checkpoint import load_model_weights
    from kdkit.data.augment import normalize

    recipe = select_recipe(tiny, tmp_path, mode)
    summary = run_recipe(recipe_from_dict(recipe))
    record = summary["source_select"]
    built = plan(recipe_from_dict(recipe), training=True)
    data = built.data
    labelled = (data.train_labels >= 0).nonzero().flatten()
    assert record["labelled_images"] == len(labelled) == 100
    x = normalize(data.train_images[labelled], data.mean, data.std)
    scores = {}
    for name, spec in recipe["teachers"].items():
        model = build_model("cnn_teacher", num_classes=10, in_channels=1, image_size=8)
        load_model_weights(model, spec["checkpoint"])
        captured = {}
        model.fc.register_forward_pre_hook(lambda _m, inputs, c=captured: c.update(f=inputs[0]))
        with torch.no_grad():
            model.eval()(x)
        scores[name] = gbc_score(captured["f"], data.train_labels[labelled], 10, pca_dims=8)
    assert record["scores"] == pytest.approx(scores, rel=1e-4)
    best = max(scores, key=scores.get)
    assert record["selected"] == best
    if mode == "nearest":
        assert record["weights"] == {n: float(n == best) for n in scores}
        assert list(record["probe_train_top1"]) == [best]
    else:
        exps = {n: math.exp(s) for n, s in scores.items()}
        assert record["weights"] == pytest.approx({n: e / sum(exps.values()) for n, e in exps.items()}, rel=1e-4)
    rows = json.loads((Path(tiny["output"]["dir"]) / "metrics.json").read_text())
    assert all("train_source_kd" in r and "train_ce" in r for r in rows)


@pytest.mark.slow
def test_source_select_resumes_exactly(tiny: dict, tmp_path: Path) -> None:
    straight, broken = straight_and_resumed(select_recipe(tiny, tmp_path), tmp_path, 8)
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((broken / "metrics.json").read_text())
    assert [(r["train_loss"], r["test_top1"]) for r in a] == [(r["train_loss"], r["test_top1"]) for r in b]


@pytest.mark.slow
def test_the_shipped_distill_nearest_recipe_runs_on_a_slice(tmp_path: Path) -> None:
    """The shipped recipe as written (three cnn_teacher sources on Fashion-MNIST's penultimate 3,136 features, PCA 64,
    probe heads), on 600 images and one epoch, with random sources instead of the trained ones."""
    from kdkit.recipe import find_recipe, load_recipe

    overrides = ["train.epochs=1", "data.subset=600", "data.setting.labelled=300", "train.batch_size=64",
                 f"output.dir={tmp_path / 'run'}", "output.progress=false"]
    for seed, name in enumerate(("full", "long_tailed", "small")):
        torch.manual_seed(seed)
        model = build_model("cnn_teacher", num_classes=10, in_channels=1, image_size=28)
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        overrides += [f"teachers.{name}.checkpoint={path}", f"teachers.{name}.recipe=null"]
    summary = run_recipe(load_recipe(find_recipe("semi_supervised/distill_nearest"), overrides))
    record = summary["source_select"]
    assert record["labelled_images"] == 300 and record["mode"] == "nearest"
    assert sorted(record["weights"].values()) == [0.0, 0.0, 1.0]
    assert record["selected"] == max(record["scores"], key=record["scores"].get)
