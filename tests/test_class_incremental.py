"""Class-incremental segmentation: the ``class_incremental`` setting's masks, growing the classifier from the
previous step, the old/new mIoU, the ``old_kd`` and ``bacs`` losses against independent computations, the
refusals, and a tiny two-step run end to end."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import edit_recipe, write_recipe
from kdkit.checkpoint import load_model_weights
from kdkit.cli import main
from kdkit.data import DATASETS
from kdkit.data.base import UNLABELLED, ImageData
from kdkit.data.settings import apply_setting
from kdkit.distributed import DistContext
from kdkit.errors import KdkitError
from kdkit.losses.old_kd import OldKDLoss, old_kd_loss
from kdkit.methods.bacs import BacsLoss, bacs_ce_loss, detect_shift, masked_feature_kd
from kdkit.models import build_model
from kdkit.tasks.segmentation import SegmentationEvaluator

F64 = torch.float64


def scenes(root: object = None, n: int = 40, classes: int = 4, size: int = 8) -> ImageData:
    """``n`` images per split of ``size``; each holds two squares of two random classes (masks ``class + 1``);
    the label is the first square's class."""
    gen = torch.Generator().manual_seed(0)

    def split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = torch.zeros(n, 1, size, size, dtype=torch.uint8)
        masks = torch.zeros(n, size, size, dtype=torch.uint8)
        labels = torch.randint(0, classes, (n,), generator=gen)
        second = torch.randint(0, classes, (n,), generator=gen)
        for i in range(n):
            images[i, 0, 1:4, 1:4] = 50 * (int(labels[i]) + 1)
            masks[i, 1:4, 1:4] = int(labels[i]) + 1
            images[i, 0, 5:7, 4:7] = 50 * (int(second[i]) + 1)
            masks[i, 5:7, 4:7] = int(second[i]) + 1
        return images, labels, masks

    (a, la, ma), (b, lb, mb) = split(), split()
    return ImageData("scenes4", a, la, b, lb, tuple(f"c{i}" for i in range(classes)), (0.1,), (0.3,), "test scenes",
                     train_targets={"semantic": ma}, test_targets={"semantic": mb})


# -- the setting -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("step", [1, 2])
def test_each_step_keeps_the_scenes_showing_its_classes_and_labels_only_those(step: int) -> None:
    data = scenes()
    out = apply_setting(data, "class_incremental", {"step": step, "base": 2}, seed=0)
    lo, hi = (1, 2) if step == 1 else (3, 4)  # mask values of the step's classes
    kept, expected = [], []
    for i in range(len(data.train_labels)):
        m = data.train_targets["semantic"][i].numpy()
        if ((m >= lo) & (m <= hi)).any():
            kept.append(i)
            expected.append(np.where((m >= lo) & (m <= hi), m, 0))
    assert torch.equal(out.train_images, data.train_images[kept])
    assert np.array_equal(out.train_targets["semantic"].numpy(), np.stack(expected))
    assert out.num_classes == (2 if step == 1 else 4)
    assert out.old_classes == (() if step == 1 else (0, 1))
    test = data.test_targets["semantic"].numpy()
    if step == 1:  # the test scenes showing an old class, later classes background
        keep = [i for i in range(len(test)) if ((test[i] >= 1) & (test[i] <= 2)).any()]
        assert np.array_equal(out.test_targets["semantic"].numpy(),
                              np.stack([np.where(test[i] <= 2, test[i], 0) for i in keep]))
    else:  # every test scene with every class
        assert np.array_equal(out.test_targets["semantic"].numpy(), test)
    assert int(out.train_labels.min()) >= 0 and int(out.train_labels.max()) < out.num_classes


@pytest.mark.parametrize("base", [0, 4, 9])
def test_a_base_outside_1_to_k_minus_1_is_refused(base: int) -> None:
    with pytest.raises(KdkitError, match=r"base .* 1\.\.3"):
        apply_setting(scenes(), "class_incremental", {"step": 1, "base": base}, seed=0)


def test_a_dataset_without_masks_is_refused() -> None:
    data = scenes()
    plain = ImageData("plain", data.train_images, data.train_labels, data.test_images, data.test_labels,
                      data.classes, data.mean, data.std, "plain")
    with pytest.raises(KdkitError, match="semantic"):
        apply_setting(plain, "class_incremental", {"step": 2}, seed=0)


