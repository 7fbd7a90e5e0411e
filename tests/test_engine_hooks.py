"""The engine's public surface, on objects built directly (no recipe): chained hooks, phases, checkpointed state,
extra parameter groups, the caller's resume policy, autocast."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import kdkit
from kdkit.checkpoint import pointed
from kdkit.data.loader import BatchLoader
from kdkit.engine import BatchTransform, Engine, Hooks, Phase
from kdkit.errors import KdkitError

CLASSES = 10  # room for labels rewritten by the transforms below (0/1 -> up to 4)
BATCH, SAMPLES = 8, 24  # 3 steps per epoch


def tiny_engine(*, hooks: Sequence[Hooks] = (), epochs: int = 2, run_dir: Path | None = None, amp: str = "off",
                **kwargs: Any) -> Engine:
    """An engine over a linear student on 24 random 1x4x4 images with labels 0/1.

    Args:
        hooks: The engine's hooks.
        epochs: Epochs to train.
        run_dir: Where checkpoints go (``None``: no files).
        amp: The autocast mode.
        **kwargs: Further :class:`Engine` arguments (``check_resume``, ``run_info``, ...).

    Returns:
        The engine; the same seed gives the same student, data and order every call.
    """
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (SAMPLES, 1, 4, 4), dtype=torch.uint8, generator=gen)
    labels = torch.arange(SAMPLES) % 2
    norm = {"mean": (0.5,), "std": (0.25,)}
    train = BatchLoader(images, labels, batch_size=BATCH, **norm)
    test = BatchLoader(images, labels, batch_size=SAMPLES, shuffle=False, drop_last=False, **norm)
    student = kdkit.Student(nn.Sequential(nn.Flatten(), nn.Linear(16, CLASSES)))
    make_optimizer = kdkit.optimizer_factory(kdkit.TrainSpec(epochs=epochs, batch_size=BATCH))
    task = kdkit.TASKS.get("classification").bind(None, "cpu")  # the labels are the targets: no data needed
    return Engine(student=student, objective=kdkit.Objective(), train_loader=train, eval_loader=test, epochs=epochs,
                  make_optimizer=make_optimizer, run_dir=run_dir, progress=False, hooks=hooks, amp=amp, task=task,
                  **kwargs)


def latest_weights(run_dir: Path) -> dict[str, Tensor]:
    """The tensors of the run's latest checkpoint (``model.safetensors``).

    Args:
        run_dir: The engine's run folder.
    """
    return load_file(str(pointed(run_dir / "checkpoints", "latest") / "model.safetensors"))


def record_steps(engine: Engine, seen: list[Tensor]) -> None:
    """Wrap ``engine.step`` so the labels of every step are appended to ``seen`` (the step still runs).

    Args:
        engine: The engine whose instance attribute ``step`` is replaced.
        seen: Receives a copy of each step's labels.
    """
    step = engine.step

    def recording(x: Tensor, y: Tensor, index: Tensor, view: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
        seen.append(y.clone())
        return step(x, y, index, view)

    engine.step = recording  # train_step looks `step` up on the instance


# -- batch transforms ------------------------------------------------------------------------------

def add_one(engine: Engine, x: Tensor, y: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A batch transform that adds 1 to the labels (so its place in the chain shows in the result)."""
    return x, y + 1, index


