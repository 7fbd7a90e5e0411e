"""The method contract (:mod:`kdkit.method`), checked for every registered method, and each method's refusals.

A new method is covered by the parametrised contract test as soon as it registers; the tables below must also
get its refusals and bad values (a test fails until they do), so what it refuses is tested, not just declared.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from conftest import write_recipe
from kdkit.cli import main
from kdkit.errors import KdkitError
from kdkit.method import METHODS, Method, method_sections
from kdkit.recipe import Recipe, recipe_from_dict

NAMES = METHODS.names()
WITH_SECTION = [n for n in NAMES if METHODS.get(n).section is not None]

#: For each method with a section: (settings that make a recipe lack what the method needs, section value,
#: text the refusal must contain). ``edit`` rewrites the tiny KD recipe dict in place.
#: A class-mismatch split of the tiny recipe's data (WAD's setting).
MISMATCH = {"name": "class_mismatch", "labelled": 60, "unlabelled": 100, "mismatch": 0.5}
REFUSALS: dict[str, list[tuple[str, Any, dict[str, Any], str]]] = {
    "tst": [
        ("no teacher", lambda r: [r.pop("teacher"), r.pop("distill")], {}, "no `teacher:`"),
        ("two views", lambda r: r["data"].update(views=2), {}, "data.views: 2"),
        ("policy epoch not before the last", lambda r: None, {"policy_epochs": [0, 2]},
         "tst.policy_epochs [2] are not before train.epochs 2"),
        ("teacher cache", lambda r: r["teacher"].update(cache={}), {}, "cannot be combined with method 'tst'"),
    ],
    "ferkd": [
        ("no teacher cache", lambda r: r.update(distill=[{"loss": "ferkd"}], train={**r["train"], "ce_weight": 0}),
         {}, "FerKD mines the stored views of a teacher cache: teacher.cache is None"),
        ("no ferkd term", lambda r: r["teacher"].update(cache={}), {}, "no `ferkd` term in distill"),
    ],
    "orc": [
        ("no orc term", lambda r: None, {}, "and distill has none"),
    ],
    "kd3": [
        ("no kd3 term", lambda r: None, {}, "0 `kd3` terms in distill"),
    ],
    "mst_distill": [
        ("no mst_distill term", lambda r: None, {"route_epoch": 1}, "0 `mst_distill` terms in distill"),
    ],
    "source_select": [
        ("no source_kd term", lambda r: None, {}, "source_select configures one source_kd term, the recipe has 0"),
    ],
    "unikd": [
        ("no unikd term", lambda r: r.update(task="detection"), {}, "pretrains the AKE of a `unikd` term, and the "
         "recipe has none"),
    ],
    "wad": [
        ("no wad term", lambda r: r["data"].update(setting=MISMATCH), {}, "0 `wad` terms in distill"),
        ("the teacher's representation", lambda r: [r["data"].update(setting=MISMATCH),
                                                    r.update(distill=[{"loss": "wad"}])], {"contrastive": {}},
         "the wad term reads the teacher's"),
        ("rounds over a recipe's epochs", lambda r: [r["data"].update(setting=MISMATCH),
                                                     r.update(distill=[{"loss": "wad"}])], {"rounds": 3},
         "wad.rounds 3 splits train.epochs 2"),
    ],
}

#: For each method with a section: (bad section value, the key the CLI must name, text of the fix it must give).
BAD_VALUES: dict[str, list[tuple[dict[str, Any], str, str]]] = {
    "tst": [
        ({"num_ops": 0}, "tst.num_ops", "greater than or equal to 1"),
        ({"ops": ["rotate", "sharpen"]}, "tst.ops.1", "'sharpness'"),  # the valid names are listed
    ],
    "ferkd": [
        ({"selfmix_alpha": 0}, "ferkd.selfmix_alpha", "greater than 0"),
        ({"discard_easy": 1.0}, "ferkd.discard_easy", "less than 1"),
    ],
    "orc": [
        ({"alpha": 0}, "orc.alpha", "greater than 0"),
        ({"feedback": "most"}, "orc.feedback", "'any'"),
    ],
    "kd3": [
        ({"mix_alpha": 0}, "kd3.mix_alpha", "greater than 0"),
    ],
    "mst_distill": [
        ({"route_epoch": 0}, "mst_distill.route_epoch", "greater than or equal to 1"),
        ({"mask_lr": 0}, "mst_distill.mask_lr", "greater than 0"),
    ],
    "source_select": [
        ({"mode": "farthest"}, "source_select.mode", "'nearest'"),
        ({"temperature": 0}, "source_select.temperature", "greater than 0"),
    ],
    "unikd": [
        ({"pretrain_epochs": 0}, "unikd.pretrain_epochs", "greater than or equal to 1"),
        ({"score_threshold": 1.0}, "unikd.score_threshold", "less than 1"),
    ],
    "wad": [
        ({"contrastive": {"epochs": 0}}, "wad.contrastive.epochs", "greater than or equal to 1"),
        ({"contrastive": {"features": "logits"}}, "wad.contrastive.features", "'projection'"),
    ],
}


def schema_fields(section: str) -> set[str]:
    """The field names of recipe section ``section`` in the published JSON schema (``kdkit validate --schema``)."""
    schema = Recipe.model_json_schema()
    refs = [option["$ref"] for option in schema["properties"][section]["anyOf"] if "$ref" in option]
    assert len(refs) == 1, schema["properties"][section]
    return set(schema["$defs"][refs[0].rsplit("/", 1)[-1]]["properties"])


@pytest.mark.parametrize("name", NAMES)
def test_registered_method_honours_the_contract(name: str, tiny_kd: dict, tmp_path: Path) -> None:
    method = METHODS.get(name)
    assert isinstance(method, Method) and method.name == name
    assert (method.section is None) == (method.spec is None), "give both `section` and `spec`, or neither"
    if method.section is not None:
        assert method_sections()[method.section] is method
        spec = method.spec()  # every setting has a default: `tst: {}` is a valid section
        for mode in ("python", "json"):  # json: what run folders and checkpoints store
            assert method.spec.model_validate(spec.model_dump(mode=mode)) == spec
        fields = {f.alias or n for n, f in method.spec.model_fields.items()}
        assert fields and fields == schema_fields(method.section)
    folder = tmp_path / "finished"
    folder.mkdir()
    assert method.report_section("run", {}, folder) == ""
    fields = method.bench_fields([{}])
    notes = method.bench_notes({"method": "x"})
    assert isinstance(fields, dict) and isinstance(notes, list) and all(isinstance(n, str) for n in notes)
    assert method.active(recipe_from_dict(tiny_kd)) is False


def test_every_method_with_a_section_has_refusal_and_bad_value_cases() -> None:
    assert set(WITH_SECTION) == set(REFUSALS) == set(BAD_VALUES)


@pytest.mark.parametrize(("name", "why", "edit", "section", "expected"),
                         [(n, *case) for n, cases in REFUSALS.items() for case in cases],
                         ids=[f"{n}-{case[0]}" for n, cases in REFUSALS.items() for case in cases])
def test_method_section_in_a_recipe_lacking_what_it_needs_is_refused(
        name: str, why: str, edit: Any, section: dict[str, Any], expected: str, tiny_kd: dict) -> None:
    # the case is valid without the section: the refusal is the method's
    edit(tiny_kd)
    recipe_from_dict(tiny_kd)
    tiny_kd[METHODS.get(name).section] = section
    with pytest.raises(KdkitError, match="1 problem") as info:
        recipe_from_dict(tiny_kd)  # schema validation: before any model, data or training
    assert expected in str(info.value)


@pytest.mark.parametrize(("name", "value", "key", "fix"),
                         [(n, *case) for n, cases in BAD_VALUES.items() for case in cases],
                         ids=[f"{n}-{case[1]}" for n, cases in BAD_VALUES.items() for case in cases])
def test_bad_value_in_a_method_section_fails_validate_with_the_key_and_a_fix(
        name: str, value: dict[str, Any], key: str, fix: str, tiny_kd: dict, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    recipe_from_dict(tiny_kd)  # the recipe is fine until the bad section value
    bad = copy.deepcopy(tiny_kd)
    bad[METHODS.get(name).section] = value
    path = write_recipe(tmp_path / "bad.yaml", bad)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"FAIL {path}" in err and f"- {key}:" in err and fix in err and "fix:" in err
