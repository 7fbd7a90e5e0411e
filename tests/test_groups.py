"""Model groups: several frozen teachers (an ensemble with per-teacher taps) and trained peers (mutual learning)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import straight_and_resumed, write_recipe
from kdkit.build import plan
from kdkit.checkpoint import pointed
from kdkit.cli import main
from kdkit.distill import PeerGroup, TeacherEnsemble
from kdkit.errors import KdkitError
from kdkit.losses.kd import kd_loss
from kdkit.losses.multi_teacher import multi_teacher_kd_loss
from kdkit.models import build_model
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe


def random_teacher(path: Path, seed: int, **params: object) -> dict:
    torch.manual_seed(seed)
    model = build_model("cnn_teacher", num_classes=10, in_channels=1, image_size=8, params=params)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return {"arch": "cnn_teacher", "params": params, "checkpoint": str(path)}


@pytest.fixture
def two_teachers(tiny: dict, tmp_path: Path) -> dict:
    tiny["teachers"] = {"narrow": random_teacher(tmp_path / "narrow.safetensors", 1),
                        "pooled": random_teacher(tmp_path / "pooled.safetensors", 2, head="pool", width=16)}
    tiny["train"]["ce_weight"] = 0.1
    return tiny


# -- the multi-teacher loss ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multi_teacher_kd_is_kl_to_the_mean_of_the_softened_teachers(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    z_s = torch.randn(6, 5, generator=gen, dtype=dtype)
    teachers = [torch.randn(6, 5, generator=gen, dtype=dtype) * 3 for _ in range(3)]
    t = 2.0
    p_bar = sum(torch.softmax(z / t, 1) for z in teachers) / 3
    q = torch.softmax(z_s / t, 1)
    expected = t * t * (p_bar * (p_bar.log() - q.log())).sum(1).mean()  # KL(p_bar || q), written out
    value = multi_teacher_kd_loss(z_s, teachers, t)
    assert value.dtype == dtype
    torch.testing.assert_close(value, expected, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)


def test_one_teacher_is_hinton_kd_and_identical_teachers_are_one() -> None:
    gen = torch.Generator().manual_seed(1)
    z_s, z_t = torch.randn(4, 7, generator=gen), torch.randn(4, 7, generator=gen)
    torch.testing.assert_close(multi_teacher_kd_loss(z_s, [z_t], 4.0), kd_loss(z_s, z_t, 4.0))
    torch.testing.assert_close(multi_teacher_kd_loss(z_s, [z_t, z_t, z_t], 4.0), kd_loss(z_s, z_t, 4.0))
    saturated = torch.tensor([[80.0, -80.0, 0.0]])  # log of a mean of near-zero probabilities stays finite
    assert torch.isfinite(multi_teacher_kd_loss(torch.zeros(1, 3), [saturated, -saturated], 1.0))


# -- several teachers ------------------------------------------------------------------------------

def test_ensemble_taps_are_the_members_and_logits_their_mean() -> None:
    torch.manual_seed(0)
    a, b = (build_model("cnn_teacher", num_classes=10, in_channels=1, image_size=8) for _ in range(2))
    ensemble = TeacherEnsemble({"a": a, "b": b}).eval()
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(ensemble(x), (a(x) + b(x)) / 2)
    assert ensemble.feature_taps["a.logits"] == "a" and ensemble.feature_taps["b.stage2"] == "b.stage2"


@pytest.mark.slow
def test_multi_teacher_recipe_trains_with_per_teacher_and_averaged_terms(two_teachers: dict) -> None:
    two_teachers["distill"] = [
        {"loss": "multi_teacher_kd", "teacher": ["narrow.logits", "pooled.logits"], "weight": 0.9},
        {"loss": "mse", "student": "stage2", "teacher": "narrow.stage2", "bridge": "conv1x1", "weight": 0.1},
        {"loss": "kd", "teacher": "logits", "weight": 0.1},  # the ensemble's mean logits
    ]
    recipe = recipe_from_dict(two_teachers)
    built = plan(recipe, training=True)
    x = torch.randn(2, 1, 8, 8)
    out = built.teacher(x)
    members = dict(built.teacher.model.named_children())
    torch.testing.assert_close(out["narrow.logits"], members["narrow"](x), rtol=1e-4, atol=1e-4)  # BN folded
    torch.testing.assert_close(out["logits"], (out["narrow.logits"] + out["pooled.logits"]) / 2)
    summary = run_recipe(recipe)
    assert summary["teacher_arch"] == "narrow:cnn_teacher + pooled:cnn_teacher"
    assert math.isfinite(summary["best_top1"])


def test_teacher_names_are_checked_before_training(two_teachers: dict, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    two_teachers["distill"] = [{"loss": "kd", "teacher": "narow.logits"}]
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", two_teachers))]) == 2
    err = capsys.readouterr().err
    assert "'narow.logits'" in err and "valid choices: narrow.logits" in err  # the closest choice, first
    both = copy.deepcopy(two_teachers)
    both["teacher"] = both["teachers"]["narrow"]
    with pytest.raises(KdkitError, match="not both"):
        recipe_from_dict(both)
    cached = copy.deepcopy(two_teachers)
    cached["teachers"]["narrow"]["cache"] = {"views": 2}
    with pytest.raises(KdkitError, match=r"teachers\.narrow\.cache"):
        recipe_from_dict(cached)


# -- trained peers (deep mutual learning) ----------------------------------------------------------

def with_peer(recipe: dict, **extra: object) -> dict:
    recipe["peers"] = {"peer": {"arch": "cnn_student", "params": {"width": 4}}}
    recipe["distill"] = [{"loss": "kd", "name": "kl_model", "teacher": "peer.logits", "temperature": 1},
                         {"loss": "kd", "name": "kl_peer", "student": "peer.logits", "teacher": "model.logits",
                          "temperature": 1}]
    recipe.update(extra)
    return recipe


def test_each_peer_learns_from_the_other_as_a_fixed_target(tiny: dict) -> None:
    built = plan(recipe_from_dict(with_peer(tiny)), training=True)
    student, objective = built.student, built.objective
    group = student.model
    assert isinstance(group, PeerGroup)
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    logits, per_term = student(x)
    comps = objective(logits, y, per_term, {})
    assert set(comps) == {"loss", "ce", "kl_model", "kl_peer", "ce@peer"}
    # KL towards the peer moves the model only: the peer's prediction is a target (detached)
    comps["kl_model"].backward()
    assert all(p.grad is None or not p.grad.any() for p in group.peer.parameters())
    assert any(p.grad is not None and p.grad.any() for p in group.model.parameters())
    # the peer's own CE is its task loss on its logits
    torch.testing.assert_close(comps["ce@peer"], F.cross_entropy(group.peer(x), y))


def test_the_deployed_peer_alone_is_evaluated(tiny: dict) -> None:
    built = plan(recipe_from_dict(with_peer(tiny, deploy="peer")), training=True)
    x = torch.randn(3, 1, 8, 8)
    student = built.student.eval()
    torch.testing.assert_close(student.predict(x), student.model.peer(x))
    logits, per_term = student.train()(x)
    assert set(built.objective(logits, torch.arange(3), per_term, {})) >= {"ce", "ce@model"}


def test_peer_names_and_deploy_are_checked(tiny: dict) -> None:
    with pytest.raises(KdkitError, match="deploy"):
        recipe_from_dict(with_peer(copy.deepcopy(tiny), deploy="peeer"))
    bad = with_peer(copy.deepcopy(tiny), distill=[])
    bad["peers"] = {"model": {"arch": "cnn_student"}}
    with pytest.raises(KdkitError, match="peer names"):
        recipe_from_dict(bad)


@pytest.mark.slow
def test_dml_run_resumes_to_identical_weights(tiny: dict, tmp_path: Path) -> None:
    straight, broken = straight_and_resumed(with_peer(tiny), tmp_path, 9)
    a = load_file(str(pointed(straight / "checkpoints", "latest") / "model.safetensors"))
    b = load_file(str(pointed(broken / "checkpoints", "latest") / "model.safetensors"))
    assert any(k.startswith("model.peer.") for k in a)  # every member is checkpointed
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- each trained network's own optimiser settings ------------------------------------------------------

def test_a_peer_with_its_own_lr_trains_in_its_own_group_under_the_shared_schedule(tiny: dict) -> None:
    from kdkit.assemble import assemble

    recipe = with_peer(tiny)
    recipe["peers"]["peer"]["optimizer"] = {"lr": 0.01, "weight_decay": 0.0}
    recipe["train"]["schedule"] = {"name": "cosine"}
    run = assemble(recipe_from_dict(recipe))
    optimizer, peer = run.engine.optimizer, run.built.student.model.peer
    own = [g for g in optimizer.param_groups if g.get("member") == "peer"]
    assert len(own) == 1 and {id(p) for p in own[0]["params"]} == {id(p) for p in peer.parameters()}
    rest = [g for g in optimizer.param_groups if "member" not in g]
    base = recipe["train"]["optimizer"].get("lr", 0.05)
    assert own[0]["weight_decay"] == 0.0 and rest[0]["weight_decay"] > 0
    ratio = own[0]["lr"] / rest[0]["lr"]
    assert math.isclose(ratio, 0.01 / base)
    for _ in range(3):  # the schedule moves both groups by the same factor
        optimizer.step()
        run.engine.scheduler.step()
    assert rest[0]["lr"] < base and math.isclose(own[0]["lr"] / rest[0]["lr"], ratio)


def test_member_groups_must_partition_the_parameters(tiny: dict) -> None:
    from kdkit.assemble import assemble, member_groups

    recipe = with_peer(tiny)
    recipe["peers"]["peer"]["optimizer"] = {"lr": 0.01}
    parsed = recipe_from_dict(recipe)
    built = plan(parsed, training=True)
    groups = member_groups(parsed, built)
    assert groups is not None and [g.get("member") for g in groups] == ["peer", None]
    groups[1]["params"] = groups[1]["params"][1:]  # one parameter of `model` in no group
    with pytest.raises(KdkitError, match="exactly once"):
        from kdkit.engine import _check_partition

        _check_partition([*built.student.parameters(), *built.objective.parameters()], groups)
    assert member_groups(recipe_from_dict(with_peer(copy.deepcopy(tiny))), built) is None
    assemble(parsed, built=built)  # the groups the assembler makes pass the engine's check


def test_member_optimizer_keys_are_checked(tiny: dict) -> None:
    alone = copy.deepcopy(tiny)
    alone["model"]["optimizer"] = {"lr": 0.01}
    with pytest.raises(KdkitError, match=r"without `peers:` set train\.optimizer"):
        recipe_from_dict(alone)
    wrong = with_peer(copy.deepcopy(tiny))
    wrong["peers"]["peer"]["optimizer"] = {"betas": [0.9, 0.99]}
    with pytest.raises(KdkitError, match=r"peers.peer.optimizer.betas does not apply to .*'sgd'"):
        recipe_from_dict(wrong)
    unknown = with_peer(copy.deepcopy(tiny))
    unknown["peers"]["peer"]["optimizer"] = {"lrr": 0.01}
    with pytest.raises(KdkitError, match="lrr"):
        recipe_from_dict(unknown)


def test_unset_member_optimizers_leave_the_digest_alone(tiny: dict) -> None:
    plain = recipe_from_dict(with_peer(copy.deepcopy(tiny)))
    assert "optimizer" not in plain.to_dict()["model"] and "optimizer" not in plain.to_dict()["peers"]["peer"]
    tuned = with_peer(copy.deepcopy(tiny))
    tuned["peers"]["peer"]["optimizer"] = {"lr": 0.01}
    assert recipe_from_dict(tuned).digest() != plain.digest()
