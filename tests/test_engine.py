"""The engine: exact resume after SIGINT, atomic checkpoints, NaN detection, metrics files."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import sigint_at_step, write_recipe
from kdkit.checkpoint import pointed, read_state
from kdkit.cli import _split_resume, main
from kdkit.engine import Engine, Interrupted
from kdkit.errors import KdkitError, TrainingDiverged
from kdkit.losses import DistillLoss, register_loss
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(pointed(run_dir / "checkpoints", "latest") / "model.safetensors"))


@pytest.mark.slow
def test_interrupted_run_resumes_to_identical_weights(tmp_path: Path, tiny_kd: dict) -> None:
    tiny_kd["train"]["epochs"] = 3
    straight = recipe_from_dict(tiny_kd, [f"output.dir={tmp_path / 'straight'}"])
    run_recipe(straight)

    broken = recipe_from_dict(tiny_kd, [f"output.dir={tmp_path / 'broken'}"])

    before = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN in a shell's background job
    with pytest.raises(Interrupted) as info:  # mid-way through epoch 2 (6 steps per epoch)
        run_recipe(broken, callbacks=[sigint_at_step(9)])
    assert info.value.checkpoint is not None and info.value.checkpoint.name == "epoch_0001_step_00003"
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    summary = run_recipe(broken, resume=True)

    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "broken")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_a = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    rows_b = json.loads((tmp_path / "broken" / "metrics.json").read_text())
    keys = ["epoch", "step", "train_loss", "train_kd", "test_top1", "test_loss"]
    assert [[r[k] for k in keys] for r in rows_a] == [[r[k] for k in keys] for r in rows_b]
    assert summary["best_top1"] == max(r["test_top1"] for r in rows_a) and summary["metric"] == "top1"


@pytest.mark.slow
def test_checkpoint_holds_recipe_and_loads_without_code(tmp_path: Path, tiny: dict) -> None:
    recipe = recipe_from_dict(tiny)
    run_recipe(recipe)
    folder = pointed(recipe.run_dir / "checkpoints", "latest")
    state = read_state(folder)  # torch.load(weights_only=True)
    assert state["run_info"] == recipe.to_dict() and state["epoch"] == 2
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["recipe"]) == recipe.to_dict()
    assert (recipe.run_dir / "recipe.yaml").is_file() and (recipe.run_dir / "metrics.csv").is_file()
    header = (recipe.run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "train_loss", "train_ce", "test_top1", "test_top5", "test_loss", "best_top1", "lr"} <= set(header)
    assert pointed(recipe.run_dir / "checkpoints", "best") is not None


@pytest.mark.slow
def test_failed_save_keeps_previous_checkpoint(tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = recipe_from_dict(tiny, ["train.epochs=1"])
    run_recipe(recipe)
    before = pointed(recipe.run_dir / "checkpoints", "latest")
    weights = load_file(str(before / "model.safetensors"))

    def crash(*_args, **_kwargs) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KdkitError, match=r"could not write checkpoint .*epoch_0002.*disk full"):
        run_recipe(recipe_from_dict(tiny, ["train.epochs=2"]), resume=True)
    after = pointed(recipe.run_dir / "checkpoints", "latest")
    assert after == before
    assert all(torch.equal(weights[k], v) for k, v in load_file(str(after / "model.safetensors")).items())


@pytest.mark.slow
def test_existing_run_needs_resume_or_overwrite(tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_recipe(tmp_path / "r.yaml", {**tiny, "train": {**tiny["train"], "epochs": 1}})
    assert main(["run", str(path)]) == 0
    assert main(["run", str(path)]) == 2 and "--resume" in capsys.readouterr().err
    assert main(["run", str(path), "resume=true"]) == 0
    assert main(["run", str(path), "--overwrite"]) == 0


@pytest.mark.slow
def test_resume_refuses_a_changed_recipe(tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture[str]) -> None:
    run_recipe(recipe_from_dict(tiny, ["train.epochs=1"]))
    path = write_recipe(tmp_path / "r.yaml", tiny)
    assert main(["run", str(path), "--resume", "train.optimizer.lr=0.2"]) == 2
    assert "recipe changed" in capsys.readouterr().err
    assert main(["run", str(path), "--resume"]) == 0  # only epochs grew: allowed


def test_split_resume() -> None:
    assert _split_resume(["a=1", "resume=true"]) == (["a=1"], True)
    assert _split_resume(["resume=false"]) == ([], False)


@register_loss("test_boom", help="test-only: NaN from the 8th call on")
class Boom(DistillLoss):
    """Returns a NaN after a few calls, to test divergence handling."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        value = (student - teacher).pow(2).mean()
        return value * float("nan") if self.calls >= 8 else value


