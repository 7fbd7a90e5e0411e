"""FM-KT's flow bridge: schedules, meta-encoders, the Euler chain, deployment and checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kdkit.bridges import BRIDGES
from kdkit.distill import Student
from kdkit.errors import KdkitError
from kdkit.methods.fmkt import SCHEDULES, FlowBridge, FlowEstimates, build_encoder, get_schedule, sinusoidal
from kdkit.models import build_model


def make_bridge(**params) -> FlowBridge:
    torch.manual_seed(0)
    return BRIDGES.get("flow")((6, 4, 4), (5,), **params)


# -- schedules ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_start_at_the_teacher(name: str) -> None:
    s = get_schedule(name)
    assert s.alpha(0.0) == pytest.approx(1.0, abs=1e-12) and s.beta(0.0) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", ["rectified", "vp"])
def test_interpolating_schedules_end_at_the_student(name: str) -> None:
    s = get_schedule(name)
    assert s.alpha(1.0) == pytest.approx(0.0, abs=1e-12) and s.beta(1.0) == pytest.approx(1.0, abs=1e-12)


def test_vp_preserves_variance_and_ve_never_scales_the_signal() -> None:
    vp, ve = get_schedule("vp"), get_schedule("ve")
    for t in (0.0, 0.13, 0.5, 0.77, 1.0):
        assert vp.alpha(t) ** 2 + vp.beta(t) ** 2 == pytest.approx(1.0)
        assert ve.alpha(t) == 1.0
    assert ve.beta(1.0) == pytest.approx(1.0)  # sigma_max
    assert all(ve.beta(a) < ve.beta(b) for a, b in ((0.1, 0.2), (0.5, 0.6), (0.9, 1.0)))


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_derivatives_match_finite_differences(name: str) -> None:
    s, h = get_schedule(name), 1e-6
    for t in (0.1, 0.4, 0.9):
        assert s.d_alpha(t) == pytest.approx((s.alpha(t + h) - s.alpha(t - h)) / (2 * h), rel=1e-5, abs=1e-7)
        assert s.d_beta(t) == pytest.approx((s.beta(t + h) - s.beta(t - h)) / (2 * h), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_estimate_recovers_the_teacher_end_from_the_exact_velocity(name: str) -> None:
    # On the interpolant Z_t = a Z_0 + b Z_1 with its true velocity, the general formula is exact.
    s = get_schedule(name)
    z0, z1 = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    for t in (0.25, 0.6, 1.0):
        z_t = s.alpha(t) * z0 + s.beta(t) * z1
        v = s.d_alpha(t) * z0 + s.d_beta(t) * z1
        torch.testing.assert_close(s.estimate(z_t, v, t), z0)


def test_rectified_estimate_is_z_t_minus_t_v() -> None:
    z, v = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(get_schedule("rectified").estimate(z, v, 0.375), z - 0.375 * v)


def test_unknown_schedule_lists_the_choices() -> None:
    with pytest.raises(KdkitError, match=r"unknown flow schedule 'vpp'.*vp"):
        get_schedule("vpp")


# -- encoders and time embedding ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["conv", "mlp", "transformer"])
def test_encoders_keep_the_map_shape(name: str) -> None:
    enc = build_encoder(name, 8, heads=2)
    assert enc(torch.randn(2, 8, 5, 3)).shape == (2, 8, 5, 3)


def test_transformer_heads_must_divide_channels() -> None:
    with pytest.raises(KdkitError, match="3 heads do not divide 8 channels"):
        build_encoder("transformer", 8, heads=3)


def test_sinusoidal_features() -> None:
    t = torch.tensor([0.0, 0.5])
    out = sinusoidal(t, 5)
    freqs = [math.exp(-math.log(10000.0) * k / 2) for k in range(2)]
    expected = [[math.cos(x * f) for f in freqs] + [math.sin(x * f) for f in freqs] + [0.0] for x in (0.0, 0.5)]
    torch.testing.assert_close(out, torch.tensor(expected))


# -- the chain ------------------------------------------------------------------------------------

def test_one_rectified_step_is_the_closed_form() -> None:
    bridge = make_bridge()
    f_s = torch.randn(3, 6, 4, 4)
    v = bridge.encoder(f_s + bridge.time(1.0, f_s))
    expected = bridge.head(f_s - v)  # methods.md: z0 = head(f_s - v) at the first step
    torch.testing.assert_close(bridge.unroll(f_s, 1), expected[None])


def reference_chain(bridge: FlowBridge, f_s: torch.Tensor, n: int, anchor: str) -> torch.Tensor:
    """The chain written out for rectified flow: z0_i = x_i - t_i v_i (or f_s - v_i), x_{i-1} = x_i - v_i / n."""
    x, outs = f_s.clone(), []
    for i in reversed(range(1, n + 1)):
        t = i / n
        emb = bridge.time.mlp(sinusoidal(torch.tensor([t]), 6)).view(1, 6, 1, 1)
        v = bridge.encoder(x + emb)
        outs.append(bridge.head(x - t * v if anchor == "z_t" else f_s - v))
        x = x - v * (1.0 / n)
    return torch.stack(outs)


@pytest.mark.parametrize("anchor", ["z_t", "student"])
def test_unroll_matches_a_written_out_chain(anchor: str) -> None:
    bridge = make_bridge(anchor=anchor)
    f_s = torch.randn(2, 6, 4, 4)
    torch.testing.assert_close(bridge.unroll(f_s, 3), reference_chain(bridge, f_s, 3, anchor))


def test_training_and_inference_unroll_the_same_chain() -> None:
    bridge = make_bridge(steps=4, eval_steps=4)
    f_s = torch.randn(3, 6, 4, 4)
    trained = bridge.train()(f_s)
    evaluated = bridge.eval()(f_s)
    assert trained.steps.shape == (4, 3, 5)
    torch.testing.assert_close(trained.steps, evaluated.steps)
    assert bridge.eval()(f_s).steps.shape[0] == 4 and make_bridge(eval_steps=2).eval()(f_s).steps.shape[0] == 2


def test_bad_bridge_shapes_and_steps_are_kdkit_errors() -> None:
    factory = BRIDGES.get("flow")
    with pytest.raises(KdkitError, match="teacher tap must be"):
        factory((6, 4, 4), (6, 4, 4))
    with pytest.raises(KdkitError, match="steps must be >= 1"):
        factory((6, 4, 4), (5,), steps=0)


# -- deployment (Student) ---------------------------------------------------------------------------

def flow_student(theta: bool = False, seed: int = 0) -> Student:
    torch.manual_seed(seed)
    model = build_model("cnn_student", num_classes=10, in_channels=1, image_size=8)
    bridge = BRIDGES.get("flow")((16, 2, 2), (10,), steps=3, eval_steps=2, theta=theta)
    return Student(model, {"fmkt": "stage2"}, {"fmkt": bridge})


def test_forward_returns_the_ensemble_and_predict_runs_the_inference_chain() -> None:
    student = flow_student()
    x = torch.randn(4, 1, 8, 8)
    logits, per_term = student.train()(x)
    out = per_term["fmkt"]
    assert isinstance(out, FlowEstimates) and out.steps.shape == (3, 4, 10) and out.plain is None
    torch.testing.assert_close(logits, out.steps.mean(0))
    student.eval()
    with torch.no_grad():
        deployed = student.predict(x)
        f_s = student.model.stage2(student.model.stage1(x))
        expected = student.bridges["fmkt"].unroll(f_s, 2).mean(0)
    torch.testing.assert_close(deployed, expected)


def test_predict_stops_the_model_at_the_tap() -> None:
    student = flow_student().eval()
    calls = []
    student.model.fc.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        student.predict(torch.randn(2, 1, 8, 8))
    assert calls == []  # the plain classifier is not part of the deployed FM-KT student


def test_theta_deploys_the_plain_student() -> None:
    student = flow_student(theta=True)
    x = torch.randn(4, 1, 8, 8)
    logits, per_term = student.train()(x)
    torch.testing.assert_close(logits, student.model(x))
    torch.testing.assert_close(per_term["fmkt"].plain, logits)
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(student.predict(x), student.model(x))


def test_two_deploying_bridges_are_refused() -> None:
    model = build_model("cnn_student", num_classes=10, in_channels=1, image_size=8)
    factory = BRIDGES.get("flow")
    with pytest.raises(KdkitError, match="only one can be the deployed head"):
        Student(model, {"a": "stage2", "b": "stage2"},
                {"a": factory((16, 2, 2), (10,)), "b": factory((16, 2, 2), (10,))})


def test_save_and_load_round_trip_the_bridge(tmp_path: Path) -> None:
    trained = flow_student(seed=0).eval()
    path = tmp_path / "student.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    assert any(k.startswith("bridges.fmkt.encoder.") for k in load_file(str(path)))
    fresh = flow_student(seed=1).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(fresh.predict(x), trained.predict(x))
        fresh.load_state_dict(load_file(str(path)))
        torch.testing.assert_close(fresh.predict(x), trained.predict(x))


def test_gradients_reach_the_meta_encoder_and_the_student() -> None:
    student = flow_student().train()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    _, per_term = student(x)
    F.cross_entropy(per_term["fmkt"].steps.flatten(0, 1), y.repeat(3)).backward()
    bridge = student.bridges["fmkt"]
    for name, module in (("encoder", bridge.encoder), ("time", bridge.time), ("head", bridge.head),
                         ("stage1", student.model.stage1)):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name
    assert student.model.fc.weight.grad is None  # the unused plain head gets nothing without Theta


# -- cost of the deployed student ----------------------------------------------------------------------

def test_flops_are_measured() -> None:
    from kdkit.profile import count_flops

    assert count_flops(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)), (3, 2, 2)) == 2 * 12 * 5


@pytest.mark.slow
def test_flow_costs_count_the_chain_and_not_the_unused_classifier() -> None:
    from kdkit.methods.fmkt.costs import flow_costs

    student = flow_student().eval()
    costs = flow_costs(student, (1, 8, 8), steps=(1, 2))
    rows = costs["variants"]
    model, bridge = student.model, student.bridges["fmkt"]
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("fc."))
    assert rows["fmkt_n1"]["params"] == backbone + sum(p.numel() for p in bridge.parameters())
    assert rows["plain_theta"]["params"] == sum(p.numel() for p in model.parameters())  # fc runs here
    assert rows["fmkt_n1"]["flops"] < rows["fmkt_n2"]["flops"]
    assert costs["deployed"] == "fmkt_n2" and bridge.eval_steps == 2 and not bridge.theta  # restored


def test_flatten_head_reads_the_whole_map() -> None:
    bridge = BRIDGES.get("flow")((4, 3, 3), (10,), head="flatten", steps=2, eval_steps=2)
    linear = bridge.head[-1]
    assert linear.in_features == 4 * 3 * 3 and linear.out_features == 10
    f_s = torch.randn(5, 4, 3, 3)
    out = bridge(f_s).steps
    assert out.shape == (2, 5, 10)
    # unlike the pooled head, it tells apart maps with the same channel means
    shuffled = f_s.flip(-1)
    assert not torch.allclose(bridge.head(f_s), bridge.head(shuffled))
    pooled = BRIDGES.get("flow")((4, 3, 3), (10,), head="pool")
    assert torch.allclose(pooled.head(f_s), pooled.head(shuffled), atol=1e-6)
