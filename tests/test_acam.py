"""ACAM-KD: the loss against a plain-loop float64 computation of the paper's equations, its limit cases and
properties, the refusals, and tiny detection and segmentation runs of the shipped recipes end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import edit_recipe, shipped_on_tiny_scenes, straight_and_resumed, tiny_det, tiny_seg, write_recipe
from kdkit.cli import main
from kdkit.errors import KdkitError
from kdkit.losses import LOSSES
from kdkit.losses.acam import dice_diversity


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def loop_pool(x: np.ndarray, f: int) -> np.ndarray:
    """Average over ``f x f`` blocks of a (C, H, W) map."""
    c, h, w = x.shape
    out = np.zeros((c, h // f, w // f))
    for k in range(c):
        for i in range(h // f):
            for j in range(w // f):
                out[k, i, j] = sum(x[k, i * f + a, j * f + b] for a in range(f) for b in range(f)) / (f * f)
    return out


def loop_fuse(query: np.ndarray, key: np.ndarray, wq: np.ndarray, wk: np.ndarray, wv: np.ndarray) -> np.ndarray:
    """STCA-FF on (C, N) maps: Q = Wq Fq, K = Wk Fkv, V = Wv Fkv, rows of softmax(Q^T K / sqrt(Cq)) times V."""
    cq, c = wq.shape
    n = query.shape[1]
    q = [[sum(wq[a, k] * query[k, p] for k in range(c)) for p in range(n)] for a in range(cq)]
    kk = [[sum(wk[a, k] * key[k, p] for k in range(c)) for p in range(n)] for a in range(cq)]
    v = [[sum(wv[o, k] * key[k, p] for k in range(c)) for p in range(n)] for o in range(c)]
    fused = np.zeros((c, n))
    for p in range(n):
        logits = [sum(q[a][p] * kk[a][r] for a in range(cq)) / math.sqrt(cq) for r in range(n)]
        top = max(logits)
        e = [math.exp(z - top) for z in logits]
        weights = [x / sum(e) for x in e]
        for o in range(c):
            fused[o, p] = sum(weights[r] * v[o][r] for r in range(n))
    return fused


def loop_dice(masks: list[list[float]], form: str) -> float:
    """The Dice diversity of one image's masks, ``pairwise`` (mean over pairs) or ``pooled`` (the paper's ratio)."""
    m = len(masks)
    dot = [[sum(a * b for a, b in zip(masks[i], masks[j], strict=True)) for j in range(m)] for i in range(m)]
    if form == "pooled":
        return 2 * sum(dot[i][j] for i in range(m) for j in range(m) if i != j) / (
            2 * sum(dot[i][i] + 1e-12 for i in range(m)))
    pairs = [2 * dot[i][j] / (dot[i][i] + dot[j][j] + 2e-12) for i in range(m) for j in range(m) if i != j]
    return sum(pairs) / len(pairs)


def loop_acam(loss, s: np.ndarray, t: np.ndarray) -> float:
    """ACAM-KD of one level, image by image with Python floats: align, STCA-FF, ASCM, L^c, L^s, diversity."""
    level = loss.levels[0]
    p = {k: v.detach().double().numpy() for k, v in level.state_dict().items()}
    b, c, h, w = t.shape
    n, m, f = h * w, loss.num_masks, loss.attention_pool
    total_c = total_s = div = 0.0
    for img in range(b):
        if "align.weight" in p:
            aligned = np.zeros((c, h, w))
            for o in range(c):
                for i in range(h):
                    for j in range(w):
                        aligned[o, i, j] = p["align.bias"][o] + sum(p["align.weight"][o, k, 0, 0] * s[img, k, i, j]
                                                                    for k in range(s.shape[1]))
        else:
            aligned = s[img]
        queries, keys = (t[img], aligned) if loss.query == "teacher" else (aligned, t[img])
        small = loop_fuse(loop_pool(queries, f).reshape(c, -1), loop_pool(keys, f).reshape(c, -1),
                          p["w_q"], p["w_k"], p["w_v"]).reshape(c, h // f, w // f)
        fused = np.zeros((c, h, w))
        for i in range(h):
            for j in range(w):
                fused[:, i, j] = small[:, i // f, j // f]
        z = fused.reshape(c, n)
        v = [sum(z[k]) / n for k in range(c)]
        channel = [[sigmoid(p["channel_units"][q] * v[k]) for k in range(c)] for q in range(m)]
        spatial = [[sigmoid(sum(p["spatial_units"][q, k] * z[k, r] for k in range(c))) for r in range(n)]
                   for q in range(m)]
        err = ((t[img] - aligned) ** 2).reshape(c, n)
        for q in range(m):
            total_c += sum(channel[q][k] ** 2 * err[k, r] for k in range(c) for r in range(n)) / (
                n * sum(channel[q])) / m
            total_s += sum(spatial[q][r] ** 2 * err[k, r] for k in range(c) for r in range(n)) / (
                c * sum(spatial[q])) / m
        div += loop_dice(channel, loss.diversity) + loop_dice(spatial, loss.diversity)
    return (loss.alpha * (total_c + total_s) + loss.lambda_ * div) / b


def made(params: dict, student: tuple, teacher: tuple, seed: int = 0):
    """An ``acam`` loss set up for one level, in float64, its selection units drawn wide enough to matter."""
    torch.manual_seed(seed)
    loss = LOSSES.get("acam")(**params)
    loss.setup(student, teacher, num_samples=10)
    loss.double()
    with torch.no_grad():
        loss.levels[0].channel_units.normal_(0, 2.0)
        loss.levels[0].spatial_units.normal_(0, 1.0)
    return loss


@pytest.mark.parametrize("params", [
    {"num_masks": 3},
    {"num_masks": 3, "diversity": "pooled", "alpha": 0.7, "lambda_": 0.3},
    {"num_masks": 2, "query": "student"},
    {"num_masks": 3, "attention_pool": 2, "mask_grad": "stop"},
])
def test_acam_equals_plain_loops_in_float64(params: dict) -> None:
    loss = made(params, (3, 4, 4), (4, 4, 4))
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 4, 4, generator=gen, dtype=torch.float64)
    value = loss(s, t, torch.zeros(2))
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(loop_acam(loss, s.detach().numpy(), t.numpy()), rel=1e-10)
    value.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_the_options_change_the_value() -> None:
    """Each paper-vs-code switch reaches the computation (same parameters, different values)."""
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    base = made({"num_masks": 3}, (4, 4, 4), (4, 4, 4))
    values = {"base": base(s.double(), t.double(), None).item()}
    for key, value in (("diversity", "pooled"), ("query", "student"), ("attention_pool", 2)):
        other = made({"num_masks": 3, key: value}, (4, 4, 4), (4, 4, 4))
        values[key] = other(s.double(), t.double(), None).item()
    assert len({round(v, 12) for v in values.values()}) == 4, values


def test_zero_units_give_half_the_mean_squared_error_and_dice_one() -> None:
    """Limit case: selection units at 0 make every mask 0.5, so L^c = L^s = MSE / 2 and each Dice is 1 (pairwise)
    or M - 1 (pooled)."""
    gen = torch.Generator().manual_seed(4)
    s, t = torch.randn(3, 5, 4, 6, generator=gen), torch.randn(3, 5, 4, 6, generator=gen)
    mse = (s - t).pow(2).mean().item()
    for diversity, dice in (("pairwise", 1.0), ("pooled", 3.0)):
        loss = LOSSES.get("acam")(num_masks=4, alpha=2.0, lambda_=0.5, diversity=diversity)
        loss.setup((5, 4, 6), (5, 4, 6), num_samples=1)
        with torch.no_grad():
            loss.levels[0].channel_units.zero_()
            loss.levels[0].spatial_units.zero_()
        assert loss(s, t, None).item() == pytest.approx(2.0 * mse + 0.5 * 2 * dice, rel=1e-5)


def test_the_distillation_terms_vanish_for_identical_maps_and_the_diversity_remains() -> None:
    gen = torch.Generator().manual_seed(5)
    t = torch.randn(2, 4, 3, 3, generator=gen)
    silent = LOSSES.get("acam")(lambda_=0.0)
    silent.setup((4, 3, 3), (4, 3, 3), num_samples=1)
    assert silent(t.clone(), t, None).item() == 0.0
    assert silent(t + 0.1, t, None).item() > 0.0
    loss = LOSSES.get("acam")(lambda_=1.0)
    loss.setup((4, 3, 3), (4, 3, 3), num_samples=1)
    channel, spatial = loss.masks(0, t, t)
    expected = dice_diversity(channel) + dice_diversity(spatial)
    assert loss(t.clone(), t, None).item() == pytest.approx(expected.item(), rel=1e-6)


def test_mask_grad_stop_keeps_the_masks_gradient_off_the_student() -> None:
    """With alpha 0 only the diversity is left, which reaches the student only through the masks: ``through`` passes
    its gradient on, ``stop`` none (the fusion's parameters still get one); both give the same value."""
    gen = torch.Generator().manual_seed(8)
    s0, t = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    values = {}
    for mode in ("through", "stop"):
        loss = made({"alpha": 0.0, "mask_grad": mode}, (4, 4, 4), (4, 4, 4))
        s = s0.double().requires_grad_()
        value = loss(s, t.double(), None)
        value.backward()
        values[mode] = value.item()
        assert (s.grad.abs().sum() > 0) == (mode == "through")
        assert loss.levels[0].w_k.grad.abs().sum() > 0
    assert values["through"] == values["stop"]


def test_orthogonal_masks_have_zero_diversity_and_equal_ones_the_maximum() -> None:
    apart = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 1.0, 0], [0, 0, 0, 1.0]]])
    same = torch.ones(1, 3, 4)
    for form, top in (("pairwise", 1.0), ("pooled", 2.0)):
        assert dice_diversity(apart, form).item() == 0.0
        assert dice_diversity(same, form).item() == pytest.approx(top)


