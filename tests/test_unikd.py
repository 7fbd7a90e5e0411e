"""UniKD: the deformable attention, the knowledge loss and the AKE's set loss against independent float64 computations,
the teacher's decoded detections, what each phase trains, the refusals, and a tiny run end to end that resumes
exactly after the AKE's pretraining."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import edit_recipe, shipped_on_tiny_scenes, straight_and_resumed, tiny_det, write_recipe
from kdkit.cli import main
from kdkit.methods.unikd import (
    AdaptiveKnowledgeExtractor,
    DeformableAttention,
    Knowledge,
    UniKDLoss,
    deformable_sample,
    knowledge_loss,
    set_loss,
    teacher_detections,
)
from kdkit.methods.unikd.pretrain import pretrain
from kdkit.models.detector import DenseSpec

F64 = torch.float64


# -- independent references ------------------------------------------------------------------------------------------

def bilinear(plane: list[list[float]], x: float, y: float) -> float:
    """Bilinear value of ``plane`` (H rows of W values) at normalised ``(x, y)``: cell ``(i, j)``'s centre is at
    ``((j + 0.5) / W, (i + 0.5) / H)``, and positions outside the map read 0."""
    h, w = len(plane), len(plane[0])
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    total = 0.0
    for dy, dx in itertools.product((0, 1), (0, 1)):
        i, j = y0 + dy, x0 + dx
        weight = (1 - abs(px - j)) * (1 - abs(py - i))
        if 0 <= i < h and 0 <= j < w:
            total += weight * plane[i][j]
    return total


def sample_loop(values: list[torch.Tensor], locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """:func:`deformable_sample` written as loops over samples, queries, heads, levels, points and channels."""
    batch, queries, heads, levels, points, _ = locations.shape
    dim = values[0].shape[2]
    out = torch.zeros(batch, queries, heads * dim, dtype=F64)
    for b, n, h, c in itertools.product(range(batch), range(queries), range(heads), range(dim)):
        total = 0.0
        for lev, k in itertools.product(range(levels), range(points)):
            x, y = locations[b, n, h, lev, k].tolist()
            total += float(weights[b, n, h, lev, k].detach()) * bilinear(values[lev][b, h, c].tolist(), x, y)
        out[b, n, h * dim + c] = total
    return out


def giou_by_hand(a: list[float], b: list[float]) -> float:
    """Generalised IoU of two ``(cx, cy, w, h)`` boxes."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def focal_by_hand(logit: float, positive: bool) -> float:
    """Sigmoid focal loss (alpha 0.25, gamma 2) of one logit."""
    p = 1 / (1 + math.exp(-logit))
    return 0.25 * (1 - p) ** 2 * -math.log(p) if positive else 0.75 * p ** 2 * -math.log(1 - p)


def set_loss_by_hand(logits: torch.Tensor, boxes: torch.Tensor, labels: list[int], targets: list[list[float]]) -> float:
    """One image's set loss: every injective assignment of targets to queries is tried and the cheapest by the
    matching cost (2 focal + 5 L1 - 2 GIoU) kept; then 2 focal + 5 L1 + 2 (1 - GIoU), over the targets' count."""
    queries, classes = logits.shape
    lg, bx = logits.tolist(), boxes.tolist()

    def cost(q: int, t: int) -> float:
        cls = focal_by_hand(lg[q][labels[t]], True) - focal_by_hand(lg[q][labels[t]], False)
        l1 = sum(abs(u - v) for u, v in zip(bx[q], targets[t], strict=True))
        return 2 * cls + 5 * l1 - 2 * giou_by_hand(bx[q], targets[t])

    best = min(itertools.permutations(range(queries), len(labels)),
               key=lambda qs: sum(cost(q, t) for t, q in enumerate(qs)))
    positive = {(q, labels[t]) for t, q in enumerate(best)}
    focal = sum(focal_by_hand(lg[q][k], (q, k) in positive) for q in range(queries) for k in range(classes))
    l1 = sum(abs(u - v) for t, q in enumerate(best) for u, v in zip(bx[q], targets[t], strict=True))
    giou = sum(1 - giou_by_hand(bx[q], targets[t]) for t, q in enumerate(best))
    return (2 * focal + 5 * l1 + 2 * giou) / len(labels)


# -- deformable attention --------------------------------------------------------------------------------------------