# -- growing the classifier ----------------------------------------------------------------------------------
def test_a_grown_model_takes_the_old_rows_and_keeps_its_fresh_new_ones(tmp_path: Path) -> None:
    torch.manual_seed(0)
    old = build_model("segnet_student", num_classes=3, in_channels=1, image_size=8, params={"width": 4})
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(path))
    torch.manual_seed(1)
    new = build_model("segnet_student", num_classes=5, in_channels=1, image_size=8, params={"width": 4})
    fresh = {k: v.clone() for k, v in new.state_dict().items()}
    with pytest.raises(KdkitError, match="shape mismatch"):  # strict by default
        load_model_weights(new, path)
    load_model_weights(new, path, grow=True)
    state, saved = new.state_dict(), old.state_dict()
    assert torch.equal(state["classifier.weight"][:3], saved["classifier.weight"])
    assert torch.equal(state["classifier.weight"][3:], fresh["classifier.weight"][3:])
    assert torch.equal(state["classifier.bias"][:3], saved["classifier.bias"])
    assert torch.equal(state["classifier.bias"][3:], fresh["classifier.bias"][3:])
    assert all(torch.equal(state[k], saved[k]) for k in saved if not k.startswith("classifier"))


def test_growing_refuses_a_checkpoint_with_more_rows_or_another_width(tmp_path: Path) -> None:
    big = build_model("segnet_student", num_classes=6, in_channels=1, image_size=8, params={"width": 4})
    path = tmp_path / "big.safetensors"
    save_file({k: v.contiguous() for k, v in big.state_dict().items()}, str(path))
    small = build_model("segnet_student", num_classes=5, in_channels=1, image_size=8, params={"width": 4})
    with pytest.raises(KdkitError, match="shape mismatch"):
        load_model_weights(small, path, grow=True)
    wide = build_model("segnet_student", num_classes=6, in_channels=1, image_size=8, params={"width": 8})
    with pytest.raises(KdkitError, match="shape mismatch"):
        load_model_weights(wide, path, grow=True)


# -- old / new mIoU ------------------------------------------------------------------------------------------
@pytest.mark.slow  # the first torchmetrics import takes seconds
def test_old_and_new_miou_are_the_means_of_the_per_class_ious_over_their_channels() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 6, 6, generator=gen)
    truth = torch.randint(0, 5, (3, 6, 6), generator=gen)
    truth[0, 0] = UNLABELLED
    ev = SegmentationEvaluator(5, torch.device("cpu"), DistContext(), old=(0, 1, 2))
    ev.update(logits, truth)
    got = ev.compute()
    pred, t = logits.argmax(1).numpy(), truth.numpy()
    ious = []
    for c in range(5):
        scored = t != UNLABELLED
        inter = ((pred == c) & (t == c) & scored).sum()
        union = (((pred == c) | (t == c)) & scored).sum()
        ious.append(inter / union)
    assert got["miou_old"] == pytest.approx(100 * np.mean(ious[:3]), rel=1e-5)
    assert got["miou_new"] == pytest.approx(100 * np.mean(ious[3:]), rel=1e-5)
    assert got["miou"] == pytest.approx(100 * np.mean(ious), rel=1e-5)
    plain = SegmentationEvaluator(5, torch.device("cpu"), DistContext())
    plain.update(logits, truth)
    assert "miou_old" not in plain.compute()


# -- old_kd ---------------------------------------------------------------------------------------------------
def old_kd_np(s: np.ndarray, t: np.ndarray, temp: float, unbiased: bool) -> float:
    """Per-pixel loops: KL of the old model's softmax and the student's (old outputs, or MiB's background)."""
    n, _, h, w = s.shape
    ko = t.shape[1]
    total = 0.0
    for b in range(n):
        for i in range(h):
            for j in range(w):
                zt = [math.exp(v / temp) for v in t[b, :, i, j]]
                pt = [v / sum(zt) for v in zt]
                if unbiased:
                    zs = [math.exp(v / temp) for v in s[b, :, i, j]]
                    ps = [(zs[0] + sum(zs[ko:])) / sum(zs)] + [zs[c] / sum(zs) for c in range(1, ko)]
                else:
                    zs = [math.exp(v / temp) for v in s[b, :ko, i, j]]
                    ps = [v / sum(zs) for v in zs]
                total += sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, ps, strict=True))
    return temp * temp * total / (n * h * w)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_old_kd_matches_per_pixel_loops(unbiased: bool, temp: float) -> None:
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 6, 3, 4, generator=gen, dtype=F64) * 2, torch.randn(2, 4, 3, 4, generator=gen, dtype=F64)
    got = old_kd_loss(s, t, temp, unbiased)
    assert float(got) == pytest.approx(old_kd_np(s.numpy(), t.numpy(), temp, unbiased), rel=1e-10)


