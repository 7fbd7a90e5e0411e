"""DOT (Distillation-Oriented Trainer, Zhao et al., ICCV 2023): the update rule, exactly; how the engine feeds it
the supervised and distillation gradients from one forward pass; the recipe keys and their bad values."""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdkit
from conftest import write_recipe
from kdkit.assemble import assemble
from kdkit.cli import main
from kdkit.data.loader import BatchLoader
from kdkit.distill import Objective, Student, Term
from kdkit.engine import Engine
from kdkit.errors import KdkitError, RecipeErrors
from kdkit.losses import LOSSES
from kdkit.optimizers import DISTILLATION, DOT
from kdkit.recipe import TrainSpec, recipe_from_dict
from kdkit.schedule import optimizer_factory

ROOT = Path(__file__).resolve().parents[1]
LR, BETA, DELTA = 0.1, 0.9, 0.075


class Net(nn.Module):
    """A body both losses reach, a head only the supervised loss reads (``aux``) and a bridge only the distillation
    loss reads: every kind of parameter DOT distinguishes."""

    def __init__(self, bridge: bool = True, aux: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(6, 5), nn.Linear(5, 3)
        self.aux = nn.Linear(5, 3) if aux else None
        self.bridge = nn.Linear(5, 4) if bridge else None
        self.double()

    def losses(self, x: Tensor, y: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(supervised, distillation) on one batch, from one forward pass."""
        h = torch.tanh(self.body(x))
        logits = self.head(h)
        supervised = F.cross_entropy(logits, y)
        if self.aux is not None:
            supervised = supervised + F.cross_entropy(self.aux(h), y)
        distill = F.kl_div(F.log_softmax(logits / 4, 1), F.softmax(t / 4, 1), reduction="batchmean")
        if self.bridge is not None:
            distill = distill + self.bridge(h).pow(2).mean()
        return supervised, distill


def batches(steps: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen),
             torch.randn(8, 3, generator=gen, dtype=torch.float64)) for _ in range(steps)]


def dot_steps(net: Net, optimizer: DOT, data: list[tuple[Tensor, Tensor, Tensor]]) -> None:
    """What the engine does per step: the distillation part's backward (graph kept), handed over, then the
    supervised part's, then the update."""
    for x, y, t in data:
        supervised, distill = net.losses(x, y, t)
        optimizer.zero_grad(set_to_none=True)
        distill.backward(retain_graph=True)
        optimizer.take_part(DISTILLATION)
        supervised.backward()
        optimizer.step()


def reference_steps(net: Net, groups: list[dict], data: list[tuple[Tensor, Tensor, Tensor]]) -> None:
    """The paper's update as mdistiller's code computes it, written out: per parameter p with supervised gradient
    g_s and distillation gradient g_d (either may be absent),

        v_s <- (beta - delta) v_s + (1 - d)(g_s + wd p)     if p also has g_d, else with momentum beta
        p   <- p - lr v_s
        v_d <- (beta + delta) v_d + (1 - d) g_d             if p also has g_s, else beta v_d + (1 - d)(g_d + wd p)
        p   <- p - lr v_d

    where each buffer starts as its first (decayed, for v_s) gradient, and a distillation-only parameter's first
    step has no weight decay (mdistiller's code)."""
    v_s: dict[int, Tensor] = {}
    v_d: dict[int, Tensor] = {}
    for x, y, t in data:
        supervised, distill = net.losses(x, y, t)
        for group in groups:
            params = group["params"]
            g_s = torch.autograd.grad(supervised, params, retain_graph=True, allow_unused=True)
            g_d = torch.autograd.grad(distill, params, retain_graph=True, allow_unused=True)
            beta, delta, wd, damp, lr = (group[k] for k in ("momentum", "delta", "weight_decay", "dampening", "lr"))
            plain = ((beta + delta) + (beta - delta)) / 2
            with torch.no_grad():
                for p, gs, gd in zip(params, g_s, g_d, strict=True):
                    if gs is not None:
                        u = gs + wd * p if wd else gs
                        if id(p) not in v_s:
                            v_s[id(p)] = u.clone()
                        else:
                            v_s[id(p)] = (beta - delta if gd is not None else plain) * v_s[id(p)] + (1 - damp) * u
                        p -= lr * v_s[id(p)]
                    if gd is not None:
                        if id(p) not in v_d:
                            v_d[id(p)] = gd.clone()
                        elif gs is not None:
                            v_d[id(p)] = (beta + delta) * v_d[id(p)] + (1 - damp) * gd
                        else:
                            v_d[id(p)] = plain * v_d[id(p)] + (1 - damp) * (gd + wd * p if wd else gd)
                        p -= lr * v_d[id(p)]


def two_groups(net: Net) -> list[dict]:
    """The body and bridge in one group, the heads in another with their own lr, delta and weight decay."""
    return [{"params": [*net.body.parameters(), *net.bridge.parameters()], "lr": LR, "momentum": BETA,
             "delta": DELTA, "weight_decay": 5e-4, "dampening": 0.1},
            {"params": [*net.head.parameters(), *net.aux.parameters()], "lr": 0.05, "momentum": 0.8, "delta": 0.1,
             "weight_decay": 1e-2, "dampening": 0.0}]


def test_dot_matches_the_papers_update_written_out_with_groups_and_one_sided_parameters() -> None:
    ours, theirs = Net(), Net()
    data = batches(30)
    dot_steps(ours, DOT(two_groups(ours), lr=LR), data)
    reference_steps(theirs, two_groups(theirs), data)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), name
    assert any(not torch.equal(a, b) for a, b in zip(ours.parameters(), Net().parameters(), strict=True))


def test_dot_with_delta_zero_is_sgd_with_momentum_on_the_summed_loss() -> None:
    # no distillation-only parameter: the first step of one skips weight decay in DOT (mdistiller's code), not in SGD
    dot_net, sgd_net = Net(bridge=False), Net(bridge=False)
    data = batches(30)
    dot_steps(dot_net, DOT(dot_net.parameters(), lr=LR, momentum=BETA, delta=0.0, weight_decay=5e-4), data)
    sgd = torch.optim.SGD(sgd_net.parameters(), lr=LR, momentum=BETA, weight_decay=5e-4)
    for x, y, t in data:
        sgd.zero_grad()
        sum(sgd_net.losses(x, y, t)).backward()
        sgd.step()
    for (name, a), b in zip(dot_net.named_parameters(), sgd_net.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), name
    moved = DOT(Net(bridge=False).parameters(), lr=LR, momentum=BETA, delta=DELTA, weight_decay=5e-4)
    other = Net(bridge=False)
    dot_steps(other, moved, data)  # a positive delta does change the trajectory
    assert not torch.allclose(other.body.weight, sgd_net.body.weight, rtol=0, atol=1e-6)


def zero_gradient_steps(p: nn.Parameter, optimizer: DOT, steps: int, supervised: bool, distill: bool) -> None:
    """Steps where ``p`` gets an all-zero gradient from the parts asked for: only weight decay moves it."""
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        if distill:
            (0 * p).sum().backward()
        optimizer.take_part(DISTILLATION)
        if supervised:
            (0 * p).sum().backward()
        optimizer.step()


@pytest.mark.parametrize(("supervised", "distill"), [(True, True), (True, False), (False, True)])
def test_weight_decay_is_applied_once_per_step(supervised: bool, distill: bool) -> None:
    wd = 0.01
    p = nn.Parameter(torch.ones(3, dtype=torch.float64))
    optimizer = DOT([p], lr=LR, momentum=BETA, delta=DELTA, weight_decay=wd)
    zero_gradient_steps(p, optimizer, 1, supervised, distill)
    # once: p (1 - lr wd); twice would be p (1 - 2 lr wd). A distillation-only parameter's first step has none
    # (mdistiller's code starts its buffer from the bare gradient); its second step decays it once.
    first = 1.0 if not supervised else 1 - LR * wd
    assert torch.allclose(p, torch.full_like(p, first), rtol=0, atol=1e-15)
    zero_gradient_steps(p, optimizer, 1, supervised, distill)
    momentum = BETA - DELTA if distill else BETA  # the supervised buffer's, with both parts or only one
    decay = (momentum * (1 - first) / LR + wd * first) if supervised else wd * first
    assert torch.allclose(p, torch.full_like(p, first - LR * decay), rtol=0, atol=1e-15)


def test_state_dict_round_trip_continues_the_same_trajectory() -> None:
    data = batches(20)
    straight = Net()
    optimizer = DOT(two_groups(straight), lr=LR)
    dot_steps(straight, optimizer, data)
    halted = Net()
    first = DOT(two_groups(halted), lr=LR)
    dot_steps(halted, first, data[:10])
    buffer = io.BytesIO()
    torch.save({"model": halted.state_dict(), "optimizer": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = Net()
    resumed.load_state_dict(saved["model"])
    second = DOT(two_groups(resumed), lr=LR)
    second.load_state_dict(saved["optimizer"])
    assert {k for s in second.state.values() for k in s} == {"momentum_buffer", "momentum_kd_buffer"}
    dot_steps(resumed, second, data[10:])
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(("settings", "message"), [
    ({"delta": 0.9}, r"delta 0.9 is outside \[0, momentum\) = \[0, 0.9\)"),
    ({"delta": -0.1}, r"delta -0.1 is outside \[0, momentum\)"),
    ({"delta": 0.15}, r"momentum \+ delta = 0.9 \+ 0.15 is not below 1.*fix: lower delta below 0.1"),
    ({"dampening": 1.0}, r"dampening 1.0 is outside \[0.0, 1.0\)"),
])
def test_bad_settings_of_a_group_are_refused_naming_the_value_and_range(settings: dict, message: str) -> None:
    net = Net()
    with pytest.raises(KdkitError, match=message):
        DOT([{"params": list(net.head.parameters()), **settings}, {"params": list(net.body.parameters())}], lr=LR)
    with pytest.raises(KdkitError, match=r"parameter group 1: " + message):
        DOT([{"params": list(net.body.parameters())}, {"params": list(net.head.parameters()), **settings}], lr=LR)


# -- the engine ---------------------------------------------------------------------------------------------


@pytest.fixture
def dot_kd(tiny_kd: dict) -> dict:
    recipe = copy.deepcopy(tiny_kd)
    recipe["train"]["optimizer"] = {"name": "dot", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
    recipe["train"]["epochs"] = 1
    return recipe


def counted(module: nn.Module) -> list[int]:
    """A list that gains one item per forward of ``module``."""
    calls: list[int] = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_the_engine_gives_dot_each_parts_gradient_from_one_forward(dot_kd: dict) -> None:
    run = assemble(recipe_from_dict(dot_kd, ["train.schedule.name=constant", "train.schedule.warmup_steps=0"]))
    engine, student, objective, teacher = run.engine, run.built.student, run.built.objective, run.built.teacher
    assert isinstance(engine.optimizer, DOT) and engine.optimizer.param_groups[0]["delta"] == 0.075
    x, y, index = next(iter(engine.train_loader.epoch(0)))
    # the expected update: each part's gradient by autograd, on a copy of the student, fed to a second DOT
    twin, initial = copy.deepcopy(student), copy.deepcopy(student)
    twin_dot = DOT(twin.parameters(), lr=0.05, momentum=0.9, delta=0.075, weight_decay=5e-4)
    forwards, teacher_forwards = counted(student.model), counted(teacher)
    for _ in range(3):
        logits, per_term = twin(x)
        comps = objective(logits, engine.task.targets(y, index, "train"), per_term, teacher(x, index, 0), 0.0, index)
        assert set(comps) == {"loss", "ce", "kd"}
        params = [p for p in twin.parameters() if p.requires_grad]
        twin_dot.zero_grad(set_to_none=True)
        for p, g in zip(params, torch.autograd.grad(0.9 * comps["kd"], params, retain_graph=True), strict=True):
            p.grad = g
        twin_dot.take_part(DISTILLATION)
        for p, g in zip(params, torch.autograd.grad(0.1 * comps["ce"], params), strict=True):
            p.grad = g
        twin_dot.step()
        seen, taught = len(forwards), len(teacher_forwards)
        engine.step(x, y, index)
        assert (len(forwards) - seen, len(teacher_forwards) - taught) == (1, 1)  # one forward each, not two
    for (name, a), b in zip(student.named_parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name
    assert not torch.allclose(student.model.fc.weight, initial.model.fc.weight, rtol=0, atol=1e-4)  # it trained
    assert {k for s in engine.optimizer.state.values() for k in s} == {"momentum_buffer", "momentum_kd_buffer"}


def test_a_dot_run_trains_and_resumes_to_the_same_weights(dot_kd: dict, tmp_path: Path) -> None:
    dot_kd["train"]["epochs"] = 2
    straight = assemble(recipe_from_dict(dot_kd, [f"output.dir={tmp_path / 'straight'}"]),
                        run_dir=tmp_path / "straight")
    straight.engine.fit()
    halted = assemble(recipe_from_dict(dot_kd), run_dir=tmp_path / "halted")
    halted.engine.epochs = 1  # stops after epoch 1 with its checkpoint, like a killed run
    halted.engine.fit()
    resumed = assemble(recipe_from_dict(dot_kd), run_dir=tmp_path / "halted")
    resumed.engine.fit(resume=True)
    a, b = straight.built.student.state_dict(), resumed.built.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.fc.weight"], halted.built.student.state_dict()["model.fc.weight"])


@pytest.mark.parametrize("amp", ["bf16"])
def test_dot_trains_under_autocast(dot_kd: dict, amp: str) -> None:
    run = assemble(recipe_from_dict(dot_kd, [f"train.amp={amp}"]))
    before = copy.deepcopy(run.built.student.state_dict())
    x, y, index = next(iter(run.engine.train_loader.epoch(0)))
    for _ in range(2):
        comps, _, _ = run.engine.step(x, y, index)
    assert all(torch.isfinite(v).all() for v in comps.values())
    after = run.built.student.state_dict()
    assert not torch.equal(before["model.fc.weight"], after["model.fc.weight"])
    assert all(torch.isfinite(v).all() for v in after.values())


def test_dot_reads_the_teacher_cache(cached: dict) -> None:
    cached["train"]["optimizer"] = {"name": "dot", "lr": 0.05}
    cached["train"]["epochs"] = 1
    path = write_recipe(Path(cached["output"]["dir"]).parent / "dot_cached.yaml", cached)
    assert main(["run", str(path)]) == 0


def test_the_engine_names_no_optimiser_or_method() -> None:
    source = (ROOT / "src" / "kdkit" / "engine.py").read_text()
    assert not re.search(r"\bdot\b|\bDOT\b|delta|momentum_kd", source, re.IGNORECASE)


def engine_with(objective: Objective, amp: str = "off") -> Engine:
    """An engine on a tiny linear student and random data, with DOT and ``objective``."""
    images, labels = torch.randint(0, 256, (32, 1, 4, 4), dtype=torch.uint8), torch.arange(32) % 2
    loader = BatchLoader(images, labels, batch_size=8, mean=(0.5,), std=(0.25,))
    return Engine(student=Student(nn.Sequential(nn.Flatten(), nn.Linear(16, 2))), objective=objective,
                  train_loader=loader, eval_loader=loader, epochs=1, amp=amp, progress=False,
                  make_optimizer=optimizer_factory(TrainSpec(epochs=1, optimizer={"name": "dot"})),
                  task=kdkit.TASKS.get("classification").bind(None, "cpu"))


def kd_term() -> Term:
    return Term("kd", LOSSES.get("kd")(temperature=4), "logits", "logits")


def test_the_engine_refuses_an_objective_without_a_part_the_optimiser_needs() -> None:
    assert isinstance(engine_with(Objective([kd_term()])).optimizer, DOT)
    with pytest.raises(KdkitError, match=r"optimiser DOT backpropagates the loss's distillation and supervised "
                                         r"parts separately, and this objective has no distillation part"):
        engine_with(Objective())
    with pytest.raises(KdkitError, match=r"this objective has no supervised part.*fix: give the supervised loss a "
                                         r"weight above 0"):
        engine_with(Objective([kd_term()], ce_weight=0))


def test_the_engine_refuses_dot_with_fp16s_gradient_scaler() -> None:
    with pytest.raises(KdkitError, match=r"fp16's gradient scaler does not support; valid choices: bf16, off"):
        engine_with(Objective([kd_term()]), amp="fp16")


# -- recipes --------------------------------------------------------------------------------------------------


def problems_of(recipe: dict, *overrides: str) -> str:
    with pytest.raises(RecipeErrors) as info:
        recipe_from_dict(recipe, list(overrides))
    return str(info.value)


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r["train"]["optimizer"].update(delta=0.95),
     r"train.optimizer: .*delta 0.95 is outside \[0, momentum\) = \[0, 0.9\).*use e.g. delta: 0.075"),
    (lambda r: r["train"]["optimizer"].update(delta=0.2), r"momentum \+ delta = 0.9 \+ 0.2 is not below 1"),
    (lambda r: r["train"]["optimizer"].update(nesterov=True), r"dot has no Nesterov variant"),
    (lambda r: r["train"]["optimizer"].update(name="sgd", delta=0.1),
     r"delta 0.1 is a setting of dot, not of 'sgd'; remove delta or set name: dot"),
    (lambda r: (r.pop("distill"), r.pop("teacher")), r"dot needs distillation terms .* `distill:` is empty"),
    (lambda r: r["train"].update(ce_weight=0), r"dot needs the supervised loss .* train.ce_weight is 0"),
    (lambda r: r["train"].update(amp="fp16"), r"fp16's gradient scaler does not support: use train.amp: bf16"),
])
def test_bad_dot_recipes_are_refused_before_training(dot_kd: dict, change: Callable[[dict], object],
                                                     message: str) -> None:
    change(dot_kd)
    assert re.search(message, problems_of(dot_kd))


def test_bad_dot_recipe_exits_2_naming_the_value_range_and_fix(dot_kd: dict, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = write_recipe(tmp_path / "dot.yaml", dot_kd)
    assert main(["run", str(path), "train.optimizer.delta=0.9"]) == 2
    err = capsys.readouterr().err
    assert "train.optimizer" in err and "delta 0.9 is outside [0, momentum) = [0, 0.9)" in err and "delta: 0.075" in err
    assert not (Path(dot_kd["output"]["dir"]) / "checkpoints").exists()


def test_dot_delta_defaults_to_the_papers_and_leaves_other_digests_alone(dot_kd: dict, tiny_kd: dict) -> None:
    assert recipe_from_dict(dot_kd).train.optimizer.delta == 0.075
    assert recipe_from_dict(dot_kd).to_dict()["train"]["optimizer"]["delta"] == 0.075
    assert "delta" not in recipe_from_dict(tiny_kd).to_dict()["train"]["optimizer"]


def test_a_peers_own_delta_is_checked_and_becomes_its_group(dot_kd: dict) -> None:
    dot_kd["peers"] = {"peer": {"arch": "cnn_student", "optimizer": {"delta": 0.05}}}
    run = assemble(recipe_from_dict(dot_kd))
    assert sorted(g["delta"] for g in run.engine.optimizer.param_groups) == [0.05, 0.075]
    dot_kd["peers"]["peer"]["optimizer"] = {"momentum": 0.5, "delta": 0.6}
    assert "peers.peer.optimizer: delta 0.6 is outside [0, momentum) = [0, 0.5)" in problems_of(dot_kd)
    dot_kd["train"]["optimizer"] = {"name": "sgd"}
    dot_kd["peers"]["peer"]["optimizer"] = {"delta": 0.05}
    assert "peers.peer.optimizer.delta does not apply to train.optimizer.name 'sgd'" in problems_of(dot_kd)
