"""CTCL: HFD, region- and pixel-wise BSD against independent float64 computations, what each term trains, the timm
ViT segmenter, the refusals, and a tiny CNN + ViT run end to end that reports both networks and resumes exactly."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from conftest import edit_recipe, straight_and_resumed, write_recipe
from kdkit.cli import main
from kdkit.data import DATASETS
from kdkit.data.base import UNLABELLED
from kdkit.methods.ctcl import (
    CtclMethod,
    HfdLoss,
    PixelBsdLoss,
    RegionBsdLoss,
    hfd_loss,
    is_vit,
    mimic_map,
    pixel_bsd_loss,
    pixel_teachers,
    region_bsd_loss,
    region_teachers,
)
from kdkit.models import build_model
from test_segmentation import squares

F64 = torch.float64


def conv1x1(cin: int, cout: int, seed: int) -> nn.Conv2d:
    """A float64 1x1 convolution with seeded weights."""
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, 1).double()


def pool_np(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """``(C, H, W)`` averaged over equal blocks to ``(C, h, w)`` (sizes divide), written out."""
    c, hh, ww = x.shape
    sh, sw = hh // h, ww // w
    out = np.zeros((c, h, w))
    for i in range(h):
        for j in range(w):
            out[:, i, j] = x[:, i * sh:(i + 1) * sh, j * sw:(j + 1) * sw].mean(axis=(1, 2))
    return out


def mimic_np(student: np.ndarray, target: np.ndarray, conv: nn.Conv2d, normalize: bool) -> np.ndarray:
    """``(h, w)`` per-position mean squared distance of the projected, pooled student to the pooled target."""
    h, w = min(student.shape[1], target.shape[1]), min(student.shape[2], target.shape[2])
    s, t = pool_np(student, h, w), pool_np(target, h, w)
    weight, bias = conv.weight.detach().numpy()[:, :, 0, 0], conv.bias.detach().numpy()
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            p, q = weight @ s[:, i, j] + bias, t[:, i, j].copy()
            if normalize:
                p, q = p / np.linalg.norm(p), q / np.linalg.norm(q)
            out[i, j] = ((p - q) ** 2).mean()
    return out


def ce_np(logits: np.ndarray, y: int) -> float:
    """One pixel's cross-entropy, written out."""
    return math.log(sum(math.exp(v) for v in logits)) - logits[y]


def kl_np(student: np.ndarray, teacher: np.ndarray, t: float) -> float:
    """T^2 KL(softmax(teacher/T) || softmax(student/T)), written out."""
    zs, zt = sum(math.exp(v / t) for v in student), sum(math.exp(v / t) for v in teacher)
    total = 0.0
    for vs, vt in zip(student, teacher, strict=True):
        pt, ps = math.exp(vt / t) / zt, math.exp(vs / t) / zs
        total += pt * (math.log(pt) - math.log(ps))
    return t * t * total


def pixel_inputs(seed: int = 0, b: int = 2, k: int = 4, h: int = 4, w: int = 4) -> tuple[torch.Tensor, ...]:
    """Two float64 logit maps and labels with some unlabelled pixels."""
    gen = torch.Generator().manual_seed(seed)
    za, zb = (torch.randn(b, k, h, w, generator=gen, dtype=F64) * 2 for _ in range(2))
    y = torch.randint(0, k, (b, h, w), generator=gen)
    y[0, 0, :2] = UNLABELLED
    return za, zb, y


@pytest.mark.parametrize("normalize", [True, False])
def test_hfd_is_both_mimicking_distances_on_the_coarser_grid(normalize: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 8, 8, generator=gen, dtype=F64), torch.randn(2, 5, 4, 4, generator=gen, dtype=F64)
    ab, ba = conv1x1(3, 5, 0), conv1x1(5, 3, 1)
    got = hfd_loss(a, b, ab, ba, normalize)
    want = np.mean([mimic_np(a[n].numpy(), b[n].numpy(), ab, normalize).mean() for n in range(2)]) + \
        np.mean([mimic_np(b[n].numpy(), a[n].numpy(), ba, normalize).mean() for n in range(2)])
    assert got.dtype == F64 and got.item() == pytest.approx(want, rel=1e-10)


