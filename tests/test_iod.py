"""Class-incremental detection: the ``class_incremental`` setting's boxes on a hand-made case, growing a detector's
classifier, ``map_old`` / ``map_new``, the ``old_det_kd`` and ``iod`` losses against float64 loops, their properties,
the refusals, and the shipped IOD recipe end to end on tiny scenes."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from conftest import shipped_on_tiny_scenes, write_recipe
from kdkit.checkpoint import load_model_weights
from kdkit.cli import main
from kdkit.data import DATASETS
from kdkit.data.base import ImageData
from kdkit.data.settings import apply_setting
from kdkit.errors import KdkitError
from kdkit.losses.iod import IODLoss, dense_features, iod_terms
from kdkit.losses.old_det_kd import OldDetKDLoss, old_det_kd_loss
from kdkit.models import build_model
from kdkit.tasks.detection import Detection, old_new_map

F64 = torch.float64
PAD = [-1.0, -1.0, -1.0, -1.0]


# -- the setting on a hand-made case ------------------------------------------------------------------------------
def boxes4(root: object = None, size: int = 16) -> ImageData:
    """Four scenes per split over 4 classes, boxes only (no masks); box ``j`` of scene ``i`` is
    ``(i, j, i + 4 + j, j + 4)`` so every box is recognisable after the rewrite."""
    labels = torch.tensor([[0, 2, 1], [3, -1, -1], [1, -1, -1], [2, 0, -1]])
    boxes = torch.zeros(4, 3, 4)
    for i in range(4):
        for j in range(3):
            if labels[i, j] >= 0:
                boxes[i, j] = torch.tensor([i, j, i + 4 + j, j + 4], dtype=torch.float32)
    images = torch.zeros(4, 1, size, size, dtype=torch.uint8)
    images[:, :, 2:10, 2:10] = 200
    image_labels = torch.tensor([0, 3, 1, 2])
    targets = {"boxes": boxes, "box_labels": labels}
    return ImageData("boxes4", images, image_labels, images.clone(), image_labels.clone(),
                     ("c0", "c1", "c2", "c3"), (0.1,), (0.3,), "hand-made boxes",
                     train_targets=targets, test_targets={k: v.clone() for k, v in targets.items()})


def box(i: int, j: int) -> list[float]:
    return [float(i), float(j), float(i + 4 + j), float(j + 4)]


def test_step_1_keeps_the_scenes_with_an_old_class_and_drops_the_later_classes_boxes() -> None:
    out = apply_setting(boxes4(), "class_incremental", {"step": 1, "base": 2}, seed=0)
    # scenes 0, 2, 3 show class 0 or 1; scene 0's class-2 box is dropped and its class-1 box moves up
    assert out.train_targets["box_labels"].tolist() == [[0, 1, -1], [1, -1, -1], [0, -1, -1]]
    assert out.train_targets["boxes"].tolist() == [[box(0, 0), box(0, 2), [0.0] * 4], [box(2, 0), [0.0] * 4,
                                                   [0.0] * 4], [box(3, 1), [0.0] * 4, [0.0] * 4]]
    assert out.train_labels.tolist() == [0, 1, 0] and out.num_classes == 2 and out.old_classes == ()
    assert out.test_targets["box_labels"].tolist() == [[0, 1, -1], [1, -1, -1], [0, -1, -1]]  # test: the same rule
    assert "semantic" not in out.train_targets


def test_step_2_drops_the_old_classes_boxes_and_tests_on_every_class() -> None:
    data = boxes4()
    out = apply_setting(data, "class_incremental", {"step": 2, "base": 2}, seed=0)
    # scenes 0, 1, 3 show class 2 or 3; their class-0/1 boxes are dropped (old objects become background)
    assert out.train_targets["box_labels"].tolist() == [[2, -1, -1], [3, -1, -1], [2, -1, -1]]
    assert out.train_targets["boxes"].tolist() == [[box(0, 1), [0.0] * 4, [0.0] * 4], [box(1, 0), [0.0] * 4,
                                                   [0.0] * 4], [box(3, 0), [0.0] * 4, [0.0] * 4]]
    assert torch.equal(out.train_images, data.train_images[[0, 1, 3]])
    assert out.train_labels.tolist() == [2, 3, 2] and out.num_classes == 4 and out.old_classes == (0, 1)
    assert torch.equal(out.test_targets["box_labels"], data.test_targets["box_labels"])  # every class
    assert torch.equal(out.test_targets["boxes"], data.test_targets["boxes"])


def test_masks_and_boxes_are_rewritten_together() -> None:
    data = boxes4()
    masks = torch.zeros(4, 16, 16, dtype=torch.uint8)
    for i in range(4):
        for j in range(3):
            if data.train_targets["box_labels"][i, j] >= 0:
                masks[i, j, i] = int(data.train_targets["box_labels"][i, j]) + 1
    both = ImageData("both", data.train_images, data.train_labels, data.test_images, data.test_labels, data.classes,
                     data.mean, data.std, "both", train_targets={**data.train_targets, "semantic": masks},
                     test_targets={**data.test_targets, "semantic": masks.clone()})
    out = apply_setting(both, "class_incremental", {"step": 2, "base": 2}, seed=0)
    assert out.train_targets["box_labels"].tolist() == [[2, -1, -1], [3, -1, -1], [2, -1, -1]]
    assert sorted(torch.unique(out.train_targets["semantic"]).tolist()) == [0, 3, 4]  # old pixels background


def test_a_dataset_without_masks_or_boxes_is_refused() -> None:
    data = boxes4()
    plain = ImageData("plain", data.train_images, data.train_labels, data.test_images, data.test_labels,
                      data.classes, data.mean, data.std, "plain")
    with pytest.raises(KdkitError, match="masks or 'boxes'"):
        apply_setting(plain, "class_incremental", {"step": 2, "base": 2}, seed=0)


# -- growing a detector ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "params", "rows"), [
    ("det_student", {"width": 4, "fpn_width": 8, "box_bins": 8}, "head.cls_logits"),
    ("det_teacher", {"width": 4, "fpn_width": 8, "box_bins": 0}, "head.cls_logits"),
    pytest.param("tv_fcos", {"width": 4, "fpn_width": 32, "head_convs": 1}, "head.classification_head.cls_logits",
                 marks=pytest.mark.slow),  # the first torchvision.models.detection import takes seconds
])
def test_a_grown_detector_takes_every_old_tensor_and_keeps_fresh_new_class_rows(arch: str, params: dict, rows: str,
                                                                                  tmp_path: Path) -> None:
    torch.manual_seed(0)
    old = build_model(arch, num_classes=2, in_channels=1, image_size=16, params=params)
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(path))
    torch.manual_seed(1)
    new = build_model(arch, num_classes=5, in_channels=1, image_size=16, params=params)
    fresh = {k: v.clone() for k, v in new.state_dict().items()}
    load_model_weights(new, path, grow=True)
    state, saved = new.state_dict(), old.state_dict()
    grown = {k for k in saved if saved[k].shape != state[k].shape}
    assert grown == {f"{rows}.weight", f"{rows}.bias"}  # only the class logits grow
    for k in grown:
        assert torch.equal(state[k][:2], saved[k]) and torch.equal(state[k][2:], fresh[k][2:])
    assert all(torch.equal(state[k], saved[k]) for k in saved if k not in grown)
    assert new.dense_spec.num_classes == 5


# -- map_old / map_new -----------------------------------------------------------------------------------------------
def test_old_and_new_map_average_the_per_class_ap_of_the_classes_with_a_test_box() -> None:
    classes = torch.tensor([0, 1, 2, 3, 4])
    per_class = torch.tensor([0.5, -1.0, 0.25, 0.75, 0.125])  # class 1 has no test box
    got = old_new_map(classes, per_class, old=(0, 1, 2))
    assert got["map_old"] == pytest.approx(100 * (0.5 + 0.25) / 2)
    assert got["map_new"] == pytest.approx(100 * (0.75 + 0.125) / 2)
    assert math.isnan(old_new_map(classes[:2], per_class[:2], old=(0, 1))["map_new"])


def test_map_old_and_new_are_reported_on_a_step_2_only() -> None:
    one = apply_setting(boxes4(), "class_incremental", {"step": 1, "base": 2}, seed=0)
    two = apply_setting(boxes4(), "class_incremental", {"step": 2, "base": 2}, seed=0)
    assert "map_old" not in Detection().metrics_for(one)
    assert {"map", "map_old", "map_new"} <= set(Detection().metrics_for(two))


# -- the losses against float64 loops ----------------------------------------------------------------------------
def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bkl(s: float, t: float) -> float:
    p, q = sig(t), sig(s)
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


BINS, KO, KN, C = 2, 3, 5, 4
R = 4 * (BINS + 1) + 1  # box and centerness channels


def dense_pair(seed: int = 0, b: int = 2, levels: tuple[int, ...] = (3, 2)) -> tuple[list[torch.Tensor], ...]:
    """Student / teacher taps ``[levels (B, C, s, s)..., dense (B, L, K + R)]``, float64; the teacher's class logits
    spread so that some locations of several classes pass 0.5."""
    gen = torch.Generator().manual_seed(seed)
    ls = sum(s * s for s in levels)
    fs = [torch.randn(b, C, s, s, generator=gen, dtype=F64) for s in levels]
    ft = [torch.randn(b, C, s, s, generator=gen, dtype=F64) for s in levels]
    zs = torch.randn(b, ls, KN + R, generator=gen, dtype=F64)
    zt = torch.randn(b, ls, KO + R, generator=gen, dtype=F64) * 2 - 1
    return [*fs, zs], [*ft, zt]


def instances(zt: torch.Tensor, thr: float) -> list[tuple[int, int, int]]:
    """(image, location, class) of every location whose top old-class sigmoid reaches ``thr``."""
    out = []
    for b in range(zt.shape[0]):
        for i in range(zt.shape[1]):
            p = [sig(float(v)) for v in zt[b, i, :KO]]
            if max(p) >= thr:
                out.append((b, i, p.index(max(p))))
    return out


def old_det_kd_loop(zs: torch.Tensor, zt: torch.Tensor, thr: float, box_weight: float) -> float:
    cls = sum(bkl(float(zs[b, i, c]), float(zt[b, i, c])) for b in range(zs.shape[0]) for i in range(zs.shape[1])
              for c in range(KO))
    pos = instances(zt, thr)
    boxes = sum((float(zs[b, i, KN + r]) - float(zt[b, i, KO + r])) ** 2 for b, i, _ in pos for r in range(R)) / R
    return (cls + box_weight * boxes) / max(len(pos), 1)


@pytest.mark.parametrize(("thr", "box_weight"), [(0.5, 1.0), (0.3, 2.5), (0.99, 1.0)])
def test_old_det_kd_matches_loops_over_locations_and_classes(thr: float, box_weight: float) -> None:
    (_, _, zs), (_, _, zt) = dense_pair()
    got = old_det_kd_loss(zs, zt, BINS, thr, box_weight)
    assert float(got) == pytest.approx(old_det_kd_loop(zs, zt, thr, box_weight), rel=1e-10)


def features_at(levels: list[torch.Tensor], b: int, i: int) -> list[float]:
    """The feature at dense location ``i`` of image ``b``: levels in order, each row-major."""
    for level in levels:
        h, w = level.shape[2:]
        if i < h * w:
            return level[b, :, i // w, i % w].tolist()
        i -= h * w
    raise IndexError(i)


def iod_loops(student: list[torch.Tensor], teacher: list[torch.Tensor], thr: float) -> dict[str, float]:
    zs, zt = student[-1], teacher[-1]
    by_class: dict[int, list[tuple[int, int]]] = {}
    for b, i, c in instances(zt, thr):
        by_class.setdefault(c, []).append((b, i))
    if not by_class:
        return dict.fromkeys(("within_semantic", "within_feature", "between_semantic", "between_feature"), 0.0)
    ws = wf = 0.0
    proto: dict[str, dict[int, list[float]]] = {"ps": {}, "pt": {}, "ms": {}, "mt": {}}
    for c, members in by_class.items():
        n = len(members)
        ws += sum(bkl(float(zs[b, i, k]), float(zt[b, i, k])) for b, i in members for k in range(KO)) / n
        hs = [features_at(student[:-1], b, i) for b, i in members]
        ht = [features_at(teacher[:-1], b, i) for b, i in members]
        wf += sum(sum((x - y) ** 2 for x, y in zip(a, t, strict=True)) / C for a, t in zip(hs, ht, strict=True)) / n
        proto["ps"][c] = [sum(sig(float(zs[b, i, k])) for b, i in members) / n for k in range(KO)]
        proto["pt"][c] = [sum(sig(float(zt[b, i, k])) for b, i in members) / n for k in range(KO)]
        for key, rows in (("ms", hs), ("mt", ht)):
            mean = [sum(r[d] for r in rows) / n for d in range(C)]
            norm = math.sqrt(sum(v * v for v in mean))
            proto[key][c] = [v / norm for v in mean]

    def gap(s: dict[int, list[float]], t: dict[int, list[float]]) -> float:
        cs = sorted(s)
        pairs = [(a, b) for x, a in enumerate(cs) for b in cs[x + 1:]]
        if not pairs:
            return 0.0
        d = [(sum((u - v) ** 2 for u, v in zip(s[a], s[b], strict=True))
              - sum((u - v) ** 2 for u, v in zip(t[a], t[b], strict=True))) ** 2 for a, b in pairs]
        return sum(d) / len(pairs)

    q = len(by_class)
    return {"within_semantic": ws / q, "within_feature": wf / q, "between_semantic": gap(proto["ps"], proto["pt"]),
            "between_feature": gap(proto["ms"], proto["mt"])}


@pytest.mark.parametrize("thr", [0.5, 0.3])
@pytest.mark.parametrize("seed", [0, 1])
def test_each_iod_term_matches_loops_over_the_old_models_detections(thr: float, seed: int) -> None:
    s, t = dense_pair(seed)
    assert len({c for _, _, c in instances(t[-1], thr)}) >= 2  # the example has several classes
    got = iod_terms(dense_features(s[:-1]), dense_features(t[:-1]), s[-1], t[-1], BINS, thr)
    want = iod_loops(s, t, thr)
    for name, value in want.items():
        assert float(got[name]) == pytest.approx(value, rel=1e-10), name
        assert value > 0


def test_the_iod_loss_is_the_weighted_sum_of_its_terms() -> None:
    s, t = dense_pair()
    weights = {"within_semantic": 0.5, "within_feature": 2.0, "between_semantic": 3.0, "between_feature": 0.25}
    want = iod_loops(s, t, 0.5)
    got = IODLoss(bins=BINS, **weights)(s, t, torch.zeros(2, 1, 5))
    assert float(got) == pytest.approx(sum(weights[k] * want[k] for k in want), rel=1e-10)


# -- properties --------------------------------------------------------------------------------------------------
def agreeing_student(teacher: list[torch.Tensor], seed: int = 3) -> list[torch.Tensor]:
    """A student equal to the teacher on the old classes, features, boxes and centerness; random new classes."""
    zt = teacher[-1]
    new = torch.randn(*zt.shape[:2], KN - KO, generator=torch.Generator().manual_seed(seed), dtype=F64) * 5
    return [f.clone() for f in teacher[:-1]] + [torch.cat([zt[..., :KO], new, zt[..., KO:]], -1)]


def test_both_losses_are_zero_when_the_student_keeps_the_old_model_and_ignore_the_new_classes() -> None:
    s, t = dense_pair()
    same = agreeing_student(t)
    assert float(old_det_kd_loss(same[-1], t[-1], BINS)) == pytest.approx(0.0, abs=1e-12)
    assert float(IODLoss(bins=BINS)(same, t, torch.zeros(2))) == pytest.approx(0.0, abs=1e-12)
    other = [f.clone() for f in s[:-1]] + [torch.cat([s[-1][..., :KO], -s[-1][..., KO:KN], s[-1][..., KN:]], -1)]
    assert float(old_det_kd_loss(other[-1], t[-1], BINS)) == float(old_det_kd_loss(s[-1], t[-1], BINS))
    assert float(IODLoss(bins=BINS)(other, t, torch.zeros(2))) == float(IODLoss(bins=BINS)(s, t, torch.zeros(2)))


def test_the_between_feature_term_reads_directions_only_and_between_terms_need_two_classes() -> None:
    s, t = dense_pair()
    base = iod_terms(dense_features(s[:-1]), dense_features(t[:-1]), s[-1], t[-1], BINS)
    scaled = iod_terms(dense_features([3.0 * f for f in s[:-1]]), dense_features(t[:-1]), s[-1], t[-1], BINS)
    assert float(scaled["between_feature"]) == pytest.approx(float(base["between_feature"]), rel=1e-10)
    assert float(scaled["within_feature"]) > float(base["within_feature"])
    one = t[-1].clone()
    one[..., 1:KO] = -20.0  # the old model sees class 0 only
    single = iod_terms(dense_features(s[:-1]), dense_features(t[:-1]), s[-1], one, BINS)
    assert float(single["between_semantic"]) == 0.0 and float(single["between_feature"]) == 0.0
    assert float(single["within_semantic"]) > 0


def test_no_detection_of_the_old_model_gives_zero_terms_and_normalises_the_response_by_one() -> None:
    s, t = dense_pair()
    quiet = t[-1].clone()
    quiet[..., :KO] = -30.0
    assert all(float(v) == 0.0 for v in iod_terms(dense_features(s[:-1]), dense_features(t[:-1]), s[-1], quiet,
                                                   BINS).values())
    want = old_det_kd_loop(s[-1], quiet, 0.5, 1.0)  # no detection: class KL summed, no box term
    assert float(old_det_kd_loss(s[-1], quiet, BINS)) == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("dtype", [F64, torch.float16, torch.bfloat16])
def test_both_losses_keep_float64_upcast_half_and_have_finite_gradients_on_extreme_inputs(dtype: torch.dtype) -> None:
    s, t = dense_pair()
    s = [(x * 1e3).to(dtype).requires_grad_() for x in s]
    t = [(x * 1e3).to(dtype) for x in t]
    for out in (IODLoss(bins=BINS)(s, t, torch.zeros(2)), OldDetKDLoss(bins=BINS)(s[-1], t[-1], torch.zeros(2))):
        assert out.dtype == (F64 if dtype == F64 else torch.float32)
        grads = torch.autograd.grad(out, s, allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads)
        assert math.isfinite(float(out.detach()))


def test_the_losses_refuse_taps_that_are_not_their_layout() -> None:
    iod = IODLoss(bins=BINS)
    assert iod.check_shapes([(C, 3, 3), (C, 2, 2), (13, KN + R)], [(C, 3, 3), (C, 2, 2), (13, KO + R)]) is None
    assert "iod needs" in iod.check_shapes([(C, 3, 3), (13, KN + R)], [(C, 3, 3), (13, KO + R)])  # L is not 9
    assert "iod needs" in iod.check_shapes([(13, KN + R)], [(13, KO + R)])  # no feature level
    assert "iod needs" in iod.check_shapes([(C, 3, 3), (9, KO + R)], [(C, 3, 3), (9, KN + R)])  # old > new
    assert "iod needs" in IODLoss(bins=8).check_shapes([(C, 3, 3), (9, KN + R)], [(C, 3, 3), (9, KO + R)])
    assert "old_det_kd needs" in OldDetKDLoss(bins=8).check_shapes((9, KN + R), (9, KO + R))
    assert OldDetKDLoss(bins=BINS).check_shapes((9, KN + R), (9, KO + R)) is None


# -- refusals before training ------------------------------------------------------------------------------------
@pytest.fixture
def det_steps(tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A tiny step-2 IOD recipe on ``boxes4`` (2 + 2 classes)."""
    monkeypatch.setitem(DATASETS._entries, "boxes4", boxes4)
    arch = {"arch": "det_student", "params": {"width": 4, "fpn_width": 8, "box_bins": 8}}
    two = copy.deepcopy(tiny)
    two.update(task="detection", model={**arch, "init": "teacher"},
               teacher={**copy.deepcopy(arch), "classes": 2, "checkpoint": str(tmp_path / "t.safetensors")},
               data={"dataset": "boxes4", "setting": {"name": "class_incremental", "step": 2, "base": 2}},
               distill=[{"loss": "old_det_kd"}, {"loss": "iod", "student": ["p2", "p3", "p4", "logits"],
                                                 "teacher": ["p2", "p3", "p4", "logits"]}])
    two["train"]["batch_size"] = 2
    two["output"]["dir"] = str(tmp_path / "step2")
    return two


