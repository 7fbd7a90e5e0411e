"""The method plugin core: only a method's folder names it, methods combine or are refused, and every
entry point (run, bench speed) runs what the recipe's methods add."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from conftest import write_recipe
from kdkit.bench.speed import run_speed_bench
from kdkit.errors import KdkitError
from kdkit.method import METHODS, active_methods
from kdkit.methods.tst.trainer import TstTrainer
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe

SRC = Path(__file__).resolve().parents[1] / "src" / "kdkit"
GREY = ["brightness", "contrast", "rotate", "shear_x"]
#: What names a built-in method in code: its folder's module path, its losses, bridges and helpers.
NAMES = {
    "ferkd": r"kdkit\.methods\.ferkd|\bferkd\b|\bFerkd[A-Z]\w*|\bFerKD\b|\bSelfMix\w*",
    "mdcs": r"kdkit\.methods\.mdcs|\bmdcs(_experts)?\b|\bMdcs[A-Z]\w*|\bMDCS\b",
    "meal_v2": r"kdkit\.methods\.meal_v2|\bmeal[ _]?v2\w*|\bMealV2\w*",
    "byot": r"kdkit\.methods\.byot|\bbyot\w*|\bByot[A-Z]\w*|be your own teacher",
    "dho": r"kdkit\.methods\.dho|\bdho(_head)?\b|\bDho[A-Z]\w*|\bDHO\b|dual-head",
    "tst": r"kdkit\.methods\.tst|\btst\b|\bTst[A-Z]\w*|\bTST\b",
    "fmkt": r"kdkit\.methods\.fmkt|fm-?kt|\bflow_feature\b|\bFlowBridge\b|\bflow_costs\b|\bhas_flow\b",
    "orc": r"kdkit\.methods\.orc|\borc\b|\bOrc[A-Z]\w*|online role change",
    "source_select": r"kdkit\.methods\.source_select|\bsource_(select|kd)\b|\bSource(Select|KD)\w*"
                     r"|distill ?(nearest|weighted)",
    "ssld": r"kdkit\.methods\.ssld|\bssld\b|\bSSLD\w*",
}


@pytest.mark.parametrize("method", sorted(NAMES))
def test_only_the_method_folder_names_the_method(method: str) -> None:
    """Outside ``kdkit/methods/<name>/`` a method appears in exactly one line: its registration."""
    pattern = re.compile(NAMES[method], re.IGNORECASE)
    hits = []
    for file in sorted(SRC.rglob("*.py")):
        relative = file.relative_to(SRC)
        if relative.parts[:2] == ("methods", method):
            continue
        hits += [f"{relative}:{n}: {line.strip()}" for n, line in enumerate(file.read_text().splitlines(), 1)
                 if pattern.search(line)]
    registration = [h for h in hits if h.startswith("methods/__init__.py:")]
    assert len(registration) == 1, registration
    assert not [h for h in hits if h not in registration], "\n".join(hits)


def test_the_grep_finds_a_method_named_elsewhere(tmp_path: Path) -> None:
    # the patterns above do match the ways code names a method (so the test above can fail)
    for method, text in (("tst", "from kdkit.methods.tst.trainer import TstTrainer"), ("tst", "if recipe.tst:"),
                         ("dho", "bridge: dho_head"), ("dho", "from kdkit.methods.dho import DhoHead"),
                         ("fmkt", "summary['flow'] = flow_costs(student)"), ("fmkt", "# FM-KT's chain")):
        assert re.search(NAMES[method], text, re.IGNORECASE), text


def with_tst(recipe: dict) -> dict:
    recipe["tst"] = {"ops": GREY, "policy_epochs": [1], "policy_passes": 0.5}
    return recipe


@pytest.mark.slow
def test_tst_and_fmkt_combine_in_one_run(tiny_kd: dict) -> None:
    recipe = with_tst(tiny_kd)
    recipe["distill"] = [{"loss": "fmkt", "student": "stage2", "bridge": "flow", "metric": "kd",
                          "bridge_params": {"steps": 2, "eval_steps": 2}}]
    built = recipe_from_dict(recipe)
    assert sorted(m.name for m in active_methods(built)) == ["fmkt", "tst"]
    summary = run_recipe(built)
    assert summary["tst_policy_phases"] == 1  # TST's phase ran
    assert summary["flow"]["deployed"] == "fmkt_n2"  # FM-KT's summary section
    assert summary["deployed"]["flops"] == summary["flow"]["variants"]["fmkt_n2"]["flops"]


def test_a_combination_that_cannot_work_is_refused_with_the_reason(tiny_kd: dict) -> None:
    recipe = with_tst(copy.deepcopy(tiny_kd))
    recipe["teacher"]["cache"] = {"views": 2}
    with pytest.raises(KdkitError, match=r"teacher.cache cannot be combined with method 'tst'"):
        recipe_from_dict(recipe)


def test_unknown_top_level_key_lists_the_method_sections(tiny: dict) -> None:
    tiny["tsst"] = {}
    with pytest.raises(KdkitError) as info:
        recipe_from_dict(tiny)
    assert "unknown key 'tsst'" in info.value.render() and "tst" in info.value.render()


@pytest.mark.slow
def test_bench_speed_times_the_steps_a_method_adds(tmp_path: Path, tiny_kd: dict,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = TstTrainer.batch_transform

    def counted(self, engine, x, y, index):
        calls.append(len(y))
        return original(self, engine, x, y, index)

    monkeypatch.setattr(TstTrainer, "batch_transform", counted)
    path = write_recipe(tmp_path / "tst_kd.yaml", with_tst(tiny_kd))
    result = run_speed_bench(str(path), tmp_path / "speed", steps=2, rounds=1, warmup=1, profile_steps=1)
    assert result["methods"] == ["tst"] and "c_kdkit_kd" in result["rows"]
    assert "d_kdkit_kd_cached" not in result["rows"]  # TST feeds the teacher new images: no cache
    assert len(calls) >= 2 and calls[0] == 32  # (c) ran TST's transform on every timed batch
    assert "with method tst" in (tmp_path / "speed" / "results.md").read_text()
    assert json.loads((tmp_path / "speed" / "speed.json").read_text())["methods"] == ["tst"]


def test_ls_methods_lists_every_registered_method(capsys: pytest.CaptureFixture[str]) -> None:
    from kdkit.cli import main

    assert main(["ls", "methods"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()[:-1]] == METHODS.names()
    assert "`tst:` (method tst)" in out
