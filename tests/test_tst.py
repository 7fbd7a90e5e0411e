"""TST: the policy (gradients, normalisation, determinism), the policy phase, the recipe section, a run."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import sigint_at_step
from kdkit.checkpoint import pointed
from kdkit.data.loader import BatchLoader
from kdkit.distill import FrozenTeacher, Student
from kdkit.engine import Interrupted
from kdkit.errors import KdkitError
from kdkit.methods.tst import OPS, AugmentPolicy, batch_generator
from kdkit.methods.tst.trainer import TstTrainer, augmenter_objective
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe
from kdkit.task import TASKS

RGB_MEAN, RGB_STD = (0.5, 0.45, 0.4), (0.25, 0.2, 0.3)
GREY_OPS = [name for name in OPS if name != "color"]


def normalised(images01: torch.Tensor, mean, std) -> torch.Tensor:
    return (images01 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def rgb_batch(n: int = 64, size: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return normalised(torch.randint(0, 256, (n, 3, size, size), generator=gen).float() / 255, RGB_MEAN, RGB_STD)


# -- the policy ------------------------------------------------------------------------------------

def test_gradients_reach_every_probability_and_magnitude() -> None:
    policy = AugmentPolicy(list(OPS), num_ops=len(OPS), mean=RGB_MEAN, std=RGB_STD)
    x = rgb_batch()
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    (policy(x, batch_generator(0, 0, 0)) * weights).sum().backward()
    for name, grad in (("probability_logits", policy.probability_logits.grad),
                       ("magnitude_logits", policy.magnitude_logits.grad)):
        assert grad is not None and torch.isfinite(grad).all(), name
        zero = [n for n, g in zip(policy.names if name.startswith("prob") else policy.magnitude_names, grad,
                                  strict=True) if g == 0]
        assert not zero, f"no gradient reaches {name} of {zero}"


def test_combination_is_the_papers_weighted_sum_of_differences() -> None:
    ops = ["invert", "brightness", "rotate"]
    policy = AugmentPolicy(ops, num_ops=3, mean=RGB_MEAN, std=RGB_STD, random_sign=False)
    x = rgb_batch(4)
    draws = policy.draw(4, batch_generator(0, 0, 0))
    out = policy(x, draws=draws)
    # independent computation: un-normalise by hand, loop over samples and operations
    images = x * torch.tensor(RGB_STD).view(1, 3, 1, 1) + torch.tensor(RGB_MEAN).view(1, 3, 1, 1)
    p = torch.sigmoid((policy.probability_logits + torch.log(draws["uniform"]) - torch.log(1 - draws["uniform"]))
                      / 0.05)
    m = torch.sigmoid(policy.magnitude_logits)
    expected = []
    for i in range(4):
        img = images[i:i + 1]
        total = img.clone()
        total += p[i, 0] * ((1 - img) - img)
        total += p[i, 1] * ((img * (1 + 0.9 * m[0])).clamp(0, 1) - img)
        total += p[i, 2] * (OPS["rotate"].fn(img, m[1:2], torch.zeros(1, 2)) - img)
        expected.append(total.clamp(0, 1))
    expected = normalised(torch.cat(expected), RGB_MEAN, RGB_STD)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_normalisation_is_undone_and_redone(channels: int) -> None:
    mean, std = ((0.3,), (0.4,)) if channels == 1 else (RGB_MEAN, RGB_STD)
    raw = torch.randint(0, 256, (8, channels, 12, 12), generator=torch.Generator().manual_seed(0)).float() / 255
    x = normalised(raw, mean, std)
    ops = ["invert"] if channels == 1 else ["invert", "color"]
    never = AugmentPolicy(ops, num_ops=1, mean=mean, std=std, channels=channels, init_probability=1e-6)
    torch.testing.assert_close(never(x, batch_generator(0, 0, 0)), x, atol=1e-5, rtol=0)
    always = AugmentPolicy(["invert"], num_ops=1, mean=mean, std=std, channels=channels,
                           init_probability=1 - 1e-6)
    torch.testing.assert_close(always(x, batch_generator(0, 0, 0)), normalised(1 - raw, mean, std), atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_frozen_policy_is_deterministic_under_a_seed(channels: int) -> None:
    ops = GREY_OPS if channels == 1 else list(OPS)
    policy = AugmentPolicy(ops, num_ops=4, channels=channels)
    x = torch.rand(16, channels, 12, 12)
    with torch.no_grad():
        a, b = policy(x, batch_generator(3, 5, 7)), policy(x, batch_generator(3, 5, 7))
        c = policy(x, batch_generator(3, 5, 8))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, c)


def test_colour_only_operation_is_refused_on_grey_images() -> None:
    with pytest.raises(KdkitError, match="color"):
        AugmentPolicy(list(OPS), channels=1)


def test_augmenter_objective_matches_a_plain_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    zt, zs, y = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen) * 5, torch.tensor([0, 3, 1, 1, 2])
    expected = 0.0
    for i in range(5):
        pt, ps = torch.softmax(zt[i], 0)[y[i]], torch.softmax(zs[i].double(), 0)[y[i]]
        expected += float(-torch.log(pt) - torch.log(1 - ps)) / 5
    assert augmenter_objective(zt, zs, y).item() == pytest.approx(expected, rel=1e-5)


# -- the policy phase ------------------------------------------------------------------------------

def tiny_net(scale: float) -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 10))
    with torch.no_grad():
        net[-1].weight.mul_(scale)
    return net


def phase_setup() -> tuple[TstTrainer, SimpleNamespace, Student]:
    torch.manual_seed(0)
    # tiny nets with confident outputs (scaled heads), so the augmenter's target moves measurably
    teacher = FrozenTeacher(tiny_net(scale=8.0))
    student = Student(tiny_net(scale=8.0))
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=gen)
    labels = teacher(normalised(images.float() / 255, RGB_MEAN, RGB_STD))["logits"].argmax(1)  # teacher right
    loader = BatchLoader(images, labels, batch_size=64, mean=RGB_MEAN, std=RGB_STD)  # one fixed batch
    policy = AugmentPolicy(list(OPS), num_ops=4, mean=RGB_MEAN, std=RGB_STD)
    trainer = TstTrainer(policy, teacher=teacher, seed=0, policy_epochs=[0], policy_passes=40, lr=2.0)
    classification = SimpleNamespace(task=TASKS.get("classification"))  # the paper's objective
    engine = SimpleNamespace(student=student, train_loader=loader, device=torch.device("cpu"), epoch=0,
                             ctx=trainer.ctx, show_progress=False, autocast=contextlib.nullcontext,
                             task=classification)
    return trainer, engine, student


def mean_target(trainer: TstTrainer, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """-L_A averaged over 16 fixed draws: log p_T(y) + log(1 - p_S(y)), higher = teacher right, student wrong."""
    student.eval()
    with torch.no_grad():
        values = [-augmenter_objective(trainer.teacher.model(a), student.model(a), y)
                  for a in (trainer.policy(x, batch_generator(9, 9, d)) for d in range(16))]
    return float(torch.stack(values).mean())


@pytest.mark.slow
def test_policy_phase_raises_the_augmenter_target_on_a_fixed_batch() -> None:
    trainer, engine, student = phase_setup()
    x, y, _ = next(iter(engine.train_loader.epoch(0)))
    before = mean_target(trainer, student, x, y)
    probabilities = trainer.policy.probabilities().detach().clone()
    student.train()
    stats = trainer.train_policy(engine)
    after = mean_target(trainer, student, x, y)
    assert stats["steps"] == 40 and after > before + 0.02  # measured: -1.62 -> -1.58
    assert not torch.equal(trainer.policy.probabilities().detach(), probabilities)


def test_policy_phase_restores_modes_and_flags_and_leaves_the_student_untouched() -> None:
    trainer, engine, student = phase_setup()
    trainer.policy_passes = 2
    first = next(iter(student.parameters()))
    first.requires_grad_(False)  # a frozen layer must stay frozen, the rest trainable
    flags = [p.requires_grad for p in student.parameters()]
    weights = {k: v.clone() for k, v in student.state_dict().items()}
    for mode in (True, False):
        student.train(mode)
        trainer.train_policy(engine)
        assert student.training is mode and all(m.training is mode for m in student.modules())
        assert [p.requires_grad for p in student.parameters()] == flags
    assert all(p.grad is None for p in student.parameters())
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in weights.items())
    assert not trainer.teacher.model.training and trainer.state.phases == 2


def test_batch_transform_prepends_the_augmented_batch() -> None:
    trainer, engine, _ = phase_setup()
    engine.batch = 3
    x, y, index = next(iter(engine.train_loader.epoch(0)))
    xs, ys, idx = trainer.batch_transform(engine, x, y, index)
    assert torch.equal(xs[64:], x) and torch.equal(ys, y.repeat(2)) and torch.equal(idx, index.repeat(2))
    assert torch.equal(xs[:64], trainer.batch_transform(engine, x, y, index)[0][:64])  # same (epoch, batch)
    assert not xs.requires_grad


# -- recipes and runs ------------------------------------------------------------------------------

def with_tst(recipe: dict, **tst) -> dict:
    recipe["tst"] = {"ops": GREY_OPS, "policy_epochs": [1], "policy_passes": 0.5, **tst}
    return recipe


def test_tst_without_teacher_or_with_late_policy_epochs_is_refused(tiny_kd: dict) -> None:
    alone = {k: v for k, v in copy.deepcopy(tiny_kd).items() if k not in ("teacher", "distill")}
    with pytest.raises(KdkitError, match="no `teacher:`"):
        recipe_from_dict(with_tst(alone))
    with pytest.raises(KdkitError, match="policy_epochs"):
        recipe_from_dict(with_tst(tiny_kd, policy_epochs=[2]))  # train.epochs is 2: epochs 0 and 1 only
    with pytest.raises(KdkitError, match="sharpen"):
        recipe_from_dict(with_tst(tiny_kd, ops=["sharpen"]))
    with pytest.raises(KdkitError, match="views"):
        recipe_from_dict(with_tst(tiny_kd), ["data.views=2"])


def test_colour_operation_on_grey_data_fails_before_training(tiny_kd: dict) -> None:
    recipe = recipe_from_dict(with_tst(tiny_kd, ops=list(OPS)))
    with pytest.raises(KdkitError, match="one-channel"):
        run_recipe(recipe)


@pytest.mark.slow
def test_run_logs_policy_saves_it_and_resumes_to_identical_weights(tmp_path: Path, tiny_kd: dict) -> None:
    with_tst(tiny_kd)
    straight = recipe_from_dict(tiny_kd, [f"output.dir={tmp_path / 'straight'}"])
    summary = run_recipe(straight)
    run = tmp_path / "straight"
    rows = [json.loads(line) for line in (run / "tst_policy.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2] and "phase" in rows[2] and "phase" not in rows[1]
    assert set(rows[0]["probabilities"]) == set(GREY_OPS)
    assert rows[0]["probabilities"] != rows[2]["probabilities"]  # trained at the start of epoch 2
    assert summary["tst_policy_phases"] == 1 and summary["tst_policy_seconds"] > 0
    assert (run / "tst_policy.png").stat().st_size > 0 and (run / "tst_samples.png").stat().st_size > 0
    weights = load_file(str(pointed(run / "checkpoints", "latest") / "model.safetensors"))
    assert "extra.tst.policy.probability_logits" in weights

    broken = recipe_from_dict(tiny_kd, [f"output.dir={tmp_path / 'broken'}"])
    with pytest.raises(Interrupted):  # mid-way through epoch 2, after its policy phase
        run_recipe(broken, callbacks=[sigint_at_step(9)])
    resumed = run_recipe(broken, resume=True)
    other = load_file(str(pointed(tmp_path / "broken" / "checkpoints", "latest") / "model.safetensors"))
    timing = "extra.tst.policy_seconds"  # wall time, the one value that differs
    assert weights.keys() == other.keys() and all(torch.equal(weights[k], other[k]) for k in weights if k != timing)
    assert resumed["tst_policy_phases"] == 1


def test_the_dense_objective_is_the_teachers_task_loss_minus_the_students() -> None:
    from kdkit.methods.tst.trainer import discrepancy_objective

    def sse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # any supervised loss
        return ((out - target) ** 2).sum()

    t, s, y = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0]), torch.tensor([1.0, 1.0])
    assert discrepancy_objective(sse, t, s, y).item() == (0.0 + 1.0) - (1.0 + 9.0)


@pytest.mark.parametrize(("ops", "refused"), [(["shear_x", "brightness"], "tst.ops has ['shear_x']"),
                                              (["rotate", "translate_y"], "tst.ops has ['rotate', 'translate_y']"),
                                              (["brightness", "invert", "cutout"], None)])
def test_on_a_detector_only_the_operations_that_keep_pixels_in_place_are_allowed(ops: list[str], refused: str | None,
                                                                                 tmp_path: Path) -> None:
    from conftest import edit_recipe, tiny_det
    from kdkit.build import plan
    from kdkit.errors import RecipeErrors

    recipe = recipe_from_dict(edit_recipe(tiny_det(tmp_path, "scenes_det/tst"),
                                          {"tst.ops": ops, "tst.num_ops": 2, "tst.policy_epochs": [0]}))
    if refused is None:
        plan(recipe, training=False)
        return
    with pytest.raises(RecipeErrors) as info:
        plan(recipe, training=False)
    assert refused in str(info.value) and "boxes" in str(info.value)


@pytest.mark.slow
def test_a_tiny_detector_trains_the_policy_on_the_fcos_loss_discrepancy(tmp_path: Path) -> None:
    from conftest import edit_recipe, tiny_det

    recipe = edit_recipe(tiny_det(tmp_path, "scenes_det/tst"), {"tst.policy_epochs": [0]})
    summary = run_recipe(recipe_from_dict(recipe))
    rows = [json.loads(line) for line in (tmp_path / "run" / "tst_policy.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["probabilities"] != rows[1]["probabilities"]  # the phase moved the policy
    phase = rows[1]["phase"]
    assert phase["last_pass"]["teacher_right_student_wrong"] is None  # no one class per image on a detector
    assert summary["task"] == "detection" and summary["tst_policy_phases"] == 1
