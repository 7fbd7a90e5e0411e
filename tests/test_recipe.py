"""Recipes: schema, overrides, all problems at once, no code execution, every shipped recipe valid."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from kdkit.cli import main
from kdkit.errors import KdkitError, RecipeErrors
from kdkit.recipe import load_recipe, recipe_from_dict, recipes_root, shipped_recipe_files, shipped_recipes


@pytest.mark.slow
def test_every_shipped_recipe_validates(capsys: pytest.CaptureFixture[str]) -> None:
    files = shipped_recipe_files()
    assert len(files) >= 3 and len(files) == len(shipped_recipes())
    assert {p.stem for p in set(recipes_root().rglob("*.yaml")) - set(files)} <= {"search_space", "sweep_kd",
                                                                                  "sweep_cwd"}
    assert main(["validate", *map(str, files)]) == 0, capsys.readouterr().err


def test_every_shipped_sweep_file_checks_against_the_recipe_it_names() -> None:
    from kdkit.recipe import find_recipe, load_recipe
    from kdkit.sweep.space import check_objective, check_space, load_sweep

    sweeps = sorted(recipes_root().rglob("sweep_*.yaml"))
    assert [p.stem for p in sweeps] == ["sweep_kd", "sweep_cwd"]  # fashion_mnist/, then scenes_det/
    for path in sweeps:
        spec = load_sweep(path)
        recipe = load_recipe(find_recipe(f"{path.parent.name}/{path.stem.removeprefix('sweep_')}"))
        assert [p.key for p in check_space(spec, recipe)] == list(spec.space)
        assert check_objective(spec.objective, recipe) == spec.objective


def problems(recipe: dict) -> str:
    """The rendered problem list of a recipe that must fail validation."""
    with pytest.raises(RecipeErrors) as info:
        recipe_from_dict(recipe)
    return str(info.value)


def test_unknown_keys_are_errors_with_the_valid_keys(tiny: dict) -> None:
    tiny["train"]["epoch"] = 3
    tiny["modle"] = {}
    text = problems(tiny)
    assert "2 problem(s)" in text
    assert "train.epoch: unknown key 'epoch'; valid choices: epochs" in text
    assert "unknown key 'modle'; valid choices: model" in text


def test_schema_and_name_problems_reported_together(tiny: dict) -> None:
    tiny["train"]["epochs"] = -1
    tiny["model"]["arch"] = "resnet3"
    with pytest.raises(RecipeErrors) as info:
        recipe_from_dict(tiny)
    assert len(info.value.errors) == 2
    assert "model.arch: unknown model 'resnet3'; valid choices: resnet32" in str(info.value)


def test_overrides_set_nested_values_and_list_items(tiny_kd: dict) -> None:
    recipe = recipe_from_dict(tiny_kd, ["train.epochs=7", "distill.0.temperature=2", "data.augment.hflip=true"])
    assert recipe.train.epochs == 7 and recipe.distill[0].params == {"temperature": 2}
    assert recipe.data.augment.hflip is True
    with pytest.raises(KdkitError, match="not of the form key=value"):
        recipe_from_dict(tiny_kd, ["train.epochs"])
    with pytest.raises(KdkitError, match="not an index"):
        recipe_from_dict(tiny_kd, ["distill.3.weight=1"])


def test_yaml_cannot_execute_code(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(KdkitError, match="not valid YAML"):
        load_recipe(evil)


def test_distill_without_teacher_is_an_error(tiny: dict) -> None:
    tiny["distill"] = [{"loss": "kd"}]
    with pytest.raises(RecipeErrors, match="no `teacher:` is given"):
        recipe_from_dict(tiny)


def test_digest_changes_with_content(tiny: dict) -> None:
    a, b = recipe_from_dict(tiny), recipe_from_dict(tiny, ["train.seed=1"])
    assert a.digest() != b.digest() and a.digest() == recipe_from_dict(tiny).digest()


def test_unknown_shipped_recipe_suggests_names() -> None:
    with pytest.raises(KdkitError, match="valid choices: fashion_mnist/kd"):
        load_recipe("fashion_mnist/kdd")


@pytest.mark.parametrize(("name", "digest"), [
    ("fashion_mnist/kd", "a255fb33d58b"), ("fashion_mnist/dml", "9aeb39d2366d"),
    ("fashion_mnist/multi_teacher", "054c4e66c222"),
])
def test_keys_added_later_leave_the_digests_of_recipes_that_do_not_set_them(name: str, digest: str) -> None:
    from kdkit.recipe import load_recipe

    # a trained network's init, a peer's optimiser, a teacher's classes: absent while unset, so finished runs
    # (benchmarks, teacher runs, caches) are still found by the digest they were saved with
    assert load_recipe(name).digest() == digest


def test_resolved_params_fill_defaults_without_changing_the_digest() -> None:
    from kdkit.build import resolved_terms
    from kdkit.recipe import load_recipe

    recipe = load_recipe("fashion_mnist/kd")
    # the digest computed before the resolved parameters existed: finished runs are found by it
    assert recipe.digest() == "a255fb33d58b"
    assert "standardize" not in recipe.to_dict()["distill"][0]  # the recipe says only what it sets...
    assert resolved_terms(recipe) == [  # ...the resolved terms every value the loss is built with
        {"name": "kd", "loss": "kd", "params": {"temperature": 4.0, "standardize": False}}]
    bridged = load_recipe("fashion_mnist/fitnets")
    assert resolved_terms(bridged) == [{"name": "fitnets", "loss": "fitnets", "params": {}, "bridge": "convreg",
                                        "bridge_params": {"relu": True, "same_size_kernel": 3}}]


def test_keys_added_later_do_not_change_old_digests() -> None:
    from kdkit.recipe import load_recipe

    plain = load_recipe("fashion_mnist/kd")
    data = plain.to_dict()
    assert "tst" not in data and "cache" not in data["teacher"] and "compile" not in data["train"]
    cached = load_recipe("fashion_mnist/kd", ["teacher.cache.views=3", "train.compile=true"])
    assert cached.to_dict()["teacher"]["cache"]["views"] == 3 and cached.to_dict()["train"]["compile"] is True
    assert len({plain.digest(), cached.digest()}) == 2


def test_every_network_and_the_task_are_named_in_the_problem_list(tiny: dict) -> None:
    tiny["train"]["epochs"] = -1  # a schema error: the name check runs on the raw recipe as well
    tiny["task"] = "clasification"
    tiny["peers"] = {"b": {"arch": "cnn_studen"}}
    tiny["teachers"] = {"t1": {"arch": "cnn_teachr", "checkpoint": "t1.safetensors"}}
    text = problems(tiny)
    assert "peers.b.arch: unknown model 'cnn_studen'; valid choices: cnn_student" in text
    assert "teachers.t1.arch: unknown model 'cnn_teachr'; valid choices: cnn_teacher" in text
    assert "task: unknown task 'clasification'; valid choices: classification" in text


def test_yaml_on_off_yes_no_are_strings_where_a_choice_is_expected_and_booleans_where_a_flag_is(
        tiny: dict, tmp_path: Path) -> None:
    recipe = recipe_from_dict(tiny, ["train.amp=off", "data.augment.hflip=yes", "train.compile=off"])
    assert recipe.train.amp == "off" and recipe.data.augment.hflip is True and recipe.train.compile is False
    tiny["train"]["amp"] = "bf16"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny).replace("amp: bf16", "amp: off").replace("hflip: false", "hflip: on"))
    loaded = load_recipe(path)
    assert loaded.train.amp == "off" and loaded.data.augment.hflip is True
    with pytest.raises(RecipeErrors, match=r"train\.amp"):
        recipe_from_dict(tiny, ["train.amp=of"])


def test_a_boolean_loss_parameter_reads_yaml_words(tiny_kd: dict) -> None:
    from kdkit.build import plan

    tiny_kd["distill"] = [{"loss": "cka", "student": "stage2", "teacher": "stage2", "centered": "off"}]
    built = plan(recipe_from_dict(tiny_kd), training=False)
    assert built.objective.terms[0].loss.centered is False


def test_a_saved_recipe_with_a_later_key_at_its_default_resumes_and_a_changed_one_does_not(tiny: dict,
                                                                                             tmp_path: Path) -> None:
    from kdkit.assemble import check_same_recipe
    from kdkit.errors import KdkitError
    from kdkit.recipe import recipe_from_dict

    current = recipe_from_dict(tiny).to_dict()
    assert "init" not in current["model"]  # left out while at its default
    saved = copy.deepcopy(current)
    saved["model"]["init"] = "fresh"  # what a version that wrote the default saved
    check_same_recipe(saved, current, tmp_path)
    saved["train"]["seed"] = 1
    with pytest.raises(KdkitError, match=r"the recipe changed since it was written \(\['train.seed'\]\)"):
        check_same_recipe(saved, current, tmp_path)
