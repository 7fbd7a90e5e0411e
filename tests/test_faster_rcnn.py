"""Faster R-CNN on task detection: proposals, both stages' losses (with their random sampling) and decoding against
torchvision's own ``RegionProposalNetwork`` and ``RoIHeads`` functions on the same inputs and the same random draws;
the model's one tensor and taps; training it; the one-stage logit losses refused on it."""

from __future__ import annotations

import math

import pytest
import torch

from kdkit.models import build_model
from kdkit.models.faster_rcnn import TwoStageSpec, propose
from kdkit.models.retinanet import AnchorSpec
from kdkit.tasks.two_stage import decode, faster_rcnn_loss, foreground, roi_loss, rpn_loss, sample
from test_retinanet import need_fashion_mnist, retinanet_recipe, scene_boxes

K = 3
SPEC = TwoStageSpec(K, AnchorSpec(1, (4, 8, 16), ((12.0,), (24.0,), (48.0,))), proposals=24)
SIZE = 48


def torchvision_rpn(pre_nms_top_n: int, post_nms_top_n: int):
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

    generator = AnchorGenerator(SPEC.rpn.sizes, (SPEC.rpn.aspect_ratios,) * 3)
    return RegionProposalNetwork(generator, RPNHead(4, 3), 0.7, 0.3, 256, 0.5,
                                 {"training": pre_nms_top_n, "testing": pre_nms_top_n},
                                 {"training": post_nms_top_n, "testing": post_nms_top_n}, 0.7)


def torchvision_roi_heads():
    from torchvision.models.detection.roi_heads import RoIHeads

    return RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 100)