def test_region_bsd_lets_the_lower_cross_entropy_of_each_region_teach_its_features() -> None:
    za, zb, y = pixel_inputs(2, h=4, w=4)
    gen = torch.Generator().manual_seed(3)
    fa, fb = torch.randn(2, 3, 4, 4, generator=gen, dtype=F64), torch.randn(2, 2, 2, 2, generator=gen, dtype=F64)
    ab, ba = conv1x1(3, 2, 4), conv1x1(2, 3, 5)
    got = region_bsd_loss(fa, fb, za, zb, y, ab, ba, regions=2)
    total, taught = 0.0, [0, 0]
    for n in range(2):
        a_learns = mimic_np(fa[n].numpy(), fb[n].numpy(), ab, True)  # 2x2: one cell per region
        b_learns = mimic_np(fb[n].numpy(), fa[n].numpy(), ba, True)
        for r in range(2):
            for c in range(2):
                pixels = [(i, j) for i in range(2 * r, 2 * r + 2) for j in range(2 * c, 2 * c + 2)
                          if int(y[n, i, j]) != UNLABELLED]
                ce_a = np.mean([ce_np(za[n, :, i, j].tolist(), int(y[n, i, j])) for i, j in pixels])
                ce_b = np.mean([ce_np(zb[n, :, i, j].tolist(), int(y[n, i, j])) for i, j in pixels])
                total += a_learns[r, c] if ce_b < ce_a else b_learns[r, c]
                taught[0 if ce_a < ce_b else 1] += 1
    assert got.item() == pytest.approx(total / 8, rel=1e-10)
    a_mask, b_mask = region_teachers(za, zb, y, 2)
    assert [int(a_mask.sum()), int(b_mask.sum())] == taught and 0 < taught[0] < 8  # both directions occur


@pytest.mark.parametrize("rule", ["lower_ce", "correct"])
def test_pixel_bsd_lets_the_lower_cross_entropy_of_each_pixel_teach_its_distribution(rule: str) -> None:
    za, zb, y = pixel_inputs(4)
    t = 2.0
    got = pixel_bsd_loss(za, zb, y, t, rule)
    total, labelled, directions = 0.0, 0, set()
    for n, i, j in np.ndindex(2, 4, 4):
        label = int(y[n, i, j])
        if label == UNLABELLED:
            continue
        labelled += 1
        a, b = za[n, :, i, j].tolist(), zb[n, :, i, j].tolist()
        teacher, student = (a, b) if ce_np(a, label) < ce_np(b, label) else (b, a)
        if rule == "correct" and int(np.argmax(teacher)) != label:
            continue
        directions.add(teacher is a)
        total += kl_np(student, teacher, t)
    assert got.item() == pytest.approx(total / labelled, rel=1e-10)
    assert directions == {True, False}


def test_the_correct_rule_keeps_only_pixels_the_teacher_gets_right() -> None:
    za, zb, y = pixel_inputs(5)
    loose, strict = pixel_teachers(za, zb, y, "lower_ce"), pixel_teachers(za, zb, y, "correct")
    for wide, narrow, z in zip(loose, strict, (za, zb), strict=True):
        assert torch.equal(narrow, wide & (z.argmax(1) == y)) and narrow.sum() < wide.sum()


def test_identical_networks_transfer_nothing() -> None:
    za, _, y = pixel_inputs(6)
    f = torch.randn(2, 3, 4, 4, dtype=F64)
    same = nn.Identity()
    assert hfd_loss(f, f.clone(), same, same).item() == 0.0
    assert region_bsd_loss(f, f.clone(), za, za.clone(), y, same, same, 2).item() == 0.0  # a tie everywhere
    assert pixel_bsd_loss(za, za.clone(), y).item() == 0.0


