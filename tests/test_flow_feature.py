"""FM-KT feature variant: the rewriting flow_feature bridge, the fmkt_feature loss, Student hooks, plan, costs."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kdkit.bridges import BRIDGES
from kdkit.build import plan
from kdkit.distill import Student
from kdkit.errors import KdkitError
from kdkit.methods.fmkt import FeatureFlow, FeatureFlowBridge
from kdkit.methods.fmkt.feature_loss import FMKTFeatureLoss, fmkt_feature_loss
from kdkit.models import build_model
from kdkit.recipe import Recipe

# cnn_student on 8x8 inputs: stage1 is (8, 4, 4), stage2 (16, 2, 2); cnn_teacher's stage1 is (32, 4, 4).


def feature_student(seed: int = 0, **params) -> tuple[Student, torch.nn.Module]:
    """A Student whose stage1 is flowed, and an untouched copy of its model (no hooks) for hand computations."""
    torch.manual_seed(seed)
    model = build_model("cnn_student", num_classes=10, in_channels=1, image_size=8)
    plain = copy.deepcopy(model)
    bridge = BRIDGES.get("flow_feature")((8, 4, 4), (32, 4, 4), **{"steps": 3, "eval_steps": 2, **params})
    return Student(model, {"ff": "stage1"}, {"ff": bridge}), plain


def written_out_chain(bridge: FeatureFlowBridge, f_s: torch.Tensor, n: int) -> torch.Tensor:
    """The Euler chain, step by step from t = 1: x <- x - enc(x + time(t)) / n."""
    x = f_s
    for k in range(n):
        t = 1.0 - k / n
        x = x - bridge.encoder(x + bridge.time(t, x)) / n
    return x


def test_flowed_feature_replaces_the_activation_in_training_and_inference() -> None:
    student, plain = feature_student()
    bridge = student.bridges["ff"]
    x = torch.randn(5, 1, 8, 8)
    student.train(), plain.train()
    logits, per_term = student(x)
    expected = plain.fc(plain.stage2(written_out_chain(bridge, plain.stage1(x), 3)).flatten(1))
    torch.testing.assert_close(logits, expected)
    assert isinstance(per_term["ff"], FeatureFlow) and per_term["ff"].velocities.shape == (3, 5, 8, 4, 4)
    student.eval(), plain.eval()
    with torch.no_grad():
        deployed = student.predict(x)
        expected = plain.fc(plain.stage2(written_out_chain(bridge, plain.stage1(x), 2)).flatten(1))
        torch.testing.assert_close(deployed, expected)
        assert not torch.allclose(deployed, plain(x), atol=1e-4)  # the chain changes the student's output
    assert bridge._record is None  # predict keeps no record alive


def test_training_and_inference_unroll_the_same_chain() -> None:
    student, _ = feature_student(steps=2, eval_steps=2)
    bridge = student.bridges["ff"]
    f_s = torch.randn(3, 8, 4, 4)
    with torch.no_grad():
        trained = bridge.train()(f_s)
        inferred = bridge.eval()(f_s)
    torch.testing.assert_close(trained.flowed, inferred.flowed)
    torch.testing.assert_close(trained.velocities, inferred.velocities)
    # the recorded velocities are the chain's: the flowed map is f_s - sum(v) / n
    torch.testing.assert_close(trained.flowed, f_s - trained.velocities.sum(0) / 2)
    assert bridge.eval_steps == 2 and bridge.train().current_steps() == 2


def test_random_steps_draws_from_the_list_in_training_only() -> None:
    student, _ = feature_student(random_steps=[1, 4])
    bridge = student.bridges["ff"].train()
    counts = {bridge(torch.randn(2, 8, 4, 4)).velocities.shape[0] for _ in range(12)}
    assert counts <= {1, 4} and len(counts) == 2
    assert bridge.eval()(torch.randn(2, 8, 4, 4)).velocities.shape[0] == 2


def numpy_pkd(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """PKD written out: per-channel standardisation over (B, H, W) with the unbiased std, then MSE / 2."""
    def norm(z: np.ndarray) -> np.ndarray:
        out = np.empty_like(z)
        for c in range(z.shape[1]):
            values = z[:, c]
            out[:, c] = (values - values.mean()) / (values.std(ddof=1) + eps)
        return out

    return float(((norm(a) - norm(b)) ** 2).mean() / 2)


@pytest.mark.parametrize(("dtype", "rel"), [(torch.float32, 1e-4), (torch.float64, 1e-10)])
@pytest.mark.parametrize("stride", [1, 2])
def test_loss_equals_an_independent_computation(stride: int, dtype: torch.dtype, rel: float) -> None:
    # float64 maps meet T's float32 weights: computed in float64 (to ~1e-10, where float32 gives ~1e-6), and the
    # BatchNorm statistics are still updated in their own float32
    torch.manual_seed(1)
    loss = FMKTFeatureLoss()
    loss.setup((8, 4, 4), (6, 4 * stride, 4 * stride), 100)
    with torch.no_grad():  # non-trivial BN affine and conv weights
        loss.transform[0].weight.uniform_(0.5, 1.5)
        loss.transform[0].bias.uniform_(-0.5, 0.5)
    start, teacher = torch.randn(5, 8, 4, 4, dtype=dtype), torch.randn(5, 6, 4 * stride, 4 * stride, dtype=dtype)
    velocities = torch.randn(3, 5, 8, 4, 4, dtype=dtype)
    value = loss(FeatureFlow(start, velocities, start), teacher, torch.zeros(5, dtype=torch.long))
    assert value.dtype == dtype
    bn = loss.transform[0]
    assert bn.running_mean.dtype == torch.float32 and int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, 0.1 * teacher.float().mean(dim=(0, 2, 3)))
    # T by hand: batch-statistics BN (biased variance, eps 1e-5), then a strided 1x1 conv as a channel sum
    t = teacher.double().numpy()
    mean, var = t.mean(axis=(0, 2, 3), keepdims=True), t.var(axis=(0, 2, 3), keepdims=True)
    gamma = loss.transform[0].weight.detach().double().numpy()[None, :, None, None]
    beta = loss.transform[0].bias.detach().double().numpy()[None, :, None, None]
    normed = ((t - mean) / np.sqrt(var + 1e-5) * gamma + beta)[:, :, ::stride, ::stride]
    weight = loss.transform[1].weight.detach().double().numpy()[:, :, 0, 0]  # (C_s, C_t)
    mapped = np.zeros((5, 8, 4, 4))
    for o in range(8):
        for i in range(6):
            mapped[:, o] += weight[o, i] * normed[:, i]
    goal = start.double().numpy() - mapped
    expected = sum(numpy_pkd(v, goal) for v in velocities.double().numpy()) / 3
    assert value.item() == pytest.approx(expected, rel=rel, abs=0)


def test_loss_is_zero_at_the_exact_velocity_and_mse_option() -> None:
    start, target = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    exact = (start - target).expand(5, -1, -1, -1, -1)
    assert fmkt_feature_loss(exact, start, target).item() == pytest.approx(0.0, abs=1e-6)
    assert fmkt_feature_loss(exact, start, target, "mse").item() == pytest.approx(0.0, abs=1e-12)
    velocities = torch.randn(2, 4, 3, 2, 2)
    mse = fmkt_feature_loss(velocities, start, target, "mse")
    torch.testing.assert_close(mse, ((velocities - (start - target)) ** 2).mean())


def test_detach_student_stops_the_gradient_through_the_target_only() -> None:
    start = torch.randn(4, 3, 2, 2, requires_grad=True)
    target, velocities = torch.randn(4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2, requires_grad=True)
    fmkt_feature_loss(velocities, start, target, detach_start=True).backward()
    assert start.grad is None
    fmkt_feature_loss(velocities, start, target).backward()
    assert start.grad is not None and start.grad.abs().sum() > 0


def test_dirac_shuffle_leaves_the_teacher_tensor_untouched() -> None:
    loss = FMKTFeatureLoss(dirac_ratio=0.0)
    loss.setup((8, 4, 4), (6, 4, 4), 10)
    teacher = torch.randn(8, 6, 4, 4)
    before = teacher.clone()
    loss(FeatureFlow(torch.randn(8, 8, 4, 4), torch.randn(2, 8, 8, 4, 4), torch.zeros(1)), teacher, torch.zeros(8))
    torch.testing.assert_close(teacher, before)


def test_gradients_reach_the_encoder_the_transform_and_the_student() -> None:
    student, _ = feature_student()
    loss = FMKTFeatureLoss()
    loss.setup((8, 4, 4), (32, 4, 4), 10)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    logits, per_term = student.train()(x)
    (loss(per_term["ff"], torch.randn(4, 32, 4, 4), y) + F.cross_entropy(logits, y)).backward()
    bridge = student.bridges["ff"]
    for name, module in (("encoder", bridge.encoder), ("time", bridge.time), ("transform", loss.transform),
                         ("stage1", student.model.stage1), ("stage2", student.model.stage2)):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    trained, _ = feature_student(seed=0)
    path = tmp_path / "student.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    assert any(k.startswith("bridges.ff.encoder.") for k in load_file(str(path)))
    fresh, _ = feature_student(seed=1)
    x = torch.randn(3, 1, 8, 8)
    trained.eval(), fresh.eval()
    with torch.no_grad():
        assert not torch.allclose(fresh.predict(x), trained.predict(x))
        fresh.load_state_dict(load_file(str(path)))
        torch.testing.assert_close(fresh.predict(x), trained.predict(x))


def test_hooks_are_removed_and_do_not_leak_between_students() -> None:
    student, plain = feature_student()
    model = student.model
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(KdkitError, match="already rewritten"):
        Student(model, {"ff": "stage1"}, {"ff": BRIDGES.get("flow_feature")((8, 4, 4), None)})
    student.remove_hooks()
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))  # the plain network again
        other = Student(model, {"ff": "stage1"}, {"ff": BRIDGES.get("flow_feature")((8, 4, 4), None)})
        other(x)
    assert student.bridges["ff"]._record is None  # the removed bridge no longer runs


def test_a_deep_copy_flows_with_its_own_bridge() -> None:
    student, _ = feature_student()
    twin = copy.deepcopy(student)
    with torch.no_grad():
        twin.bridges["ff"].encoder[1].weight.zero_()  # the copy's velocity is now 0 at every step
        _, per_term = twin.eval()(torch.randn(2, 1, 8, 8))
    assert student.bridges["ff"]._record is None
    assert per_term["ff"].velocities.abs().max() == 0


def test_another_term_on_the_same_tap_sees_the_students_own_map() -> None:
    torch.manual_seed(0)
    model = build_model("cnn_student", num_classes=10, in_channels=1, image_size=8)
    bridge = BRIDGES.get("flow_feature")((8, 4, 4), None)
    student = Student(model, {"ff": "stage1", "pkd": "stage1"}, {"ff": bridge}).train()
    _, per_term = student(torch.randn(3, 1, 8, 8))
    torch.testing.assert_close(per_term["pkd"], per_term["ff"].start)
    assert not torch.allclose(per_term["pkd"], per_term["ff"].flowed)


def test_bad_taps_and_shapes_are_kdkit_errors() -> None:
    model = build_model("cnn_student", num_classes=10, in_channels=1, image_size=8)
    factory = BRIDGES.get("flow_feature")
    with pytest.raises(KdkitError, match=r"\(C, H, W\) feature map"):
        factory((784,), (10,))
    with pytest.raises(KdkitError, match="eval_steps must be >= 1"):
        factory((8, 4, 4), None, eval_steps=0)
    with pytest.raises(KdkitError, match="one intermediate student tap"):
        Student(model, {"ff": "logits"}, {"ff": factory((8, 4, 4), None)})
    with pytest.raises(KdkitError, match="both rewrite"):
        Student(model, {"a": "stage1", "b": "stage1"}, {"a": factory((8, 4, 4), None), "b": factory((8, 4, 4), None)})
    loss = FMKTFeatureLoss()
    assert "integer multiple" in loss.check_shapes((8, 4, 4), (32, 6, 6))
    assert loss.check_shapes((8, 4, 4), (32, 8, 8)) is None
    with pytest.raises(KdkitError, match="integer multiple"):
        loss.setup((8, 4, 4), (32, 3, 3), 10)


def _recipe(tiny: dict, teacher_file: Path, **term) -> Recipe:
    tiny["teacher"] = {"arch": "cnn_teacher", "checkpoint": str(teacher_file)}
    tiny["distill"] = [{"loss": "fmkt_feature", "student": "stage1", "teacher": "stage1", **term}]
    return Recipe.model_validate(tiny)


def test_plan_builds_the_term_and_requires_the_bridge(tiny: dict, teacher_file: Path) -> None:
    from kdkit.errors import RecipeErrors

    with pytest.raises(RecipeErrors, match="flow_feature"):
        plan(_recipe(copy.deepcopy(tiny), teacher_file), training=True)
    built = plan(_recipe(tiny, teacher_file, bridge="flow_feature", bridge_params={"steps": 2}), training=True)
    assert built.student.rewriting == ["fmkt_feature"]
    loss = built.objective.losses["fmkt_feature"]
    assert loss.transform[1].weight.shape == (8, 32, 1, 1)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    logits, per_term = built.student.train()(x)
    out = built.objective(logits, y, per_term, built.teacher(x))
    assert torch.isfinite(out["loss"]) and out["fmkt_feature"] > 0


@pytest.mark.slow
def test_flow_costs_include_the_feature_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    from kdkit import profile
    from kdkit.methods.fmkt.costs import flow_costs, has_flow

    monkeypatch.setattr(profile, "latency_ms", lambda *a, **k: 0.0)  # timing is not under test (and slow on CPU)

    student, plain = feature_student()
    assert has_flow(student) and not has_flow(Student(plain))
    costs = flow_costs(student.eval(), (1, 8, 8), steps=(1, 2))
    rows = costs["variants"]
    chain = sum(p.numel() for p in student.bridges["ff"].parameters())
    assert rows["fmkt_n1"]["params"] == sum(p.numel() for p in plain.parameters()) + chain
    assert rows["fmkt_n1"]["flops"] < rows["fmkt_n2"]["flops"] and "plain_theta" not in rows
    assert costs["deployed"] == "fmkt_n2" and student.bridges["ff"].eval_steps == 2  # restored


@pytest.mark.slow
def test_the_feature_variant_on_a_detector_scores_each_step_count_by_the_tasks_map(tmp_path: Path) -> None:
    from conftest import edit_recipe, tiny_det
    from kdkit.recipe import recipe_from_dict
    from kdkit.runner import run_recipe

    short = {f"distill.{i}.bridge_params": {"steps": 2, "eval_steps": 2} for i in range(2)}
    summary = run_recipe(recipe_from_dict(edit_recipe(tiny_det(tmp_path, "scenes_det/fmkt_feature"), short)))
    flow = summary["flow"]
    assert flow["metric"] == "map" and flow["deployed"] == "fmkt_n2"
    # the deployed variant is what the run evaluated last: its mAP is the run's last mAP
    assert flow["variants"]["fmkt_n2"]["map"] == pytest.approx(summary["last_map"])
    assert all("top1" not in v for v in flow["variants"].values())