def test_deformable_sample_equals_float64_loops_inside_and_outside_the_maps() -> None:
    torch.manual_seed(0)
    values = [torch.randn(2, 2, 3, 5, 4, dtype=F64), torch.randn(2, 2, 3, 3, 2, dtype=F64)]
    locations = torch.rand(2, 3, 2, 2, 3, 2, dtype=F64) * 1.4 - 0.2  # some points off the maps
    weights = torch.rand(2, 3, 2, 2, 3, dtype=F64)
    torch.testing.assert_close(deformable_sample(values, locations, weights), sample_loop(values, locations, weights),
                               rtol=1e-12, atol=1e-12)


def identity_attention(dim: int) -> DeformableAttention:
    """One level, one head, one point, zero offsets, identity projections, in float64."""
    attn = DeformableAttention(dim, levels=1, heads=1, points=1).double()
    with torch.no_grad():
        for lin in (attn.value_proj, attn.output_proj):
            lin.weight.copy_(torch.eye(dim, dtype=F64))
            lin.bias.zero_()
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.zero_()
    return attn


def test_with_zero_offsets_and_one_point_the_attention_is_bilinear_sampling_at_the_reference() -> None:
    torch.manual_seed(1)
    attn = identity_attention(3)
    feature = torch.randn(2, 3, 4, 6, dtype=F64)
    reference = torch.rand(2, 5, 2, dtype=F64)
    out = attn(torch.randn(2, 5, 3, dtype=F64), reference, [feature])
    expected = torch.tensor([[[bilinear(feature[b, c].tolist(), *reference[b, n].tolist()) for c in range(3)]
                              for n in range(5)] for b in range(2)], dtype=F64)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # at a cell centre the sample is that cell's value
    centre = torch.tensor([[[(2 + 0.5) / 6, (1 + 0.5) / 4]]], dtype=F64).expand(2, 1, 2)
    torch.testing.assert_close(attn(torch.zeros(2, 1, 3, dtype=F64), centre, [feature])[:, 0], feature[:, :, 1, 2])