def double(engine: Engine, x: Tensor, y: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A batch transform that doubles the labels."""
    return x, y * 2, index


@pytest.mark.parametrize(("order", "expected"), [((add_one, double), lambda y: (y + 1) * 2),
                                                 ((double, add_one), lambda y: y * 2 + 1)])
def test_batch_transforms_of_several_hooks_chain_in_order(order: tuple[BatchTransform, ...],
                                                          expected: Callable[[Tensor], Tensor]) -> None:
    # one transform per Hooks: the chain runs across hooks, in the order they are given
    engine = tiny_engine(hooks=[Hooks(batch_transforms=[t]) for t in order])
    seen: list[Tensor] = []
    record_steps(engine, seen)
    x, y, index = next(iter(engine.train_loader.epoch(0)))
    comps, logits, labels = engine.train_step(x, y, index)
    assert len(seen) == 1 and torch.equal(seen[0], expected(y))
    assert torch.equal(labels, expected(y))  # the labels the step saw, not the loader's
    assert logits.shape == (BATCH, CLASSES) and torch.isfinite(comps["loss"])


def test_fit_sends_every_training_batch_through_the_transforms() -> None:
    calls: list[tuple[int, int]] = []

    def spy(engine: Engine, x: Tensor, y: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        calls.append((engine.epoch, engine.batch))
        return x, y, index

    engine = tiny_engine(hooks=[Hooks(batch_transforms=[spy])])
    engine.fit()
    assert calls == [(e, b) for e in range(2) for b in range(SAMPLES // BATCH)]


# -- phases ----------------------------------------------------------------------------------------

def test_phase_runs_exactly_where_due_before_that_epochs_steps() -> None:
    asked: list[int] = []
    ran: list[tuple[int, int]] = []

    def due(engine: Engine) -> bool:
        asked.append(engine.epoch)
        return engine.epoch in (0, 2)

    def run(engine: Engine) -> dict[str, Any]:
        ran.append((engine.epoch, engine.global_step))
        return {"epoch": engine.epoch, "runs": len(ran)}

    engine = tiny_engine(hooks=[Hooks(phases=[Phase("probe", due=due, run=run)])], epochs=4)
    engine.fit()
    assert asked == [0, 1, 2, 3]
    steps = SAMPLES // BATCH
    assert ran == [(0, 0), (2, 2 * steps)]  # at the epoch's start: no step of it has run yet
    assert engine.phase_stats == {"probe": {"epoch": 2, "runs": 2}}  # the latest statistics


# -- checkpointed state and parameter groups -------------------------------------------------------

class Counter(nn.Module):
    """State a method trains itself: a weight and a buffer, checkpointed by the engine."""

    def __init__(self, start: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((2,), start))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))


def test_state_is_checkpointed_restored_on_resume_and_not_in_the_engines_optimiser(tmp_path: Path) -> None:
    def own_training(engine: Engine) -> dict[str, Any]:
        # the method trains its state itself, in a phase (as TST trains its policy)
        with torch.no_grad():
            counter.weight.add_(1.0)
        counter.epochs_seen += 1
        return {}

    counter = Counter(0.5)
    hooks = Hooks(state={"counter": counter}, phases=[Phase("own", due=lambda e: True, run=own_training)])
    first = tiny_engine(hooks=[hooks], epochs=1, run_dir=tmp_path)
    assert all(p is not counter.weight for g in first.optimizer.param_groups for p in g["params"])
    first.fit()
    saved = latest_weights(tmp_path)
    assert torch.equal(saved["extra.counter.weight"], torch.full((2,), 1.5))
    assert int(saved["extra.counter.epochs_seen"]) == 1
    assert sorted(k for k in saved if k.startswith("extra.")) == ["extra.counter.epochs_seen", "extra.counter.weight"]

    fresh = Counter(-7.0)
    at_start: list[tuple[Tensor, int]] = []

    def look(engine: Engine, event: str) -> None:
        if event == "epoch_start":
            at_start.append((fresh.weight.detach().clone(), int(fresh.epochs_seen)))

    second = tiny_engine(hooks=[Hooks(state={"counter": fresh}, callbacks=[look])], epochs=2, run_dir=tmp_path)
    second.fit(resume=True)
    assert len(at_start) == 1  # only epoch 2 was left to train
    weight, seen = at_start[0]
    assert torch.equal(weight, torch.full((2,), 1.5)) and seen == 1
    assert fresh.weight.grad is None  # the engine's backward never reached it


def test_hook_param_group_is_trained_by_the_engines_optimiser(tmp_path: Path) -> None:
    # a learned input scale: a parameter outside the student, trained with it through the transform
    scale = nn.Parameter(torch.tensor(1.0))

    def scaled(engine: Engine, x: Tensor, y: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return x * scale, y, index

    hooks = Hooks(batch_transforms=[scaled], param_groups=[{"params": [scale], "lr": 0.3}])
    engine = tiny_engine(hooks=[hooks])
    groups = engine.optimizer.param_groups
    assert len(groups) == 2 and any(p is scale for p in groups[1]["params"])
    assert groups[1]["initial_lr"] == 0.3 and groups[0]["initial_lr"] == kdkit.TrainSpec(epochs=1).optimizer.lr
    assert not any(p is scale for p in groups[0]["params"])
    engine.fit()
    assert scale.item() != 1.0 and scale.grad is not None


def test_two_hooks_with_state_under_one_name_are_refused() -> None:
    with pytest.raises(KdkitError, match="same name 'policy'"):
        tiny_engine(hooks=[Hooks(state={"policy": Counter(0.0)}), Hooks(state={"policy": Counter(1.0)})])


# -- resume policy ---------------------------------------------------------------------------------

def test_check_resume_gets_the_saved_run_info_and_its_error_stops_the_resume(tmp_path: Path) -> None:
    tiny_engine(epochs=1, run_dir=tmp_path, run_info={"recipe": {"lr": 0.1}}).fit()
    folder = pointed(tmp_path / "checkpoints", "latest")
    calls: list[tuple[dict[str, Any], Path]] = []

    def refuse(saved: dict[str, Any], where: Path) -> None:
        calls.append((saved, where))
        raise KdkitError("the recipe changed", fix="start a new run")

    resumed = tiny_engine(epochs=2, run_dir=tmp_path, run_info={"recipe": {"lr": 0.2}}, check_resume=refuse)
    with pytest.raises(KdkitError, match="the recipe changed"):
        resumed.fit(resume=True)
    assert calls == [({"recipe": {"lr": 0.1}}, folder)]
    assert resumed.epoch == 0 and resumed.global_step == 0 and resumed.history == []  # nothing continued
    assert pointed(tmp_path / "checkpoints", "latest") == folder  # and nothing was written


def test_check_resume_decides_before_any_weight_is_loaded(tmp_path: Path) -> None:
    tiny_engine(epochs=1, run_dir=tmp_path, run_info={"width": 10}).fit()

    def refuse(saved: dict[str, Any], where: Path) -> None:
        raise KdkitError(f"the recipe changed: {saved} -> width 12", fix="start a new run")

    resumed = tiny_engine(epochs=2, run_dir=tmp_path, run_info={"width": 12}, check_resume=refuse)
    resumed.student.model[1] = nn.Linear(16, 12)  # another architecture: the checkpoint cannot load into it
    with pytest.raises(KdkitError, match="the recipe changed"):
        resumed.fit(resume=True)


def test_accepting_check_resume_continues_from_the_checkpoint(tmp_path: Path) -> None:
    tiny_engine(epochs=1, run_dir=tmp_path, run_info={"v": 1}).fit()
    seen: list[dict[str, Any]] = []
    resumed = tiny_engine(epochs=2, run_dir=tmp_path, run_info={"v": 1},
                          check_resume=lambda saved, _folder: seen.append(saved))
    result = resumed.fit(resume=True)
    assert seen == [{"v": 1}] and [r["epoch"] for r in result.history] == [1, 2]


# -- autocast --------------------------------------------------------------------------------------

def test_autocast_is_a_no_op_without_amp_and_bf16_with_it() -> None:
    assert isinstance(tiny_engine().autocast(), contextlib.nullcontext)
    ctx = tiny_engine(amp="bf16").autocast()
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16 and ctx.device == "cpu"
    with ctx:
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_unknown_amp_mode_is_refused() -> None:
    with pytest.raises(KdkitError, match="'fp8'") as info:
        tiny_engine(amp="fp8")
    assert "bf16" in str(info.value)
