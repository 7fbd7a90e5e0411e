"""The command line: ls, validate, report; exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_recipe
from kdkit.cli import main


@pytest.mark.parametrize("what,expected", [("models", "resnet32x4"), ("losses", "kd"), ("datasets", "fashion_mnist"),
                                           ("bridges", "conv1x1"), ("recipes", "fashion_mnist/kd")])
def test_ls(what: str, expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", what]) == 0
    assert expected in capsys.readouterr().out


@pytest.mark.parametrize(("what", "name", "expected"), [
    ("losses", "dkd", ["loss 'dkd': Decoupled KD", "implements: Zhao, Cui, Song, Qiu, Liang, \"Decoupled Knowledge "
                       "Distillation\", CVPR 2022.", "alpha: float = 1.0  (a value >= 0)\n      TCKD weight",
                       "beta: float = 8.0  (a value >= 0)", "temperature: float = 4.0  (a value > 0)",
                       "standardize: bool = false\n", "reads (unless the term says): student tap 'logits'"]),
    ("losses", "crd", ["memory: str = queue  (one of 'queue', 'bank')", "momentum: float = 0.5  (a value in [0, 1))"]),
    ("bridges", "convreg", ["relu: bool = true", "same_size_kernel: int = 3  (one of 1, 3)",
                            "maps: (C, H, W) maps whose student H, W equal the teacher's"]),
    ("methods", "tst", ["recipe section `tst:`", "num_ops: int = 4  (a value >= 1)\n      operations drawn per batch",
                        "policy_epochs: list[int] = [30, 90]"]),
    ("methods", "fmkt", ["recipe section: none"]),
    ("models", "cnn_student", ["head: str = flatten  (one of 'flatten', 'pool', 'queries')"]),
    ("datasets", "digits", ["test_fraction: float = 0.2\n      Fraction of each class"]),
])
def test_ls_name_shows_parameters_defaults_bounds_and_summary(what: str, name: str, expected: list[str],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", what, name]) == 0
    out = capsys.readouterr().out
    missing = [e for e in expected if e not in out]
    assert not missing, out
    assert "Args:" not in out  # the parameters are listed from the signature, not repeated from the docstring


@pytest.mark.parametrize(("what", "kind", "bad", "closest"), [
    ("losses", "loss", "dkdd", "dkd"), ("bridges", "bridge", "convrg", "convreg"), ("methods", "method", "tsst", "tst"),
    ("models", "model", "cnn_studnt", "cnn_student")])
def test_ls_unknown_name_exits_2_with_closest_choices(what: str, kind: str, bad: str, closest: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", what, bad]) == 2
    captured = capsys.readouterr()
    assert f"unknown {kind} {bad!r}; valid choices: {closest}," in captured.err and not captured.out


def test_ls_recipes_takes_no_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", "recipes", "fashion_mnist/kd"]) == 2
    assert "takes no NAME" in capsys.readouterr().err


def test_ls_taps_shows_shapes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", "taps", "resnet8", "--dataset", "cifar10"]) == 0
    out = capsys.readouterr().out
    assert "penultimate" in out and "(64,)" in out and "layer3" in out


def test_validate_schema_prints_the_recipe_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "Recipe"
    # the core sections and each method's section (tst:), the required keys
    assert {"model", "data", "distill", "train", "output", "tst"} <= set(schema["properties"])
    assert {"name", "model", "data"} <= set(schema["required"])


def test_validate_reports_bad_recipe_and_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "fashion_mnist/kd", "model.arch=resnet3"]) == 2
    assert "unknown model 'resnet3'; valid choices: resnet32" in capsys.readouterr().err


@pytest.mark.slow
def test_report_compares_run_folders(tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture[str]) -> None:

    folders = []
    for seed in (0, 1):
        recipe = {**tiny, "train": {**tiny["train"], "epochs": 1, "seed": seed},
                  "output": {"dir": str(tmp_path / f"run{seed}"), "progress": False}}
        assert main(["run", str(write_recipe(tmp_path / f"r{seed}.yaml", recipe))]) == 0
        folders.append(str(tmp_path / f"run{seed}"))
    assert main(["report", *folders, "--out", str(tmp_path / "report")]) == 0
    assert "report:" in capsys.readouterr().out
    assert (tmp_path / "report" / "report.html").is_file() and (tmp_path / "report" / "curves.png").is_file()
    assert main(["report", str(tmp_path)]) == 2  # not a run folder
    assert "not a kdkit run folder" in capsys.readouterr().err


def test_an_interrupted_run_prints_the_exact_command_that_continues_it(
        tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import shlex

    import kdkit.runner
    from kdkit.engine import Interrupted

    seen: list[dict] = []

    def interrupted(recipe: object, **kwargs: object) -> None:
        seen.append({"recipe": recipe, **kwargs})
        raise Interrupted(tmp_path / "run" / "checkpoints" / "epoch_1")

    monkeypatch.setattr(kdkit.runner, "run_recipe", interrupted)
    path = write_recipe(tmp_path / "my recipe.yaml", tiny)
    assert main(["run", str(path), "train.epochs=3", "train.seed=7", "--trust-code", "--quiet"]) == 130
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("continue with: ")
    command = shlex.split(line.removeprefix("continue with: "))
    assert command == ["kdkit", "run", str(path), "train.epochs=3", "train.seed=7", "--trust-code", "--quiet",
                       "--resume"]
    assert main(command[1:]) == 130  # the printed command is the same run (same overrides), resumed
    first, again = seen
    assert again["resume"] is True and first["resume"] is False
    assert again["recipe"].digest() == first["recipe"].digest()


@pytest.mark.slow
def test_benchmarks_continue_an_interrupted_run_and_restart_another_recipes(
        tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import kdkit.runner
    from conftest import sigint_at_step
    from kdkit.engine import Interrupted
    from kdkit.recipe import recipe_from_dict

    recipe = recipe_from_dict(tiny, ["train.epochs=2"])
    with pytest.raises(Interrupted):  # in epoch 2, epoch 1's checkpoint saved
        kdkit.runner.run_recipe(recipe, callbacks=[sigint_at_step(recipe.train.epochs * 2)])
    original, calls = kdkit.runner.run_recipe, []

    def spy(r: object, **kwargs: object) -> dict:
        calls.append(kwargs)
        return original(r, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kdkit.runner, "run_recipe", spy)
    assert kdkit.runner.run_or_continue(recipe)["epochs"] == 2
    assert calls[-1]["resume"] is True and calls[-1]["overwrite"] is False
    other = recipe_from_dict(tiny, ["train.epochs=2", "train.seed=5"])  # the same folder, another recipe
    assert kdkit.runner.run_or_continue(other)["seed"] == 5
    assert calls[-1]["resume"] is False and calls[-1]["overwrite"] is True