def test_the_attention_module_equals_its_formula_written_out() -> None:
    """Offsets in cells of each level, softmax over every level and point of a head, projections: computed here from
    the module's weights with the float64 loop sampler."""
    torch.manual_seed(2)
    dim, heads, levels, points = 4, 2, 2, 3
    attn = DeformableAttention(dim, levels, heads, points).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    maps = [torch.randn(1, dim, 4, 6, dtype=F64), torch.randn(1, dim, 2, 3, dtype=F64)]
    query, reference = torch.randn(1, 2, dim, dtype=F64), torch.rand(1, 2, 2, dtype=F64)
    values = []
    for m in maps:
        v = m.flatten(2).transpose(1, 2) @ attn.value_proj.weight.T + attn.value_proj.bias  # (1, hw, dim)
        values.append(v.transpose(1, 2).reshape(1, heads, dim // heads, *m.shape[-2:]))
    raw = (query @ attn.sampling_offsets.weight.T + attn.sampling_offsets.bias).view(1, 2, heads, levels, points, 2)
    locations = raw.clone()
    for lev, m in enumerate(maps):
        locations[:, :, :, lev, :, 0] = reference[:, :, None, None, 0] + raw[:, :, :, lev, :, 0] / m.shape[-1]
        locations[:, :, :, lev, :, 1] = reference[:, :, None, None, 1] + raw[:, :, :, lev, :, 1] / m.shape[-2]
    logits = (query @ attn.attention_weights.weight.T + attn.attention_weights.bias).view(1, 2, heads, -1)
    weights = (logits.exp() / logits.exp().sum(-1, keepdim=True)).view(1, 2, heads, levels, points)
    expected = sample_loop(values, locations, weights) @ attn.output_proj.weight.T + attn.output_proj.bias
    torch.testing.assert_close(attn(query, reference, maps), expected, rtol=1e-10, atol=1e-12)


def test_the_initial_offsets_point_each_head_a_different_way() -> None:
    attn = DeformableAttention(8, levels=2, heads=4, points=2)
    ring = attn.sampling_offsets.bias.view(4, 2, 2, 2)
    assert torch.equal(ring[:, 0], ring[:, 1])  # the same ring on every level
    torch.testing.assert_close(ring[:, 0, 1], 2 * ring[:, 0, 0])  # the k-th point k + 1 cells out
    assert len({tuple(d.tolist()) for d in ring[:, 0, 0]}) == 4


# -- the knowledge loss ----------------------------------------------------------------------------------------------

def random_knowledge(seed: int, layers: int = 2, batch: int = 2, queries: int = 3, dim: int = 4) -> Knowledge:
    g = torch.Generator().manual_seed(seed)
    return Knowledge(torch.randn(layers, batch, queries, dim, generator=g, dtype=F64),
                     torch.randn(layers, batch, queries, dim, generator=g, dtype=F64),
                     torch.rand(layers, batch, queries, 4, generator=g, dtype=F64))


def test_knowledge_loss_equals_the_weighted_mean_squared_distances_over_the_layers() -> None:
    s, t = random_knowledge(0), random_knowledge(1)
    expected = 0.0
    for j in range(2):  # per layer, the mean over samples, queries and channels; then the mean over the layers
        c = sum((a - b) ** 2 for a, b in zip(s.content[j].flatten().tolist(), t.content[j].flatten().tolist(),
                                             strict=True)) / 24
        p = sum((a - b) ** 2 for a, b in zip(s.position[j].flatten().tolist(), t.position[j].flatten().tolist(),
                                             strict=True)) / 24
        expected += (0.7 * c + 1.3 * p) / 2
    assert knowledge_loss(s, t, 0.7, 1.3).item() == pytest.approx(expected, rel=1e-12)
    assert knowledge_loss(s, t, 0.0, 1.0).item() < knowledge_loss(s, t, 1.0, 1.0).item()


def built_loss(student_widths: tuple[int, ...] = (4, 4), teacher_widths: tuple[int, ...] = (8, 8),
               **params: float) -> UniKDLoss:
    torch.manual_seed(0)
    loss = UniKDLoss(queries=5, layers=2, dim=8, heads=2, points=2, **params)
    loss.setup([(c, 8 >> i, 8 >> i) for i, c in enumerate(student_widths)],
               [(c, 8 >> i, 8 >> i) for i, c in enumerate(teacher_widths)], num_samples=10)
    return loss


def maps(widths: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(2, c, 8 >> i, 8 >> i, generator=g)).to(dtype) for i, c in enumerate(widths)]


def test_identical_features_of_equal_widths_give_zero_and_different_ones_do_not() -> None:
    loss = built_loss((8, 8), (8, 8))
    assert all(isinstance(a, nn.Identity) for a in loss.adapters)
    same = maps((8, 8), 0)
    assert loss.compute(same, [m.clone() for m in same], torch.zeros(2, 1, 5)).item() == 0.0
    assert loss.compute(same, maps((8, 8), 1), torch.zeros(2, 1, 5)).item() > 0.0


def test_the_loss_is_knowledge_loss_of_the_ake_on_the_adapted_student_and_the_teacher() -> None:
    loss = built_loss(content_weight=0.5, position_weight=2.0).double()
    student, teacher = maps((4, 4), 0, F64), maps((8, 8), 1, F64)
    ake = loss.ake
    assert ake is not None
    expected = knowledge_loss(ake([a(s) for a, s in zip(loss.adapters, student, strict=True)]), ake(teacher), 0.5, 2.0)
    torch.testing.assert_close(loss.compute(student, teacher, torch.zeros(2, 1, 5)), expected, rtol=1e-12, atol=0)


def test_the_student_and_adapters_get_gradients_and_the_frozen_ake_none() -> None:
    loss = built_loss()
    student = [m.requires_grad_(True) for m in maps((4, 4), 0)]
    loss.compute(student, maps((8, 8), 1), torch.zeros(2, 1, 5)).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert all(p.grad is not None for p in loss.adapters.parameters())
    assert loss.ake is not None and all(p.grad is None for p in loss.ake.parameters())


@pytest.mark.parametrize("scale", [1e-6, 1e4])
def test_gradients_are_finite_on_extreme_maps(scale: float) -> None:
    loss = built_loss()
    student = [m.requires_grad_(True) for m in maps((4, 4), 0, scale=scale)]
    value = loss.compute(student, maps((8, 8), 1, scale=scale), torch.zeros(2, 1, 5))
    value.backward()
    assert torch.isfinite(value) and all(torch.isfinite(s.grad).all() for s in student)


def test_float64_stays_float64_and_half_is_upcast() -> None:
    loss = built_loss()
    labels = torch.zeros(2, 1, 5)
    assert loss.compute(maps((4, 4), 0, F64), maps((8, 8), 1, F64), labels).dtype == F64
    assert loss.compute(maps((4, 4), 0, torch.bfloat16), maps((8, 8), 1, torch.bfloat16), labels).dtype == \
        torch.float32


def test_shapes_it_cannot_read_are_refused() -> None:
    loss = UniKDLoss()
    assert "2 student taps, 3 teacher taps" in loss.check_shapes([(4, 8, 8)] * 2, [(8, 8, 8)] * 3)
    assert "(C, H, W) feature maps" in loss.check_shapes([(10,)], [(10,)])
    assert loss.check_shapes([(4, 8, 8), (4, 4, 4)], [(8, 6, 6), (8, 3, 3)]) is None  # sizes and widths may differ


# -- the AKE and its pretraining ------------------------------------------------------------------------------------

def test_the_ake_reads_levels_of_any_size_and_refines_boxes_inside_the_image() -> None:
    torch.manual_seed(0)
    ake = AdaptiveKnowledgeExtractor([3, 5], dim=8, queries=4, layers=3, heads=2, points=2)
    out = ake([torch.randn(2, 3, 7, 5), torch.randn(2, 5, 2, 3)])
    assert out.content.shape == out.position.shape == (3, 2, 4, 8) and out.boxes.shape == (3, 2, 4, 4)
    assert bool(((out.boxes > 0) & (out.boxes < 1)).all())
    torch.testing.assert_close(out.position, ake.position(out.boxes))  # positions embed the refined boxes


def test_set_loss_equals_the_cheapest_assignment_written_out() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, generator=g, dtype=F64)
    boxes = 0.2 + 0.6 * torch.rand(2, 4, 4, generator=g, dtype=F64)
    boxes[..., 2:] *= 0.5
    targets = [(torch.tensor([2, 0]), torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]], dtype=F64)),
               (torch.tensor([1]), torch.tensor([[0.5, 0.5, 0.4, 0.4]], dtype=F64))]
    expected = sum(set_loss_by_hand(logits[b], boxes[b], labels.tolist(), target.tolist()) * len(labels)
                   for b, (labels, target) in enumerate(targets)) / 3  # summed over images, over all targets
    assert set_loss(logits, boxes, targets).item() == pytest.approx(expected, rel=1e-10)


