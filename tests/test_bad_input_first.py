"""Bad input is found before any work, as one message with exit code 2 (issue #10, items 10 and 11)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from conftest import write_recipe
from kdkit.cli import main
from kdkit.errors import KdkitError, RecipeErrors
from kdkit.recipe import load_recipe, recipe_from_dict


@pytest.mark.parametrize(("override", "where", "says"), [
    ("train.epochs=true", "train.epochs", "got the boolean true"),
    ("train.optimizer.lr=.inf", "train.optimizer.lr", "finite number"),
    ("train.optimizer.lr=.nan", "train.optimizer.lr", "finite number"),
    ("train.batch_size=false", "train.batch_size", "got the boolean false"),
    ("output.dir=runs/{nme}", "output.dir", "placeholder other than {name}"),
])
def test_recipe_values_that_used_to_pass_or_crash_are_refused(tiny: dict, override: str, where: str,
                                                              says: str) -> None:
    with pytest.raises(RecipeErrors) as info:
        recipe_from_dict(tiny, [override])
    assert [e.where for e in info.value.errors] == [where] and says in str(info.value)


def test_a_flag_still_reads_yaml_words_and_a_number_its_digits(tiny: dict) -> None:
    recipe = recipe_from_dict(tiny, ["train.compile=false", "train.epochs=3", "train.optimizer.lr=1e-2"])
    assert recipe.train.compile is False and recipe.train.epochs == 3 and recipe.train.optimizer.lr == 0.01


@pytest.mark.parametrize(("value", "says"), [("true", "got the boolean true"), (".inf", "finite number")])
def test_loss_parameters_are_finite_numbers_not_booleans(tiny_kd: dict, tmp_path: Path, value: str, says: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = write_recipe(tmp_path / "r.yaml", tiny_kd)
    assert main(["validate", str(path), f"distill.0.temperature={value}"]) == 2
    err = capsys.readouterr().err
    assert "distill.0.temperature" in err and says in err


def test_a_recipe_that_is_not_utf8_is_named_with_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(KdkitError, match=r"not UTF-8 text: byte b'\\xe9' at offset 9"):
        load_recipe(path)


def test_an_output_dir_under_a_file_is_found_before_training(tiny: dict, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    path = write_recipe(tmp_path / "r.yaml", tiny)
    assert main(["run", str(path), f"output.dir={blocker}/run"]) == 2
    err = capsys.readouterr().err
    assert "output.dir" in err and f"{str(blocker)!r} is a file" in err


def test_a_misspelt_student_loss_costs_no_teacher_run(tiny: dict, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    teacher = copy.deepcopy(tiny)
    teacher.update(name="t", model={"arch": "cnn_teacher"}, output={"dir": str(tmp_path / "teacher"),
                                                                     "progress": False})
    write_recipe(tmp_path / "teacher.yaml", teacher)
    tiny["teacher"] = {"arch": "cnn_teacher", "recipe": "teacher.yaml"}
    tiny["distill"] = [{"loss": "kd", "student": "stage9", "weight": 1.0}]  # a tap the student does not have
    path = write_recipe(tmp_path / "student.yaml", tiny)
    assert main(["run", str(path)]) == 2
    assert "stage9" in capsys.readouterr().err
    assert not (tmp_path / "teacher").exists()  # the teacher was not trained first


def test_validate_refuses_a_teacher_checkpoint_of_another_architecture(tiny_kd: dict, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    tiny_kd["teacher"]["params"] = {"width": 24}  # the checkpoint holds the default width
    path = write_recipe(tmp_path / "r.yaml", tiny_kd)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "teacher.checkpoint" in err and "shape mismatch" in err


@pytest.mark.parametrize("damage", ["reshape", "drop", "extra"])
def test_resuming_from_weights_that_do_not_fit_exits_2_and_changes_nothing(
        tiny: dict, tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    path = write_recipe(tmp_path / "r.yaml", {**tiny, "train": {**tiny["train"], "epochs": 1}})
    assert main(["run", str(path), "--quiet"]) == 0
    weights = tmp_path / "run" / "checkpoints" / "epoch_0001" / "model.safetensors"
    tensors = load_file(str(weights))
    if damage == "reshape":
        tensors["model.fc.weight"] = torch.zeros(3, 3)
    elif damage == "drop":
        del tensors["model.fc.weight"]
    else:
        tensors["model.fc.extra"] = torch.zeros(1)
    save_file(tensors, str(weights))
    metrics = (tmp_path / "run" / "metrics.csv").read_text()
    assert main(["run", str(path), "train.epochs=2", "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "model.fc" in err and "--overwrite" in err
    assert (tmp_path / "run" / "metrics.csv").read_text() == metrics  # nothing was trained or written


def test_a_copied_recipe_whose_teacher_recipe_is_not_beside_it_names_the_key_and_the_places_searched(
        tiny_kd: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_kd["teacher"] = {"arch": "cnn_teacher", "recipe": "my_teacher.yaml"}
    copied = write_recipe(tmp_path / "elsewhere.yaml", tiny_kd)
    assert main(["validate", str(copied)]) == 2
    err = capsys.readouterr().err
    assert "teacher.recipe: no recipe file 'my_teacher.yaml' (searched: my_teacher.yaml, " in err
    assert str(tmp_path / "my_teacher.yaml") in err and "copied beside it" in err


def test_schema_errors_no_longer_hide_tap_errors_or_missing_files(tiny: dict, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # Issue #10 item 10: one report holds every problem. A refused key is left out (its default used) and a refused
    # term removed, so the tap and file checks still run on the rest; their locations are the user's recipe's.
    tiny["teacher"] = {"arch": "cnn_teacher", "checkpoint": str(tmp_path / "no_such_teacher")}
    tiny["distill"] = [{"loss": "fitnet", "student": "stage2", "teacher": "stage2"},  # unknown loss: term removed
                       {"loss": "at", "student": "stage9", "teacher": "stage2"}]  # a tap the student does not have
    tiny["train"]["optimizer"] = {"name": "sgd", "lrr": 0.1}
    path = write_recipe(tmp_path / "r.yaml", tiny)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err and "train.optimizer.lrr: unknown key 'lrr'" in err
    assert err.count("distill.0.loss: unknown loss 'fitnet'") == 1  # the schema and the name check agree: once
    assert "distill.1.student: tap 'stage9'" in err  # index 0 of the trimmed recipe, shown as the user's 1
    assert "warning: teacher.checkpoint" in err and "does not exist here" in err


def test_a_missing_required_key_still_reports_the_schema_problems_alone(tiny: dict) -> None:
    del tiny["train"]["epochs"]
    tiny["distill"] = [{"loss": "kd", "student": "stage9"}]
    with pytest.raises(RecipeErrors) as caught:
        recipe_from_dict(tiny)
    assert caught.value.partial is None  # no recipe without a guessed epoch count: nothing more is checked
    assert [e.where for e in caught.value.errors] == ["train.epochs"]