def rpn_rows(batch: int, scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    count = sum(SPEC.rpn.level_sizes(SIZE))
    return torch.randn(batch, count, 5, generator=generator, dtype=torch.float64) * scale


def test_proposals_equal_torchvision_filter_proposals_and_pad_when_fewer_survive() -> None:
    rpn = rpn_rows(3)
    anchors = SPEC.rpn.anchors(SIZE, dtype=torch.float64)
    for pre in (1000, 20):
        ours, valid = propose(SPEC, rpn, anchors, (SIZE, SIZE), pre)
        net = torchvision_rpn(pre, SPEC.proposals).eval()
        decoded = net.box_coder.decode(rpn[..., 1:].reshape(-1, 4), [anchors] * 3).view(3, -1, 4)
        theirs, _ = net.filter_proposals(decoded, rpn[..., :1].reshape(-1, 1), [(SIZE, SIZE)] * 3,
                                         SPEC.rpn.level_sizes(SIZE))
        for b in range(3):
            kept = int(valid[b].sum())
            assert kept == len(theirs[b]) and bool(valid[b, :kept].all()) and not bool(valid[b, kept:].any())
            assert torch.equal(ours[b, :kept], theirs[b])
            assert not bool(ours[b, kept:].any())  # padding rows are zero boxes
    # a single anchor per level left before the NMS (zero deltas: the anchors themselves, all kept): 3 proposals,
    # the other rows flagged invalid
    rpn[..., 1:] = 0.0
    _, valid = propose(SPEC, rpn, anchors, (SIZE, SIZE), 1)
    assert valid.sum(1).tolist() == [3, 3, 3]


def torchvision_rpn_loss(net: torch.nn.Module, rpn: torch.Tensor, anchors: torch.Tensor, boxes: torch.Tensor,
                         labels: torch.Tensor) -> torch.Tensor:
    targets = [{"boxes": b[lab >= 0]} for b, lab in zip(boxes, labels, strict=True)]
    matched_labels, matched_boxes = net.assign_targets_to_anchors([anchors] * len(boxes), targets)
    regression = net.box_coder.encode(matched_boxes, [anchors] * len(boxes))
    # torchvision makes the objectness targets float32, which would round a float64 loss; the same 0/1 in float64
    objectness, box = net.compute_loss(rpn[..., 0].reshape(-1, 1), rpn[..., 1:].reshape(-1, 4),
                                       [lab.to(rpn.dtype) for lab in matched_labels], regression)
    return objectness + box


def proposal_rows(boxes: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image ``P`` proposals: jittered copies of its boxes (so some match) and random boxes; all valid."""
    generator = torch.Generator().manual_seed(seed)
    batch = boxes.shape[0]
    corner = torch.rand(batch, SPEC.proposals, 2, generator=generator, dtype=torch.float64) * 36
    side = 4 + torch.rand(batch, SPEC.proposals, 2, generator=generator, dtype=torch.float64) * 20
    proposals = torch.cat([corner, corner + side], -1)
    jitter = torch.randn(batch, boxes.shape[1], 4, generator=generator, dtype=torch.float64)
    proposals[:, :boxes.shape[1]] = boxes + jitter
    proposals[:, boxes.shape[1]:2 * boxes.shape[1]] = boxes + 3 * jitter
    return proposals, torch.ones(batch, SPEC.proposals, dtype=torch.bool)


def torchvision_roi_loss(proposals: torch.Tensor, scores: torch.Tensor, deltas: torch.Tensor, boxes: torch.Tensor,
                         labels: torch.Tensor) -> torch.Tensor:
    from torchvision.models.detection.roi_heads import fastrcnn_loss

    heads = torchvision_roi_heads()
    gt_boxes = [b[lab >= 0] for b, lab in zip(boxes, labels, strict=True)]
    gt_labels = [lab[lab >= 0] + 1 for lab in labels]
    props = list(proposals)
    matched, classes = heads.assign_targets_to_proposals(props, gt_boxes, gt_labels)
    sampled = heads.subsample(classes)
    picked_props, picked_classes, picked_gt = [], [], []
    for b, inds in enumerate(sampled):
        picked_props.append(props[b][inds])
        picked_classes.append(classes[b][inds])
        gt = gt_boxes[b] if gt_boxes[b].numel() else torch.zeros(1, 4, dtype=boxes.dtype)
        picked_gt.append(gt[matched[b][inds]])
    regression = heads.box_coder.encode(picked_gt, picked_props)
    rows = torch.cat([torch.full((len(inds),), b) for b, inds in enumerate(sampled)])
    cols = torch.cat(sampled)
    classification, box = fastrcnn_loss(scores[rows, cols], deltas[rows, cols], picked_classes, list(regression))
    return classification + box


@pytest.mark.parametrize("scale", [1e-6, 1.0, 30.0])
def test_both_losses_equal_torchvision_with_the_same_random_samples_in_float64(scale: float) -> None:
    boxes, labels = scene_boxes()
    anchors = SPEC.rpn.anchors(SIZE, dtype=torch.float64)
    rpn = rpn_rows(3, scale).requires_grad_()
    generator = torch.Generator().manual_seed(2)
    scores = (torch.randn(3, SPEC.proposals, K + 1, generator=generator, dtype=torch.float64) * scale)
    deltas = (torch.randn(3, SPEC.proposals, 4 * (K + 1), generator=generator, dtype=torch.float64) * scale)
    scores.requires_grad_()
    deltas.requires_grad_()
    proposals, valid = proposal_rows(boxes)
    net = torchvision_rpn(1000, SPEC.proposals)  # built before seeding: its head's initialisation draws

    torch.manual_seed(7)
    theirs = torchvision_rpn_loss(net, rpn, anchors, boxes, labels) + torchvision_roi_loss(proposals, scores, deltas,
                                                                                     boxes, labels)
    their_grads = torch.autograd.grad(theirs, [rpn, scores, deltas])
    torch.manual_seed(7)
    ours = rpn_loss(SPEC, anchors, rpn, boxes, labels) + roi_loss(SPEC, valid, proposals, scores, deltas, boxes,
                                                                  labels)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for mine, other in zip(torch.autograd.grad(ours, [rpn, scores, deltas]), their_grads, strict=True):
        torch.testing.assert_close(mine, other, rtol=1e-12, atol=1e-12)

    # the packed tensor gives the same sum, with the same draws (the RPN samples first, as torchvision's forward)
    dense = torch.cat([torch.nn.functional.pad(rpn.detach(), (0, SPEC.channels - 5)),
                       torch.cat([valid.double().unsqueeze(-1), proposals, scores.detach(), deltas.detach()], -1)], 1)
    torch.manual_seed(7)
    torch.testing.assert_close(faster_rcnn_loss(SPEC, anchors, dense, boxes, labels), theirs.detach(), rtol=1e-12,
                               atol=1e-12)


def test_sampling_is_torchvisions_balanced_sampler_and_padding_proposals_are_never_sampled() -> None:
    from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(-1, 4, (4, 300), generator=generator)
    torch.manual_seed(11)
    positives, negatives = sample(labels, 64, 0.25)
    torch.manual_seed(11)
    their_pos, their_neg = BalancedPositiveNegativeSampler(64, 0.25)(list(labels))
    assert torch.equal(positives, torch.stack(their_pos).bool())
    assert torch.equal(negatives, torch.stack(their_neg).bool())
    assert positives.sum(1).tolist() == [16] * 4 and (positives | negatives).sum(1).tolist() == [64] * 4

    # a padding row placed exactly on a box is neither a positive nor a negative
    boxes, box_labels = scene_boxes()
    proposals, valid = proposal_rows(boxes)
    proposals[0, 5] = boxes[0, 0]
    valid[0, 5] = False
    scores = torch.zeros(3, SPEC.proposals, K + 1, dtype=torch.float64)
    scores[0, 5, 3] = 50.0  # the right class (2 + 1) by far: sampling it would lower the loss
    deltas = torch.zeros(3, SPEC.proposals, 4 * (K + 1), dtype=torch.float64)
    torch.manual_seed(0)
    masked = roi_loss(SPEC, valid, proposals, scores, deltas, boxes, box_labels)
    scores[0, 5] = 0.0
    torch.manual_seed(0)
    assert torch.equal(roi_loss(SPEC, valid, proposals, scores, deltas, boxes, box_labels), masked)


def test_decode_equals_torchvision_postprocess_detections_with_dataset_labels() -> None:
    boxes, _ = scene_boxes()
    proposals, valid = proposal_rows(boxes)
    valid[1, 20:] = False
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(3, SPEC.proposals, K + 1, generator=generator) * 3
    deltas = torch.randn(3, SPEC.proposals, 4 * (K + 1), generator=generator)
    rpn = torch.zeros(3, sum(SPEC.rpn.level_sizes(SIZE)), SPEC.channels)
    dense = torch.cat([rpn, torch.cat([valid.float().unsqueeze(-1), proposals.float(), logits, deltas], -1)], 1)
    ours = decode(SPEC, SPEC.rpn.anchors(SIZE), dense, SIZE)
    heads = torchvision_roi_heads()
    for b in range(3):
        rows = valid[b]
        got_boxes, got_scores, got_labels = heads.postprocess_detections(logits[b][rows], deltas[b][rows],
                                                                         [proposals[b][rows].float()], [(SIZE, SIZE)])
        assert torch.equal(ours[b]["boxes"], got_boxes[0]) and torch.equal(ours[b]["scores"], got_scores[0])
        assert torch.equal(ours[b]["labels"], got_labels[0] - 1) and len(got_labels[0]) > 0


def test_the_model_gives_one_tensor_of_anchor_and_proposal_rows_named_taps_and_a_trainable_loss() -> None:
    model = build_model("tv_faster_rcnn", num_classes=K, in_channels=1, image_size=40,
                        params={"width": 4, "proposals": 16})
    spec = model.dense_spec
    assert isinstance(spec, TwoStageSpec) and spec.proposals == 16 and model.logits_layout == "two_stage_detections"
    assert {"stage1", "p2", "p3", "p4"} <= set(model.feature_taps)
    anchors = sum(spec.rpn.level_sizes(40))
    assert anchors == (100 + 25 + 9) * 3
    images = torch.randn(2, 1, 40, 40)
    dense = model(images)
    assert dense.shape == (2, anchors + 16, spec.channels)
    assert not bool(dense[:, :anchors, 5:].any())  # anchor rows are padded with zeros
    rpn, valid, proposals, _, _ = spec.split(dense)
    torch.testing.assert_close(rpn, dense[:, :anchors, :5])
    assert bool(valid[:, 0].all()) and bool((proposals[valid] >= 0).all()) and bool((proposals[valid] <= 40).all())
    boxes = torch.tensor([[[4.0, 6.0, 20.0, 30.0]], [[10.0, 10.0, 30.0, 22.0]]])
    labels = torch.tensor([[2], [0]])
    loss = faster_rcnn_loss(spec, spec.rpn.anchors(40), dense, boxes, labels)
    loss.backward()
    assert math.isfinite(loss.item())
    assert model.rpn_head.cls_logits.weight.grad.abs().sum() > 0
    assert model.box_predictor.cls_score.weight.grad.abs().sum() > 0
    assert model.stages[0][0][0].weight.grad.abs().sum() > 0  # both stages train the backbone
    fg, right = foreground(spec, spec.rpn.anchors(40), dense, boxes, labels)
    assert fg.shape == right.shape == (2, 16) and not bool((right & ~fg).any())
    # under bf16 autocast the rows stay float32 (proposal boxes in pixels would round to 1/4 pixel)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(images).dtype == torch.float32
    # half precision in, float32 loss out
    assert faster_rcnn_loss(spec, spec.rpn.anchors(40), dense.detach().bfloat16(), boxes, labels).dtype == torch.float32


def faster_recipe(tmp_path, distill: list[dict]) -> dict:
    recipe = retinanet_recipe(tmp_path, distill)
    recipe["name"] = "faster_tiny"
    recipe["model"] = {"arch": "tv_faster_rcnn", "params": {"width": 4, "proposals": 16, "representation": 32}}
    return recipe


@pytest.mark.parametrize("loss", ["ld", "bckd"])
def test_one_stage_logit_losses_are_refused_on_two_stage_outputs_before_training(tmp_path, loss: str) -> None:
    from kdkit.errors import KdkitError
    from kdkit.recipe import recipe_from_dict
    from kdkit.runner import run_recipe

    need_fashion_mnist()
    with pytest.raises(KdkitError) as info:
        run_recipe(recipe_from_dict(faster_recipe(tmp_path, [{"loss": loss, "weight": 1.0}])))
    message = str(info.value)
    assert "two-stage" in message and loss in message and "with these networks" in message
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_an_fcos_teacher_distils_a_faster_rcnn_student_on_fpn_levels(tmp_path) -> None:
    import json

    from kdkit.recipe import recipe_from_dict
    from kdkit.runner import run_recipe

    need_fashion_mnist()
    recipe = faster_recipe(tmp_path, [{"loss": "fitnets", "student": ["p2", "p3"], "teacher": ["p2", "p3"],
                                       "weight": 1.0}])
    summary = run_recipe(recipe_from_dict(recipe))
    assert summary["metric"] == "map"
    row = json.loads((tmp_path / "run" / "metrics.json").read_text())[-1]
    assert math.isfinite(row["train_det"]) and row["train_fitnets"] > 0 and math.isfinite(row["test_map"])