def test_each_network_learns_only_where_the_other_teaches() -> None:
    za, zb, y = pixel_inputs(7)
    za.requires_grad_(True)
    zb.requires_grad_(True)
    pixel_bsd_loss(za, zb, y).backward()
    a_teaches, b_teaches = pixel_teachers(za, zb, y)
    moved_a, moved_b = za.grad.abs().sum(1) > 0, zb.grad.abs().sum(1) > 0
    assert torch.equal(moved_a, b_teaches) and torch.equal(moved_b, a_teaches)


def test_hfd_trains_both_networks_and_projections_and_each_network_only_through_its_own_mimicking() -> None:
    loss = HfdLoss()
    loss.setup([(3, 8, 8), (5, 4, 4)], None, 10)
    a, b = torch.randn(2, 3, 8, 8, requires_grad=True), torch.randn(2, 5, 4, 4, requires_grad=True)
    loss([a, b], None, torch.zeros(2, 8, 8, dtype=torch.long)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())
    both = a.grad.clone()
    a.grad = None
    mimic_map(a, b, loss.a_to_b, True).mean().backward()  # a mimicking b alone: b's mimicking of a adds nothing
    assert torch.allclose(both, a.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss_cls", [HfdLoss, RegionBsdLoss, PixelBsdLoss])
def test_precision_float64_stays_half_upcasts_and_extreme_logits_give_finite_gradients(loss_cls: type) -> None:
    student, _, labels, _ = loss_cls.example_inputs(3, torch.Generator().manual_seed(0))
    loss = loss_cls()
    loss.setup([tuple(s.shape[1:]) for s in student], None, 3)
    assert loss([s.double() for s in student], None, labels).dtype == F64
    assert loss([s.half() for s in student], None, labels).dtype == torch.float32
    extreme = [(s * 1e4).requires_grad_(True) for s in student]
    loss(extreme, None, labels).backward()
    grads = [s.grad for s in extreme if s.grad is not None]  # region_bsd's logits only choose: no gradient
    assert len(grads) == (2 if loss_cls is RegionBsdLoss else len(extreme))
    assert all(torch.isfinite(g).all() for g in grads)


def test_the_bsd_terms_count_who_taught() -> None:
    za, zb, y = pixel_inputs(8)
    loss = PixelBsdLoss()
    loss([za, zb], None, y)
    a, b = pixel_teachers(za, zb, y)
    assert loss.taught.tolist() == [int(a.sum()), int(b.sum())]
    region = RegionBsdLoss(regions=2)
    region.setup([(3, 4, 4), (3, 4, 4), (4, 4, 4), (4, 4, 4)], None, 2)
    region([torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), za.float(), zb.float()], None, y)
    ra, rb = region_teachers(za, zb, y, 2)
    assert region.taught.tolist() == [int(ra.sum()), int(rb.sum())]


@pytest.mark.slow  # importing timm takes seconds
def test_the_vit_segmenter_is_a_timm_vision_transformer_with_low_and_high_taps() -> None:
    from timm.models.vision_transformer import VisionTransformer

    model = build_model("vit_seg_student", num_classes=11, in_channels=1, image_size=48)
    assert isinstance(model.vit, VisionTransformer) and len(model.vit.blocks) == 2
    seen = {}
    for name in ("low", "high"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.shape))
    assert model(torch.randn(2, 1, 48, 48)).shape == (2, 11, 48, 48)
    assert seen == {"low": (2, 32, 12, 12), "high": (2, 16, 48, 48)} and model.feature_taps == {"low": "low",
                                                                                                 "high": "high"}
    assert is_vit("vit_seg_student") and is_vit("timm:deit_tiny_patch16_224") and not is_vit("segnet_student")


@pytest.mark.slow  # builds the timm ViT
def test_the_shipped_recipes_validate() -> None:
    assert main(["validate", "recipes/scenes_seg/ctcl.yaml"]) == 0
    assert main(["validate", "recipes/scenes_seg/dml_cnn_vit.yaml"]) == 0