def test_levels_are_summed_each_with_its_own_modules() -> None:
    loss = LOSSES.get("acam")()
    loss.setup([(4, 6, 6), (4, 3, 3)], [(8, 6, 6), (8, 3, 3)], num_samples=1)
    assert len(loss.levels) == 2 and loss.levels[0].w_v is not loss.levels[1].w_v
    gen = torch.Generator().manual_seed(6)
    s = [torch.randn(2, 4, 6, 6, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)]
    t = [torch.randn(2, 8, 6, 6, generator=gen), torch.randn(2, 8, 3, 3, generator=gen)]
    total = loss(s, t, None)
    assert total.item() == pytest.approx((loss.level(0, s[0], t[0]) + loss.level(1, s[1], t[1])).item(), rel=1e-6)


def test_float64_stays_float64_and_half_is_upcast() -> None:
    loss = LOSSES.get("acam")()
    loss.setup((4, 4, 4), (6, 4, 4), num_samples=1)  # float32 modules
    s = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    value = loss(s, torch.randn(2, 6, 4, 4, dtype=torch.float64), None)
    assert value.dtype == torch.float64
    value.backward()
    assert s.grad.dtype == torch.float64 and all(p.grad is not None for p in loss.parameters())
    for half in (torch.bfloat16, torch.float16):
        low = loss(torch.randn(2, 4, 4, 4).to(half), torch.randn(2, 6, 4, 4).to(half), None)
        assert low.dtype == torch.float32 and torch.isfinite(low)