def test_old_kd_is_zero_when_the_old_outputs_agree_and_grows_when_they_do_not() -> None:
    t = torch.randn(2, 3, 4, 4, dtype=F64)
    s = torch.cat([t + 5.0, torch.randn(2, 2, 4, 4, dtype=F64)], 1)  # a shift does not change a softmax
    assert float(old_kd_loss(s, t)) == pytest.approx(0.0, abs=1e-12)
    assert float(old_kd_loss(s, t, unbiased=True)) > 0  # the new outputs take background mass


@pytest.mark.parametrize("dtype", [F64, torch.float16, torch.bfloat16])
def test_old_kd_keeps_float64_upcasts_half_and_has_finite_gradients_on_extreme_logits(dtype: torch.dtype) -> None:
    s = (torch.randn(2, 5, 3, 3) * 1e3).to(dtype).requires_grad_()
    t = (torch.randn(2, 3, 3, 3) * 1e3).to(dtype)
    for unbiased in (False, True):
        out = OldKDLoss(unbiased=unbiased)(s, t, torch.zeros(2, 3, 3, dtype=torch.long))
        assert out.dtype == (F64 if dtype == F64 else torch.float32)
        (grad,) = torch.autograd.grad(out, s)
        assert torch.isfinite(grad).all()


# -- BACS -----------------------------------------------------------------------------------------------------
def detect_np(f: np.ndarray, z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Loops: centroids of the L2-normalised features of background-labelled pixels per old-model prediction, then
    shifted = nearer a foreground centroid than the background one."""
    n, _, h, w = f.shape
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    pred = z.argmax(1)
    sums, counts = {}, {}
    for b in range(n):
        for i in range(h):
            for j in range(w):
                if y[b, i, j] == 0:
                    k = int(pred[b, i, j])
                    sums[k] = sums.get(k, 0) + f[b, :, i, j]
                    counts[k] = counts.get(k, 0) + 1
    mu = {k: sums[k] / counts[k] for k in sums}
    out = np.zeros((n, h, w), dtype=bool)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                if y[b, i, j] != 0:
                    continue
                d = {k: np.linalg.norm(f[b, :, i, j] - m) for k, m in mu.items()}
                fg = min([v for k, v in d.items() if k >= 1], default=math.inf)
                out[b, i, j] = fg < d.get(0, math.inf)
    return out


def bacs_inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(2, 5, 4, 4, generator=gen, dtype=F64)
    z_old = torch.randn(2, 3, 4, 4, generator=gen, dtype=F64) * 2
    z = torch.randn(2, 6, 4, 4, generator=gen, dtype=F64) * 2
    y = torch.randint(0, 6, (2, 4, 4), generator=gen)
    y[y > 2] = 0  # many background pixels
    y[0, 0, 0], y[1, 3, 3] = 4, UNLABELLED
    return f, z_old, z, y


def test_the_detector_matches_nearest_centroid_loops() -> None:
    f, z_old, _, y = bacs_inputs()
    got = detect_shift(f, z_old, y)
    want = detect_np(f.numpy(), z_old.numpy(), y.numpy())
    assert np.array_equal(got.numpy(), want)
    assert 0 < got.sum() < (y == 0).sum()  # the example is not trivial


def test_the_detector_flags_a_background_pixel_whose_features_are_an_old_class() -> None:
    f = torch.zeros(1, 2, 1, 3, dtype=F64)
    f[0, :, 0, 0] = torch.tensor([1.0, 0.0])  # old model: class 1 here
    f[0, :, 0, 1] = torch.tensor([0.0, 1.0])  # old model: background here
    f[0, :, 0, 2] = torch.tensor([0.9, 0.1])  # looks like class 1
    z = torch.tensor([[[[0.0, 5.0, 5.0]], [[5.0, 0.0, 0.0]]]], dtype=F64)  # argmax: 1, 0, 0
    y = torch.zeros(1, 1, 3, dtype=torch.long)
    assert detect_shift(f, z, y).tolist() == [[[True, False, True]]]
    assert not detect_shift(f, z, torch.full_like(y, 2)).any()  # only background-labelled pixels


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_the_shift_aware_ce_is_the_weighted_mean_of_pixel_ces(weight: float) -> None:
    f, z_old, z, y = bacs_inputs()
    shifted = detect_shift(f, z_old, y)
    got = float(bacs_ce_loss(z, y, shifted, weight))
    num = den = 0.0
    for b, i, j in np.ndindex(*y.shape):
        label = int(y[b, i, j])
        if label == UNLABELLED:
            continue
        w = weight if bool(shifted[b, i, j]) else 1.0
        zz = z[b, :, i, j].tolist()
        num += w * (math.log(sum(math.exp(v) for v in zz)) - zz[label])
        den += w
    assert got == pytest.approx(num / den, rel=1e-10)
    if weight == 1.0:  # nothing down-weighted: the plain cross-entropy over labelled pixels
        plain = torch.nn.functional.cross_entropy(z, y, ignore_index=UNLABELLED)
        assert got == pytest.approx(float(plain), rel=1e-10)


def test_masked_feature_kd_averages_squared_distances_over_masked_pixels_and_channels() -> None:
    gen = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 3, 4, 4, generator=gen, dtype=F64), torch.randn(2, 3, 4, 4, generator=gen, dtype=F64)
    mask = torch.rand(2, 4, 4, generator=gen) > 0.5
    want = sum(float(((s[b, :, i, j] - t[b, :, i, j]) ** 2).sum()) for b, i, j in np.ndindex(2, 4, 4)
               if mask[b, i, j]) / (3 * int(mask.sum()))
    assert float(masked_feature_kd(s, t, mask)) == pytest.approx(want, rel=1e-12)
    assert float(masked_feature_kd(t, t, mask)) == 0.0
    assert float(masked_feature_kd(s, t, torch.zeros_like(mask))) == 0.0


def test_the_bacs_loss_is_its_ce_plus_the_weighted_masked_feature_kd() -> None:
    f, z_old, z, y = bacs_inputs()
    fs = f + 0.5 * torch.randn_like(f)
    loss = BacsLoss(shift_weight=0.2, feature_weight=3.0)
    shifted = detect_shift(f, z_old, y)
    want = bacs_ce_loss(z, y, shifted, 0.2) + 3.0 * masked_feature_kd(fs, f, y == 0)
    assert float(loss([fs, z], [f, z_old], y)) == pytest.approx(float(want), rel=1e-12)
    assert float(BacsLoss(mask="all")([f, z], [f, z_old], y)) == pytest.approx(
        float(bacs_ce_loss(z, y, shifted, 0.0)), rel=1e-12)  # identical features: no feature term


@pytest.mark.parametrize("dtype", [F64, torch.float16, torch.bfloat16])
def test_bacs_keeps_float64_upcasts_half_and_has_finite_gradients_on_extreme_inputs(dtype: torch.dtype) -> None:
    f, z_old, z, y = bacs_inputs()
    fs = (f * 1e3).to(dtype).requires_grad_()
    zs = (z * 1e3).to(dtype).requires_grad_()
    out = BacsLoss()([fs, zs], [(f * 1e3).to(dtype), (z_old * 1e3).to(dtype)], y)
    assert out.dtype == (F64 if dtype == F64 else torch.float32)
    grads = torch.autograd.grad(out, [fs, zs])
    assert all(torch.isfinite(g).all() for g in grads)


# -- recipes --------------------------------------------------------------------------------------------------
@pytest.fixture
def steps(tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], dict[str, Any]]:
    """A tiny step-1 recipe on ``scenes4`` (classes 0-1) and its step-2 BACS recipe (classes 2-3 added)."""
    monkeypatch.setitem(DATASETS._entries, "scenes4", scenes)
    one = copy.deepcopy(tiny)
    one.update(task="segmentation", model={"arch": "segnet_student", "params": {"width": 4}},
               data={"dataset": "scenes4", "setting": {"name": "class_incremental", "step": 1, "base": 2}})
    one["train"]["batch_size"] = 8
    one["output"]["dir"] = str(tmp_path / "step1")
    step1 = write_recipe(tmp_path / "step1.yaml", one)
    two = copy.deepcopy(one)
    two["model"]["init"] = "teacher"
    two["teacher"] = {"arch": "segnet_student", "params": {"width": 4}, "classes": 2, "recipe": str(step1)}
    two["data"]["setting"]["step"] = 2
    two["distill"] = [{"loss": "bacs", "student": ["decoder1", "logits"], "teacher": ["decoder1", "logits"]}]
    two["train"]["ce_weight"] = 0.0
    two["output"]["dir"] = str(tmp_path / "step2")
    return one, two


@pytest.mark.parametrize(("change", "message"), [
    ({"teacher": None}, "continues a model of 2 classes, but the recipe has no teacher"),
    ({"teacher.classes": None}, "teacher.classes None"),
    ({"task": "classification", "distill": None, "train.ce_weight": 1.0}, "not task 'classification'"),
    ({"data.setting.base": 4}, "base 4"),
    ({"model.params": {"width": 8}}, "model.init 'teacher' needs the teacher's arch and params"),
    ({"teacher.classes": 9}, "teacher.classes 9 exceeds"),
])
def test_step_2_recipes_that_cannot_work_are_refused_before_training(steps: tuple, change: dict, message: str,
                                                                      tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    two = edit_recipe(copy.deepcopy(steps[1]), change)
    if two.get("teacher") is None:
        two["model"].pop("init")
        two.pop("distill")
    assert main(["run", str(write_recipe(tmp_path / "bad.yaml", two))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "step1" / "checkpoints").exists() and not (tmp_path / "step2" / "checkpoints").exists()


@pytest.mark.slow  # reads the Fashion-MNIST scenes
def test_the_shipped_recipes_validate() -> None:
    for name in ("teacher", "student_ft", "kd", "bacs"):
        assert main(["validate", f"recipes/scenes_seg_incremental/{name}.yaml"]) == 0


@pytest.mark.slow
def test_two_tiny_steps_grow_the_model_and_report_old_and_new_miou(steps: tuple, tmp_path: Path) -> None:
    from kdkit.build import plan
    from kdkit.checkpoint import read_weights, resolve_weights
    from kdkit.recipe import recipe_from_dict

    two = steps[1]
    assert main(["run", str(tmp_path / "step1.yaml")]) == 0
    old, _ = read_weights(resolve_weights(tmp_path / "step1"))
    grown = {k.removeprefix("model."): v for k, v in
             plan(recipe_from_dict(two), training=True).student.state_dict().items() if k.startswith("model.")}
    old = {k.removeprefix("model."): v for k, v in old.items() if k.startswith("model.")}
    assert grown["classifier.weight"].shape[0] == 5 and old["classifier.weight"].shape[0] == 3
    assert all(torch.equal(grown[k][: v.shape[0]] if v.dim() else grown[k], v) for k, v in old.items())  # grown
    assert main(["run", str(write_recipe(tmp_path / "step2.yaml", two))]) == 0
    first = json.loads((tmp_path / "step1" / "summary.json").read_text())
    second = json.loads((tmp_path / "step2" / "summary.json").read_text())
    assert "last_miou_old" not in first and {"last_miou_old", "last_miou_new", "last_miou"} <= set(second)
    assert all(0.0 <= second[k] <= 100.0 for k in ("last_miou_old", "last_miou_new"))


def test_starting_from_a_teacher_that_is_not_there_is_refused_before_training(steps: tuple, tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture[str]
                                                                               ) -> None:
    one = copy.deepcopy(steps[0])
    one["model"]["init"] = "teacher"
    assert main(["run", str(write_recipe(tmp_path / "bad.yaml", one))]) == 2
    assert "model.init 'teacher' needs one frozen `teacher:`" in capsys.readouterr().err
    assert not (tmp_path / "step1" / "checkpoints").exists()