@pytest.mark.parametrize(("change", "message"), [
    ({"teacher": None, "model.init": "fresh", "distill": None}, "continues a model of 2 classes, but the recipe has "
                                                                "no teacher"),
    ({"teacher.classes": 3}, "teacher.classes 3"),
    ({"data.setting.base": 4}, "base 4"),
    ({"data.setting.step": 3}, "step must be one of 1, 2 (got 3)"),
    ({"model.params.width": 8}, "model.init 'teacher' needs the teacher's arch and params"),
    ({"distill.0.bins": 20}, "old_det_kd needs dense detector outputs"),
    ({"distill.1.student": ["p2", "p3", "logits"], "distill.1.teacher": ["p2", "p3", "logits"]}, "iod needs"),
])
def test_step_2_detection_recipes_that_cannot_work_exit_2_before_training(det_steps: dict, change: dict,
                                                                           message: str, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import edit_recipe

    old = build_model("det_student", num_classes=2, in_channels=1, image_size=16,
                      params={"width": 4, "fpn_width": 8, "box_bins": 8})
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(tmp_path / "t.safetensors"))
    two = edit_recipe(det_steps, change)
    two = {k: v for k, v in two.items() if v is not None}
    assert main(["run", str(write_recipe(tmp_path / "bad.yaml", two))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "step2" / "checkpoints").exists()


# -- end to end ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_shipped_iod_recipe_grows_the_old_detector_and_reports_old_and_new_map(tmp_path: Path) -> None:
    from conftest import edit_recipe
    from kdkit.data.idx import FASHION_MNIST_ROOT

    if not Path(FASHION_MNIST_ROOT).is_dir():
        pytest.skip("the Fashion-MNIST files are not installed")
    params = {"box_bins": 8, "width": 4, "fpn_width": 8}
    torch.manual_seed(0)
    old = build_model("det_teacher", num_classes=5, in_channels=1, image_size=48, params=params)
    torch.nn.init.zeros_(old.head.cls_logits.bias)  # an old model that detects something everywhere
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(tmp_path / "t.safetensors"))
    recipe = edit_recipe(shipped_on_tiny_scenes("scenes_det_incremental/iod", tmp_path), {
        "model.params": params, "teacher.params": params, "train.epochs": 1, "train.batch_size": 16})
    assert main(["run", str(write_recipe(tmp_path / "iod.yaml", recipe))]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    row = json.loads((tmp_path / "run" / "metrics.json").read_text())[-1]
    assert row["train_iod"] > 0 and row["train_old_det_kd"] > 0
    assert all(math.isfinite(summary[f"last_{m}"]) for m in ("map", "map_old", "map_new"))