@pytest.mark.parametrize("scale", [1e-6, 1e4])
def test_gradients_are_finite_on_extreme_maps(scale: float) -> None:
    """Huge maps saturate the masks (some to 0 everywhere) and the attention; tiny ones flatten them."""
    loss = LOSSES.get("acam")()
    loss.setup((4, 4, 4), (6, 4, 4), num_samples=1)
    with torch.no_grad():
        loss.levels[0].spatial_units.normal_(0, 1.0)
    gen = torch.Generator().manual_seed(7)
    s = (torch.randn(2, 4, 4, 4, generator=gen) * scale).requires_grad_()
    value = loss(s, torch.randn(2, 6, 4, 4, generator=gen) * scale, None)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in loss.parameters())


@pytest.mark.parametrize(("student", "teacher", "message"), [
    ((10,), (10,), "feature maps of one spatial size"),
    ((4, 6, 6), (8, 3, 3), "feature maps of one spatial size"),
    ([(4, 6, 6)], [(8, 6, 6), (8, 3, 3)], "1 student and 2 teacher levels"),
])
def test_shapes_it_cannot_compare_are_refused_with_the_fix(student, teacher, message: str) -> None:
    problem = LOSSES.get("acam")().check_shapes(student, teacher)
    assert isinstance(problem, KdkitError) and message in str(problem)
    assert LOSSES.get("acam")().check_shapes((4, 6, 6), (8, 6, 6)) is None