def test_an_image_without_targets_only_pushes_every_class_down() -> None:
    logits = torch.tensor([[[0.5, -1.0]]], dtype=F64)
    expected = 2 * (focal_by_hand(0.5, False) + focal_by_hand(-1.0, False))  # over max(0 targets, 1)
    empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0, 4, dtype=F64))
    assert set_loss(logits, torch.full((1, 1, 4), 0.5, dtype=F64), [empty]).item() == pytest.approx(expected)


def dense_with_one_box(spec: DenseSpec, image_size: int, logit: float) -> torch.Tensor:
    """Dense outputs where one location of the finest level predicts class 1 and 3 px distances, all else nothing."""
    side = spec.grid_sizes(image_size)
    dense = torch.full((1, sum(s * s for s in side), spec.channels), -10.0)
    dense[..., spec.num_classes:spec.num_classes + 4] = 0.0
    at = 2 * side[0] + 2  # row 2, column 2 of the stride-4 level: centre (10, 10)
    dense[0, at, 1] = logit
    dense[0, at, spec.num_classes:spec.num_classes + 4] = math.log(3.0 / 4)  # exp coding: exp(raw) * stride
    dense[0, at, -1] = 10.0
    return dense


def test_teacher_detections_decode_the_confident_boxes_normalised_as_cxcywh() -> None:
    spec = DenseSpec(3, (4, 8), ((0, 8), (8, math.inf)))
    (labels, boxes), = teacher_detections(spec, dense_with_one_box(spec, 16, 5.0), 16, 0.3, limit=5)
    assert labels.tolist() == [1]
    torch.testing.assert_close(boxes, torch.tensor([[10 / 16, 10 / 16, 6 / 16, 6 / 16]]))
    (labels, _), = teacher_detections(spec, dense_with_one_box(spec, 16, -3.0), 16, 0.3, limit=5)
    assert labels.numel() == 0  # sqrt(sigmoid(-3) * 1) = 0.21 < 0.3