@pytest.fixture
def pair(tiny: dict, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The tiny recipe on 16x16 ``squares`` scenes with a CNN (``model``) and a ViT (``vit``) under CTCL's terms."""
    monkeypatch.setitem(DATASETS._entries, "squares", squares)
    recipe = copy.deepcopy(tiny)
    recipe["task"] = "segmentation"
    recipe["model"] = {"arch": "segnet_student", "params": {"width": 4}}
    recipe["peers"] = {"vit": {"arch": "vit_seg_student", "params": {"embed_dim": 8, "decoder_width": 4}}}
    recipe["data"] = {"dataset": "squares"}
    recipe["train"]["batch_size"] = 16
    recipe["distill"] = [
        {"loss": "hfd", "student": ["model.stage1", "vit.low"]},
        {"loss": "region_bsd", "student": ["model.decoder1", "vit.high", "model.logits", "vit.logits"], "regions": 2},
        {"loss": "pixel_bsd", "student": ["model.logits", "vit.logits"]},
    ]
    return recipe


@pytest.mark.parametrize(("change", "message"), [
    ({"task": "classification", "data": {"dataset": "squares"}}, "task is 'classification' (choices: segmentation)"),
    ({"peers": None, "distill.1.student": ["model.decoder1", "model.stage2", "model.logits", "model.logits"]},
     "`peers:` is None"),
    ({"peers.vit.arch": "segnet_student", "peers.vit.params": {"width": 4}}, "vit: segnet_student (CNN)"),
    ({"model": {"arch": "vit_seg_student"}}, "model: vit_seg_student (ViT), vit: vit_seg_student (ViT)"),
    ({"distill.0.student": None}, "hfd reads 2 taps"),
    ({"distill.2.student": "model.logits"}, "pixel_bsd reads 2 taps"),
    ({"distill.1.student": ["model.decoder1", "vit.high", "model.decoder1", "vit.logits"]},
     "reads the networks' per-pixel logits there"),
    ({"distill.2.student": ["model.logits", "ghost.logits"]}, "'ghost', which is not a trained network"),
    ({"distill.2.teacher": "vit.logits"}, "remove `teacher:` from the term"),
    ({"distill.0.student": ["model.stage1", "vit.nope"]}, "nope"),
    ({"distill.2.rule": "vote"}, "rule"),
    ({"distill.1.regions": 0}, "regions"),
    ({"data.setting": {"name": "semi_supervised", "labelled": 50}}, "label"),
])
def test_recipes_ctcl_cannot_work_with_are_refused_before_training(change: dict, message: str, pair: dict,
                                                                    tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    recipe = edit_recipe(pair, change)
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert message in capsys.readouterr().err
    assert not (Path(recipe["output"]["dir"]) / "checkpoints").exists()  # refused before training


@pytest.mark.slow
def test_a_tiny_cnn_vit_run_reports_both_networks_and_resumes_exactly(pair: dict, tmp_path: Path) -> None:
    pair["train"]["epochs"] = 2
    straight, broken = straight_and_resumed(pair, tmp_path, 9)  # 6 steps an epoch: mid-epoch 2
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight, broken))
    keys = ("train_loss", "train_hfd", "train_region_bsd", "train_pixel_bsd", "train_ce@vit", "test_miou")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (straight, broken))
    assert sa["ctcl"] == sb["ctcl"] and sa["peers"] == sb["peers"]  # counters and projections are checkpointed
    assert sum(sa["ctcl"]["pixel_bsd"]["taught"].values()) > 0 and set(sa["ctcl"]["region_bsd"]["taught"]) == {
        "model", "vit"}
    assert sa["peers"]["model"]["miou"] == pytest.approx(sa["last_miou"])  # the deployed CNN's last evaluation
    assert set(sa["peers"]) == {"model", "vit"} and sa["loss_params"] > 0  # the projections


def test_the_report_says_who_taught_how_much() -> None:
    summary = {"ctcl": {"pixel_bsd": {"taught": {"model": 1, "vit": 3}, "unit": "pixels"}}}
    text = CtclMethod().report_section("run", summary, Path("runs/x"))
    assert "pixel_bsd: teacher of the pixels with one: model 25.0 %, vit 75.0 %" in text
    assert CtclMethod().report_section("run", {}, Path("runs/x")) == ""