def test_an_attention_pool_that_does_not_divide_the_map_is_refused_naming_the_factors() -> None:
    problem = LOSSES.get("acam")(attention_pool=5).check_shapes((4, 12, 12), (8, 12, 12))
    assert isinstance(problem, KdkitError) and "closest first: 4, 6, 3, 2, 1, 12 (1: no pooling)" in str(problem)
    assert LOSSES.get("acam")(attention_pool=4).check_shapes((4, 12, 12), (8, 12, 12)) is None


# -- recipes ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "change", "message"), [
    ("scenes_det/acam", {"distill.0.student": "logits", "distill.0.teacher": "logits"}, "(C, H, W) feature maps"),
    ("scenes_det/acam", {"distill.0.student": ["p2", "p3", "p4"], "distill.0.teacher": ["p3", "p4", "p2"]},
     "of one spatial size"),
    ("scenes_det/acam", {"distill.0.attention_pool": 5}, "attention_pool 5 does not divide"),
    ("scenes_det/acam", {"distill.0.num_masks": 1}, "num_masks must be"),
    ("scenes_det/acam", {"distill.0.diversity": "dice"}, "diversity"),
    ("scenes_seg/acam", {"distill.0.attention_pool": 5}, "attention_pool 5 does not divide"),
    ("scenes_seg/acam", {"distill.0.student": "stage3", "distill.0.teacher": "stage2"}, "of one spatial size"),
])
def test_acam_recipes_it_cannot_work_with_exit_2_before_training(name: str, change: dict, message: str,
                                                                 tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    recipe = shipped_on_tiny_scenes(name, tmp_path)
    edit_recipe(recipe, change)
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_acam_on_a_classification_task_exits_2_before_training(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The wrong task: a classifier's logits are vectors, not maps; refused with the fix, not a bridge hint."""
    recipe = {"model": {"arch": "cnn_student"}, "data": {"dataset": "fashion_mnist", "subset": 100},
              "teacher": {"arch": "cnn_teacher", "checkpoint": str(tmp_path / "t.safetensors")},
              "distill": [{"loss": "acam", "student": "logits", "teacher": "logits"}],
              "train": {"epochs": 1}, "output": {"dir": str(tmp_path / "run")}}
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    err = capsys.readouterr().err
    assert "(C, H, W) feature maps" in err and "bridge:" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_shipped_detection_acam_recipe_runs_end_to_end(tmp_path: Path) -> None:
    from kdkit.recipe import recipe_from_dict
    from kdkit.runner import run_recipe

    summary = run_recipe(recipe_from_dict(tiny_det(tmp_path, "scenes_det/acam")))
    assert summary["task"] == "detection" and summary["loss_params"] > 0  # fusion and selection units trained
    row = json.loads((tmp_path / "run" / "metrics.json").read_text())[-1]
    assert math.isfinite(row["train_acam"]) and row["train_acam"] > 0 and math.isfinite(row["test_map"])


@pytest.mark.slow
def test_acam_resumes_exactly(tmp_path: Path) -> None:
    """The fusion and the selection units are trained state: a resumed run restores them (and their optimiser)."""
    recipe = edit_recipe(tiny_det(tmp_path, "scenes_det/acam"), {"train.epochs": 2})
    straight, broken = straight_and_resumed(recipe, tmp_path, 4)
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((broken / "metrics.json").read_text())
    assert [(r["train_acam"], r["test_map"]) for r in a] == [(r["train_acam"], r["test_map"]) for r in b]


@pytest.mark.slow
def test_the_shipped_segmentation_acam_recipe_runs_end_to_end(tmp_path: Path) -> None:
    from kdkit.recipe import recipe_from_dict
    from kdkit.runner import run_recipe

    recipe = tiny_seg(tmp_path, "scenes_seg/acam")
    summary = run_recipe(recipe_from_dict(recipe))
    assert summary["loss_params"] > 0
    row = json.loads((tmp_path / "run" / "metrics.json").read_text())[-1]
    assert row["train_acam"] > 0 and math.isfinite(row["test_miou"])