def test_pretraining_fits_the_teacher_detections_and_leaves_the_ake_frozen() -> None:
    torch.manual_seed(0)
    ake = AdaptiveKnowledgeExtractor([4], dim=8, queries=3, layers=1, heads=2, points=2)
    ake.requires_grad_(False)
    head = nn.Linear(8, 2)
    features = [torch.randn(2, 4, 6, 6)]
    targets = [(torch.tensor([1]), torch.tensor([[0.3, 0.3, 0.2, 0.2]])),
               (torch.tensor([0]), torch.tensor([[0.7, 0.6, 0.3, 0.4]]))]

    def batches():  # the same batch, 20 times
        return iter([(features, targets)] * 20)

    stats = pretrain(ake, head, batches, steps=20, lr=2e-2, reduce_grads=lambda grads: None)
    assert stats["steps"] == 20 and stats["targets_per_image"] == 1.0
    assert stats["loss_last"] < 0.5 * stats["loss_first"]
    assert not any(p.requires_grad for p in ake.parameters())
    assert all(p.grad is None for p in [*ake.parameters(), *head.parameters()])


# -- recipes ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "message"), [
    ({"unikd": None}, "add the section `unikd: {}`"),
    ({"distill.1": {"loss": "unikd", "student": ["p2", "p3"], "teacher": ["p2", "p3"]}}, "a second `unikd` term"),
    ({"distill.0.student": ["p2", "p9", "p4"]}, "p9"),
    ({"distill.0.student": ["p2", "p3"]}, "2 student tap(s)"),
    ({"distill.0.dim": 30}, "dim 30 is not a multiple of heads 4"),
    ({"unikd.pretrain_epochs": 0}, "pretrain_epochs"),
    ({"unikd.score_threshold": 1.0}, "score_threshold"),
])
def test_unikd_recipes_it_cannot_work_with_exit_2_before_training(change: dict, message: str, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    recipe = edit_recipe(shipped_on_tiny_scenes("scenes_det/unikd", tmp_path), change)
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_unikd_without_its_term_or_on_classification_exits_2(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    recipe = edit_recipe(shipped_on_tiny_scenes("scenes_det/unikd", tmp_path),
                         {"distill.0": {"loss": "mse", "student": "logits", "teacher": "logits"}})
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert "the recipe has none" in capsys.readouterr().err
    recipe = {"model": {"arch": "cnn_student"}, "data": {"dataset": "fashion_mnist", "subset": 100},
              "teacher": {"arch": "cnn_teacher", "checkpoint": str(tmp_path / "t.safetensors")},
              "distill": [{"loss": "unikd", "student": ["stage2", "stage3"], "teacher": ["stage2", "stage3"]}],
              "unikd": {}, "train": {"epochs": 1}, "output": {"dir": str(tmp_path / "run")}}
    assert main(["validate", str(write_recipe(tmp_path / "c.yaml", recipe))]) == 2
    assert "(choices: detection)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_teacher_that_is_no_dense_detector_is_refused_naming_the_detectors() -> None:
    from types import SimpleNamespace

    from kdkit.errors import KdkitError
    from kdkit.methods.unikd.method import teacher_spec

    with pytest.raises(KdkitError, match="must be a dense detector") as info:
        teacher_spec(SimpleNamespace(teacher=SimpleNamespace(model=nn.Linear(2, 2))))
    assert info.value.where == "teacher.arch" and "tv_fcos" in str(info.value)
    spec = DenseSpec(3, (4,), ((0, math.inf),))
    assert teacher_spec(SimpleNamespace(teacher=SimpleNamespace(model=SimpleNamespace(dense_spec=spec)))) is spec


@pytest.mark.slow
def test_the_shipped_unikd_recipe_pretrains_then_distils_and_resumes_exactly(tmp_path: Path) -> None:
    """The AKE is pretrained once, before the first step; a run interrupted after it resumes with the pretrained AKE
    from its checkpoint (a second pretraining would change every later number)."""
    recipe = edit_recipe(tiny_det(tmp_path, "scenes_det/unikd"),
                         {"unikd": {"pretrain_epochs": 1, "score_threshold": 0.06}, "distill.0.queries": 8})
    straight, broken = straight_and_resumed(recipe, tmp_path, 2)
    summary = json.loads((straight / "summary.json").read_text())
    stats = summary["unikd"]["pretrain"]
    assert stats["steps"] == 3 and stats["targets_per_image"] > 0 and math.isfinite(stats["loss_last"])
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((broken / "metrics.json").read_text())
    assert a[-1]["train_unikd"] > 0 and math.isfinite(a[-1]["test_map"])
    assert [(r["train_unikd"], r["train_det"], r["test_map"]) for r in a] == \
        [(r["train_unikd"], r["train_det"], r["test_map"]) for r in b]
    # the resumed run's summary still reports the pretraining, from the checkpointed phase statistics
    assert json.loads((broken / "summary.json").read_text())["unikd"]["pretrain"] == stats
