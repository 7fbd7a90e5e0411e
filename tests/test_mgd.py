"""MGD (masked generative distillation): the loss and the generator bridge against plain-loop computations, the
official mask rule, properties, the refusals, and tiny detection and segmentation runs end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import edit_recipe, shipped_on_tiny_scenes, straight_and_resumed, tiny_det, tiny_seg, write_recipe
from kdkit.bridges import BRIDGES
from kdkit.bridges.mgd import MGDGenerator, random_mask
from kdkit.cli import main
from kdkit.errors import KdkitError
from kdkit.losses import LOSSES
from kdkit.losses.mgd import mgd_loss


def loop_mgd(generated: np.ndarray, teacher: np.ndarray, alpha: float) -> float:
    """alpha * sum over images, channels and pixels of the squared error, over the images (Python floats)."""
    b, c, h, w = teacher.shape
    total = 0.0
    for n in range(b):
        for k in range(c):
            for i in range(h):
                for j in range(w):
                    total += (float(teacher[n, k, i, j]) - float(generated[n, k, i, j])) ** 2
    return alpha * total / b


def loop_conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, pad: int) -> np.ndarray:
    """A plain-loop cross-correlation of ``x`` (C, H, W) with ``weight`` (O, C, kh, kw), zero padding ``pad``."""
    c, h, w = x.shape
    o, _, kh, kw = weight.shape
    padded = np.zeros((c, h + 2 * pad, w + 2 * pad))
    padded[:, pad:pad + h, pad:pad + w] = x
    out = np.zeros((o, h, w))
    for q in range(o):
        for i in range(h):
            for j in range(w):
                out[q, i, j] = bias[q] + sum(weight[q, p, a, b] * padded[p, i + a, j + b]
                                             for p in range(c) for a in range(kh) for b in range(kw))
    return out


def loop_generate(gen: MGDGenerator, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """G(mask * align(x)) per image with plain loops: 1x1 align, the mask on every channel, conv-ReLU-conv."""
    params = {k: v.detach().double().numpy() for k, v in gen.state_dict().items()}
    out = []
    for n in range(x.shape[0]):
        a = loop_conv(x[n], params["align.weight"], params["align.bias"], 0)
        a = a * mask[n, 0][None]
        a = np.maximum(loop_conv(a, params["generation.0.weight"], params["generation.0.bias"], 1), 0.0)
        out.append(loop_conv(a, params["generation.2.weight"], params["generation.2.bias"], 1))
    return np.stack(out)


@pytest.mark.parametrize("alpha", [2e-5, 1.0])
def test_the_loss_is_alpha_times_the_summed_squared_error_over_the_images(alpha: float) -> None:
    gen = torch.Generator().manual_seed(0)
    generated = torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64)
    teacher = torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64) * 2
    value = LOSSES.get("mgd")(alpha=alpha)(generated, teacher, torch.zeros(3))
    assert value.item() == pytest.approx(loop_mgd(generated.numpy(), teacher.numpy(), alpha), rel=1e-12)


def test_the_generator_with_a_given_mask_equals_plain_loops() -> None:
    torch.manual_seed(0)
    bridge = BRIDGES.get("mgd")((3, 5, 4), (4, 5, 4)).double()
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    mask = (torch.rand(2, 1, 5, 4) > 0.5).double()
    assert mask.sum() > 0 and (1 - mask).sum() > 0  # some pixels kept, some masked
    out = bridge.generate(x, mask)
    np.testing.assert_allclose(out.detach().numpy(), loop_generate(bridge, x.numpy(), mask.numpy()), rtol=1e-10,
                               atol=1e-12)


def test_training_draws_the_official_mask_from_the_global_generator_and_eval_masks_nothing() -> None:
    torch.manual_seed(0)
    bridge = BRIDGES.get("mgd")((3, 6, 6), (3, 6, 6), mask_ratio=0.65)
    assert isinstance(bridge.align, torch.nn.Identity)  # equal widths: no align conv, as the official code
    x = torch.randn(4, 3, 6, 6)
    torch.manual_seed(7)
    official = torch.where(torch.rand((4, 1, 6, 6)) > 1 - 0.65, 0, 1).float()  # the official get_dis_loss
    torch.manual_seed(7)
    torch.testing.assert_close(bridge(x), bridge.generate(x, official), rtol=0, atol=0)
    bridge.eval()
    torch.testing.assert_close(bridge(x), bridge.generate(x, torch.ones(4, 1, 6, 6)), rtol=0, atol=0)


@pytest.mark.parametrize("ratio", [0.0, 0.65, 0.75, 1.0])
def test_the_mask_hides_the_given_share_of_pixels_on_every_channel(ratio: float) -> None:
    mask = random_mask(64, 40, 40, ratio, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (64, 1, 40, 40) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (1 - mask).mean().item() == pytest.approx(ratio, abs=0.01)


def test_masked_student_pixels_do_not_reach_the_generated_map() -> None:
    """The mask is applied to the aligned student map before generation: what the student holds at a masked
    pixel cannot change the output; at a kept pixel it does."""
    torch.manual_seed(0)
    bridge = BRIDGES.get("mgd")((2, 5, 5), (3, 5, 5))
    x = torch.randn(1, 2, 5, 5)
    mask = torch.ones(1, 1, 5, 5)
    mask[0, 0, 2, 3] = 0
    changed = x.clone()
    changed[0, :, 2, 3] += 10.0
    torch.testing.assert_close(bridge.generate(changed, mask), bridge.generate(x, mask), rtol=0, atol=0)
    kept = x.clone()
    kept[0, :, 1, 1] += 10.0
    assert not torch.allclose(bridge.generate(kept, mask), bridge.generate(x, mask))


def test_the_loss_is_zero_exactly_when_the_generated_map_is_the_teachers() -> None:
    teacher = torch.randn(2, 3, 4, 4)
    loss = LOSSES.get("mgd")()
    assert loss(teacher.clone(), teacher, torch.zeros(2)).item() == 0.0
    assert loss(teacher + 0.01, teacher, torch.zeros(2)).item() > 0.0


def test_float64_stays_float64_through_bridge_and_loss_and_half_is_upcast() -> None:
    torch.manual_seed(0)
    bridge = BRIDGES.get("mgd")((2, 4, 4), (3, 4, 4)).double()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    out = bridge(x)
    value = mgd_loss(out, teacher)
    assert out.dtype == torch.float64 and value.dtype == torch.float64
    value.backward()
    assert x.grad is not None and x.grad.dtype == torch.float64 and torch.isfinite(x.grad).all()
    half = mgd_loss(out.detach().to(torch.bfloat16), teacher.to(torch.bfloat16), alpha=1.0)
    assert half.dtype == torch.float32 and torch.isfinite(half)


def test_gradients_are_finite_on_extreme_maps() -> None:
    torch.manual_seed(0)
    bridge = BRIDGES.get("mgd")((2, 4, 4), (3, 4, 4))
    x = (torch.randn(2, 2, 4, 4) * 1e4).requires_grad_()
    value = mgd_loss(bridge(x), torch.randn(2, 3, 4, 4) * 1e4)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in bridge.parameters())


def test_the_bridge_refuses_maps_of_different_spatial_sizes() -> None:
    with pytest.raises(KdkitError, match="it keeps the spatial size"):
        BRIDGES.get("mgd")((4, 6, 6), (8, 3, 3))
    with pytest.raises(KdkitError, match="3-d per-sample"):
        BRIDGES.get("mgd")((10,), (10,))


# -- recipes ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "message"), [
    ({"distill.0.bridge": "convreg"}, "reads the output of the 'mgd' bridge"),
    ({"distill.0.bridge_params.mask_ratio": 1.5}, "mask_ratio must be"),
    ({"distill.0.alpha": 0.0}, "alpha must be"),
    ({"distill.0.student": "logits", "distill.0.teacher": "logits"}, "3-d per-sample"),
])
def test_mgd_recipes_it_cannot_work_with_exit_2_before_training(change: dict, message: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    recipe = shipped_on_tiny_scenes("scenes_det/mgd", tmp_path)
    edit_recipe(recipe, change)
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_shipped_detection_mgd_recipe_runs_end_to_end(tmp_path: Path) -> None:
    from kdkit.recipe import recipe_from_dict
    from kdkit.runner import run_recipe

    summary = run_recipe(recipe_from_dict(tiny_det(tmp_path, "scenes_det/mgd")))
    assert summary["task"] == "detection" and summary["bridge_params"] > 0  # three generators trained
    row = json.loads((tmp_path / "run" / "metrics.json").read_text())[-1]
    assert math.isfinite(row["train_mgd"]) and row["train_mgd"] > 0 and math.isfinite(row["test_map"])


@pytest.mark.slow
def test_mgd_resumes_exactly(tmp_path: Path) -> None:
    """The masks come from the global generator, which checkpoints restore: a resumed run draws the same masks."""
    recipe = edit_recipe(tiny_det(tmp_path, "scenes_det/mgd"), {"train.epochs": 2})
    straight, broken = straight_and_resumed(recipe, tmp_path, 4)
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((broken / "metrics.json").read_text())
    assert [(r["train_mgd"], r["test_map"]) for r in a] == [(r["train_mgd"], r["test_map"]) for r in b]


@pytest.mark.slow
def test_the_shipped_segmentation_mgd_recipe_runs_end_to_end(tmp_path: Path) -> None:
    from kdkit.recipe import recipe_from_dict
    from kdkit.runner import run_recipe

    recipe = tiny_seg(tmp_path, "scenes_seg/mgd")
    run_recipe(recipe_from_dict(recipe))
    row = json.loads((tmp_path / "run" / "metrics.json").read_text())[-1]
    assert row["train_mgd"] > 0 and row["train_cwd"] > 0 and math.isfinite(row["test_miou"])
