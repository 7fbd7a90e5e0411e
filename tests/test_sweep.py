"""``kdkit sweep``: bad input exits 2 before anything runs; trials are runs on a validation split; a sweep killed
with ``kill -9`` mid-trial resumes that trial and loses or repeats nothing; BOSS mode's recipe edits."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import kill_9_in_trial_1, write_recipe
from conftest import optuna_trials as _trials
from kdkit.cli import main
from kdkit.recipe import recipe_from_dict
from kdkit.sweep.boss import boss_recipe
from kdkit.sweep.space import BossSpec
from kdkit.sweep.study import make_sampler

pytest.importorskip("optuna")

SPACE = {"train.optimizer.lr": {"low": 0.01, "high": 0.3, "log": True}, "train.batch_size": {"choices": [16, 32]}}


def sweep_file(path: Path, **keys: Any) -> Path:
    data = {"space": SPACE, "trials": 3, "validation": 0.2, **keys}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(("keys", "expected"), [
    ({"space": {"train.optimizer.learning_rate": {"low": 0.01, "high": 0.1}}},
     ["'train.optimizer.learning_rate' is not a key", "valid choices: train.optimizer.lr", "fix: use the dotted path"]),
    ({"space": {"train.epochs": {"low": 1.5, "high": 3}}}, ["'train.epochs' is an integer", "fix: give integer"]),
    ({"space": {"train.amp": {"low": 0, "high": 1}}}, ["'train.amp' holds 'off'", "fix: use choices"]),
    ({"space": {"train.optimizer.lr": {"low": 0.3, "high": 0.01}}}, ["from low=0.3 down to high=0.01", "swap"]),
    ({"space": {"train.optimizer.lr": {"low": 0.0, "high": 0.1}}}, ["the recipe refuses train.optimizer.lr=0.0"]),
    ({"space": {}}, ["the search space is empty", "fix: name at least one"]),
    ({"trials": 0}, ["a budget of 0 trials runs nothing", "fix: set trials"]),
    ({"sampler": "tpee"}, ["unknown sampler 'tpee'", "valid choices: tpe, gp, random"]),
    ({"startup": -1}, ["startup", "greater than or equal to 0"]),
    ({"storage": "sqlite:////no/such/folder/sweep.db"}, ["storage 'sqlite:////no/such/folder/sweep.db' cannot be "
                                                         "opened", "fix: give a reachable database URL"]),
], ids=["unknown-key", "float-range-on-int", "range-on-string", "low-above-high", "refused-end", "empty-space",
        "budget-0", "unknown-sampler", "negative-startup", "storage-unopenable"])
def test_bad_input_exits_2_before_any_trial(tmp_path: Path, tiny: dict, keys: dict, expected: list[str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny)
    out = tmp_path / "out"
    assert main(["sweep", str(recipe), str(sweep_file(tmp_path / "sweep.yaml", **keys)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err
    assert not (out / "trials").exists() and not Path(tiny["output"]["dir"]).exists()


@pytest.mark.parametrize("name", ["tpe", "gp"])
def test_modelling_samplers_draw_the_sweep_files_startup_trials_at_random(name: str) -> None:
    import optuna

    sampler = make_sampler(name, seed=3, startup=4)
    assert isinstance(sampler, {"tpe": optuna.samplers.TPESampler, "gp": optuna.samplers.GPSampler}[name])
    assert sampler._n_startup_trials == 4  # Optuna keeps no public accessor for it


def test_a_budget_of_0_on_the_command_line_exits_2(tmp_path: Path, tiny: dict,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny)
    assert main(["sweep", str(recipe), str(sweep_file(tmp_path / "s.yaml")), "--trials", "0", "--out",
                 str(tmp_path / "out")]) == 2
    assert "a budget of 0 trials" in capsys.readouterr().err


def test_boss_keeps_the_recipes_teacher_for_its_terms_and_adds_the_best_trials(tiny_kd: dict, tmp_path: Path) -> None:
    best, second = tmp_path / "trials" / "4", tmp_path / "trials" / "1"
    data = boss_recipe(copy.deepcopy(tiny_kd), best, [(4, best), (1, second)], BossSpec(k=2, weight=0.6))
    recipe = recipe_from_dict(data)  # an ordinary, valid recipe
    assert recipe.model.checkpoint == str(best)
    assert {n: s.checkpoint for n, s in recipe.frozen_teachers().items()} == {
        "teacher": tiny_kd["teacher"]["checkpoint"], "trial4": str(best), "trial1": str(second)}
    kd, *sd = recipe.distill
    assert kd.loss == "kd" and kd.teacher == "teacher.logits"  # the recipe's own teacher alone, not the mean
    assert [(t.loss, t.student, t.teacher, t.weight) for t in sd] == [
        ("mse", "logits", "trial4.logits", 0.3), ("mse", "logits", "trial1.logits", 0.3)]


@pytest.mark.slow
def test_kill_9_mid_trial_then_rerun_finishes_that_trial_and_repeats_none(tmp_path: Path, tiny: dict) -> None:
    tiny["train"]["epochs"] = 2
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny)
    sweep = sweep_file(tmp_path / "sweep.yaml", sampler="random")
    out, marker = tmp_path / "out", tmp_path / "killed_here"
    command = ["sweep", str(recipe), str(sweep), "--out", str(out)]
    env = kill_9_in_trial_1(command, marker)
    before = {t.number: t for t in _trials(out / "sweep.db")}
    assert [(n, t.state.name) for n, t in sorted(before.items())] == [(0, "COMPLETE"), (1, "RUNNING")]
    assert not (out / "trials" / "1" / "summary.json").exists()

    done = subprocess.run([sys.executable, "-m", "kdkit", *command], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming trial 1" in done.stdout
    after = _trials(out / "sweep.db")
    assert [t.state.name for t in after] == ["COMPLETE"] * 3  # exactly the budget, nothing lost or extra
    assert after[0].params == before[0].params and after[0].value == before[0].value  # not repeated
    assert after[1].params == before[1].params and after[1].user_attrs["resumed"] == 1  # finished, same draw
    assert len({json.dumps(t.params, sort_keys=True) for t in after}) == 3  # no finished param set twice
    # trial 1 continued from its epoch-1 checkpoint: its metrics hold each epoch once
    epochs = [row["epoch"] for row in json.loads((out / "trials" / "1" / "metrics.json").read_text())]
    assert epochs == [1, 2]
    result = json.loads((out / "sweep.json").read_text())
    assert result["complete"] == 3 and result["best"]["number"] in (0, 1, 2)
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert "validation" not in best["data"]  # the winner is evaluated on the test split again
    trial = yaml.safe_load((out / "trials" / "2" / "recipe.yaml").read_text())
    assert trial["data"]["validation"] == {"fraction": 0.2, "seed": 0}


def test_a_float_loss_parameter_written_as_an_integer_takes_a_float_range(tiny_kd: dict) -> None:
    from kdkit.sweep.space import SweepSpec, check_space

    assert tiny_kd["distill"][0]["temperature"] == 4  # an int in the recipe; the loss declares a float
    spec = SweepSpec.model_validate({"space": {"distill.0.temperature": {"low": 1.0, "high": 8.0},
                                               "train.epochs": {"low": 1, "high": 3}}})
    assert [p.kind for p in check_space(spec, recipe_from_dict(tiny_kd))] == ["float", "int"]


@pytest.mark.slow
def test_boss_trials_start_from_and_distil_from_the_best_finished_trials(tmp_path: Path, tiny: dict) -> None:
    from kdkit.sweep import run_sweep

    tiny["train"]["epochs"] = 1
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny)
    sweep = sweep_file(tmp_path / "sweep.yaml", trials=3, sampler="random", mode="boss",
                       boss={"startup": 2, "k": 2, "weight": 0.5})
    result = run_sweep(recipe, sweep, out=tmp_path / "out")
    rows = {r["number"]: r for r in result["trials"]}
    assert [rows[n]["boss"] for n in (0, 1)] == [None, None]  # the start-up trials train from scratch
    ranked = sorted((0, 1), key=lambda n: (-rows[n]["value"], n))
    assert rows[2]["boss"] == {"init": ranked[0], "teachers": ranked}
    trial = recipe_from_dict(yaml.safe_load((tmp_path / "out" / "trials" / "2" / "recipe.yaml").read_text()))
    assert trial.model.checkpoint == rows[ranked[0]]["run_dir"]
    assert {n: s.checkpoint for n, s in trial.frozen_teachers().items()} == {
        f"trial{n}": rows[n]["run_dir"] for n in ranked}
    assert [t.weight for t in trial.distill] == [0.25, 0.25]


@pytest.mark.parametrize(("args", "expected"), [
    (["--sampler", "tpee"], ["unknown sampler 'tpee'", "valid choices: tpe, gp, random"]),
    (["--mode", "bos"], ["'bos'", "boss"]),
    (["train.optimizer.learning_rate=0.1"], ["learning_rate", "lr"]),
], ids=["sampler-flag", "mode-flag", "override-key"])
def test_command_line_replacements_and_overrides_are_checked_before_any_trial(
        tmp_path: Path, tiny: dict, args: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny)
    out = tmp_path / "out"
    assert main(["sweep", str(recipe), str(sweep_file(tmp_path / "s.yaml")), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err
    assert not (out / "trials").exists()


@pytest.mark.slow
def test_overrides_and_flags_reach_every_trial(tmp_path: Path, tiny: dict) -> None:
    tiny["train"]["epochs"] = 1
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny)
    out = tmp_path / "out"
    assert main(["sweep", str(recipe), str(sweep_file(tmp_path / "s.yaml", sampler="tpe")), "train.epochs=2",
                 "--sampler", "random", "--trials", "2", "--out", str(out)]) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert result["sampler"] == "random" and result["complete"] == 2
    for n in (0, 1):
        assert yaml.safe_load((out / "trials" / str(n) / "recipe.yaml").read_text())["train"]["epochs"] == 2
    assert yaml.safe_load((out / "best.yaml").read_text())["train"]["epochs"] == 2