@pytest.mark.slow
def test_nan_names_the_term_and_keeps_last_good_checkpoint(tmp_path: Path, tiny_kd: dict,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    tiny_kd["distill"].append({"loss": "test_boom", "weight": 0.01})
    recipe = recipe_from_dict(tiny_kd)
    with pytest.raises(TrainingDiverged, match="'test_boom' became NaN or inf in epoch 2 at step 2 of 6"):
        run_recipe(recipe)
    assert pointed(recipe.run_dir / "checkpoints", "latest").name == "epoch_0001"
    path = write_recipe(tmp_path / "r.yaml", tiny_kd)
    assert main(["run", str(path), "--overwrite"]) == 3
    assert f"last good checkpoint kept: {recipe.run_dir / 'checkpoints' / 'epoch_0001'}" in capsys.readouterr().err


def all_finite(folder: Path) -> bool:
    """Whether every floating-point tensor of a checkpoint folder is finite."""
    return all(torch.isfinite(v).all() for v in load_file(str(folder / "model.safetensors")).values()
               if v.is_floating_point())


def test_high_lr_with_finite_losses_stops_on_inf_buffers(tmp_path: Path, tiny: dict,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    # Issue #10: at lr 30 every loss stays finite while BatchNorm's running_var overflows; the run used to exit 0
    # at chance accuracy with inf in every checkpoint, including the "last good" one.
    path = write_recipe(tmp_path / "r.yaml", {**tiny, "train": {**tiny["train"], "epochs": 3}})
    assert main(["run", str(path), "train.optimizer.lr=30"]) == 3
    err = capsys.readouterr().err
    assert re.search(r"'model\.[\w.]+\.running_var'.* became NaN or inf in epoch \d, in steps \d+-\d+ of 6, while "
                     r"every loss term stayed finite", err), err
    assert "fix: lower the learning rate" in err
    run = Path(tiny["output"]["dir"])
    latest = pointed(run / "checkpoints", "latest")
    assert latest is None or all_finite(latest)
    assert all(all_finite(folder) for folder in (run / "checkpoints").glob("epoch_*"))


def test_nonfinite_optimizer_state_stops_at_the_next_sync_point(tiny: dict) -> None:
    # Adam's second moment or a momentum buffer can overflow while weights and losses stay finite.
    def overflow(engine: Engine, event: str) -> None:
        if event == "step" and engine.global_step == 12:  # the last step of epoch 2, before its sync point
            engine.optimizer.state[engine.student.model.fc.weight]["momentum_buffer"][0, 0] = math.inf

    recipe = recipe_from_dict(tiny)  # SGD with momentum 0.9
    with pytest.raises(TrainingDiverged, match=r"'optimizer\.model\.fc\.weight\.momentum_buffer' became NaN or inf "
                                               r"in epoch 2, in steps 1-6 of 6") as info:
        run_recipe(recipe, callbacks=[overflow])
    latest = pointed(recipe.run_dir / "checkpoints", "latest")
    assert info.value.checkpoint == latest and latest.name == "epoch_0001" and all_finite(latest)


@pytest.mark.slow
def test_bf16_autocast_and_tensorboard(tmp_path: Path, tiny_kd: dict) -> None:
    pytest.importorskip("tensorboard")
    recipe = recipe_from_dict(tiny_kd, ["train.amp=bf16", "train.epochs=1", "output.tensorboard=true"])
    summary = run_recipe(recipe)
    assert summary["best_top1"] > 0
    assert list((recipe.run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_fp16_on_cpu_is_refused_before_training(tiny: dict) -> None:
    from kdkit.errors import RecipeErrors

    with pytest.raises(RecipeErrors, match="fp16 AMP needs a CUDA device"):
        run_recipe(recipe_from_dict(tiny, ["train.amp=fp16", "train.device=cpu"]))


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                    reason="torch.compile on the CPU needs a C++ compiler")
@pytest.mark.slow
def test_compiled_student_trains_and_saves_plain_weights(tmp_path: Path, tiny_kd: dict) -> None:
    tiny_kd["train"].update({"epochs": 1, "compile": True})
    compiled = recipe_from_dict(tiny_kd, [f"output.dir={tmp_path / 'compiled'}"])
    summary = run_recipe(compiled)
    plain = recipe_from_dict(tiny_kd, ["train.compile=false", f"output.dir={tmp_path / 'plain'}"])
    run_recipe(plain)
    a, b = final_weights(tmp_path / "compiled"), final_weights(tmp_path / "plain")
    assert a.keys() == b.keys()  # no torch.compile wrapper prefixes in checkpoints
    # the same step, fused or not: equal up to float reassociation after one epoch
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-4) for k in a)
    assert summary["best_top1"] > 0


@pytest.mark.parametrize(("terms", "runs_teacher"), [([], False), ([{"loss": "kd", "weight": 1.0}], True)])
def test_the_teacher_runs_only_when_a_term_reads_it(terms: list, runs_teacher: bool, tiny: dict,
                                                    teacher_file: Path) -> None:
    # a teacher that only gives the trained network its starting weights (init: teacher) costs no forward a step
    from kdkit.recipe import recipe_from_dict
    from kdkit.runner import run_recipe

    tiny.update(model={"arch": "cnn_teacher", "init": "teacher"},
                teacher={"arch": "cnn_teacher", "checkpoint": str(teacher_file)}, distill=terms)
    tiny["train"]["epochs"] = 1
    calls, hooks = [], []

    def count(engine: Any, event: str) -> None:  # the training steps' teacher forwards (not the summary's latency)
        if event == "epoch_start":
            hooks.append(engine.teacher.model.register_forward_hook(lambda *_: calls.append(1)))
        elif event == "epoch":
            hooks.pop().remove()

    run_recipe(recipe_from_dict(tiny), callbacks=[count])
    assert bool(calls) == runs_teacher
