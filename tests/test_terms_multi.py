"""Multi-stage terms (lists of taps), sample indices for instance-level losses, and two-view batches."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kdkit.build import plan
from kdkit.data import load_dataset
from kdkit.data.loader import BatchLoader
from kdkit.data.strong import StrongView
from kdkit.distill import PerTap
from kdkit.engine import Engine
from kdkit.errors import RecipeErrors
from kdkit.losses import DistillLoss, mse_loss, register_loss
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe


def test_list_of_taps_gets_one_bridge_per_stage_and_sums_the_pairs(tiny_kd: dict) -> None:
    tiny_kd["distill"] = [{"loss": "mse", "student": ["stage1", "stage2"], "teacher": ["stage1", "stage2"],
                           "bridge": "conv1x1"}]
    built = plan(recipe_from_dict(tiny_kd), training=True)
    bridge = built.student.bridges["mse"]
    assert isinstance(bridge, PerTap) and len(bridge.parts) == 2
    assert built.tap_shapes["mse"] == ([(32, 4, 4), (64, 2, 2)], [(32, 4, 4), (64, 2, 2)])  # 8x8 digits, pooled
    x = torch.randn(4, 1, 8, 8)
    logits, per_term = built.student(x)
    teacher = built.teacher(x)
    out = built.objective(logits, torch.zeros(4, dtype=torch.long), per_term, teacher)
    expected = mse_loss(per_term["mse"][0], teacher["stage1"]) + mse_loss(per_term["mse"][1], teacher["stage2"])
    assert out["mse"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_tap_lists_must_pair_up(tiny_kd: dict) -> None:
    tiny_kd["distill"] = [{"loss": "mse", "student": ["stage1", "stage2"], "teacher": ["stage2"]}]
    with pytest.raises(RecipeErrors, match="2 student tap"):
        plan(recipe_from_dict(tiny_kd), training=True)


def test_multi_stage_shape_error_names_the_stage(tiny_kd: dict) -> None:
    tiny_kd["distill"] = [{"loss": "mse", "student": ["stage1", "stage2"], "teacher": ["stage1", "stage2"]}]
    with pytest.raises(RecipeErrors) as info:
        plan(recipe_from_dict(tiny_kd), training=True)
    assert len(info.value.errors) == 2 and "student tap 'stage2' with teacher tap 'stage2'" in str(info.value)


SEEN: list[torch.Tensor] = []


@register_loss("test_index_probe", help="test-only: records the sample indices it is given")
class IndexProbe(DistillLoss):
    """Returns 0 and records ``index``."""

    needs_index = True

    def __init__(self) -> None:
        super().__init__()

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                index: torch.Tensor | None = None) -> torch.Tensor:
        SEEN.append(index.clone())
        return (student * 0).sum()


@pytest.mark.slow
def test_losses_that_need_indices_get_the_batch_indices(tiny_kd: dict) -> None:
    SEEN.clear()
    tiny_kd["distill"].append({"loss": "test_index_probe"})
    recipe = recipe_from_dict(tiny_kd, ["train.epochs=1"])
    run_recipe(recipe)
    data = load_dataset("digits")
    from kdkit.data import subset

    sub = subset(data, 200, 0)
    loader = BatchLoader(sub.train_images, sub.train_labels, batch_size=32, mean=sub.mean, std=sub.std, seed=0)
    expected = list(loader.batch_indices(0))
    assert len(SEEN) == len(expected) and all(torch.equal(a, b) for a, b in zip(SEEN, expected, strict=True))


def test_two_views_repeat_labels_and_are_deterministic() -> None:
    data = load_dataset("digits")
    strong = StrongView(n=2, m=10, groups=4)
    loader = BatchLoader(data.train_images, data.train_labels, batch_size=16, mean=data.mean, std=data.std,
                         strong=strong, seed=3)
    x, y, idx = next(loader.epoch(0))
    assert x.shape == (32, 1, 8, 8) and torch.equal(y[:16], y[16:]) and torch.equal(idx[:16], idx[16:])
    assert not torch.equal(x[:16], x[16:])  # the strong view differs from the weak one
    x2, _, _ = next(loader.epoch(0))
    assert torch.equal(x, x2)  # same (seed, epoch, batch): same views, whatever the global RNG did


@pytest.mark.slow
def test_two_view_recipe_trains_on_weak_and_strong_views(tiny_kd: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    step = Engine.step

    def recording(engine: Engine, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                  view: torch.Tensor | None = None) -> Any:
        batches.append((x.detach().clone(), y.clone()))
        return step(engine, x, y, index, view)

    monkeypatch.setattr(Engine, "step", recording)
    recipe = recipe_from_dict(tiny_kd, ["data.views=2", "train.epochs=1"])
    summary = run_recipe(recipe)
    half = tiny_kd["train"]["batch_size"]
    assert summary["epochs"] == 1 and batches and batches[0][0].shape[0] == 2 * half
    for x, y in batches:  # every step: [weak; strong] views of the same images, with the labels repeated
        n = len(y) // 2
        assert torch.equal(y[:n], y[n:]) and not torch.equal(x[:n], x[n:])
