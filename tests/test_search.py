"""``kdkit search``: distillers as decision sequences, the strategies (MCTS, evolution, random), trials as proxy runs
on a validation split sharing one teacher cache, resuming after ``kill -9``, and bad input refused before a trial."""

from __future__ import annotations

import copy
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import kill_9_in_trial_1, write_recipe
from conftest import optuna_trials as _trials
from kdkit.cli import main
from kdkit.grammar import BoundSpace, parse_space
from kdkit.grammar.space import Candidate, SearchSettings
from kdkit.recipe import recipe_from_dict, recipes_root
from kdkit.search.actions import Decisions
from kdkit.search.strategies import Tree, Tried, _mutate, propose

pytest.importorskip("optuna")

SHAPES = {("logits", "logits"): ((10,), (10,)), ("stage2", "stage2"): ((16, 7, 7), (64, 7, 7))}
SMALL: dict[str, Any] = {
    "recipe": str(recipes_root() / "fashion_mnist" / "kd.yaml"),
    "pairs": [{"student": "logits", "teacher": "logits"}, {"student": "stage2", "teacher": "stage2"}],
    "transforms": {"softmax_t": {"temperature": [1, 4]}, "standardize": {}, "attention": {}},
    "max_chain": 2,
    "distances": {"kl": {}, "mse": {}},
    "weights": [1, 10],
    "terms": [1, 2],
}


def small(**changes: Any) -> BoundSpace:
    return BoundSpace(parse_space({**copy.deepcopy(SMALL), **changes}), SHAPES)


def every_path(decisions: Decisions, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    choices = decisions.choices(path)
    if not choices:
        return [path]
    return [whole for c in choices for whole in every_path(decisions, (*path, c))]


def test_decision_sequences_are_exactly_the_spaces_distillers_each_once() -> None:
    space = small()
    decisions = Decisions(space)
    paths = every_path(decisions)
    built = [decisions.candidate(p) for p in paths]
    assert len(paths) == space.size() == len(set(built))
    assert set(built) == set(space.candidates())
    for path, candidate in zip(paths, built, strict=True):
        assert decisions.path(candidate) == path  # one sequence per distiller, whatever its terms' order
        assert decisions.path(Candidate(candidate.terms[::-1])) == path


def test_the_first_levels_choose_terms_then_pair_then_transforms() -> None:
    decisions = Decisions(small())
    assert decisions.choices(()) == ["n:1", "n:2"]
    assert decisions.choices(("n:1",)) == ["pair:logits,logits", "pair:stage2,stage2"]
    after = decisions.choices(("n:1", "pair:stage2,stage2"))
    assert after == ["t:attention"]  # raw stage2 maps differ in channels: only the attention map fits
    # two terms, first on stage2 (the last cores): no core is left after it for a second term
    assert "pair:stage2,stage2" not in decisions.choices(("n:2",)) or any(
        c.student == "stage2" for c in small().cores[:-1])


def history_of(space: BoundSpace, settings: SearchSettings, reward: Any, n: int) -> list[Tried]:
    decisions = Decisions(space)
    history: list[Tried] = []
    for _ in range(n):
        candidate = propose(space, decisions, history, settings)
        history.append(Tried(candidate, reward(candidate)))
    return history


def synthetic(candidate: Candidate) -> float | None:
    """A made-up reward: KL on the logits is best; every third mse candidate 'fails'."""
    score = 0.0
    for core, weight in candidate.terms:
        score += (2.0 if core.distance == "kl" else 0.5) * (2.0 if core.student == "logits" else 1.0) + weight / 100
    if all(core.distance == "mse" for core, _ in candidate.terms) and len(core.transforms) == 2:
        return None
    return score


@pytest.mark.parametrize("strategy", ["mcts", "evolution", "random"])
def test_strategies_are_deterministic_in_their_history_and_never_repeat(strategy: str) -> None:
    space = small()
    settings = SearchSettings(strategy=strategy, seed=3, evolution={"population": 4})
    history = history_of(space, settings, synthetic, 30)
    assert len({t.candidate for t in history}) == 30
    again = history_of(space, settings, synthetic, 30)
    assert [t.candidate for t in again] == [t.candidate for t in history]
    # a restart after 12 trials proposes what the uninterrupted search proposed next
    assert propose(space, Decisions(space), history[:12], settings) == history[12].candidate
    other = history_of(space, SearchSettings(strategy=strategy, seed=4, evolution={"population": 4}), synthetic, 30)
    assert [t.candidate for t in other] != [t.candidate for t in history]


def test_tree_counts_visits_and_min_max_normalised_rewards_on_every_prefix() -> None:
    space = small(terms=[1])
    decisions = Decisions(space)
    a, b, c = (Candidate(((core, 1.0),)) for core in (space.cores[0], space.cores[1], space.cores[-1]))
    tree = Tree([Tried(a, 0.5), Tried(b, 0.7), Tried(c, 0.9), Tried(a, None)], decisions)
    assert tree.visits[()] == 4 and tree.total[()] == pytest.approx(0.0 + 0.5 + 1.0 + 0.0)
    pa = decisions.path(a)
    assert tree.visits[pa] == 2 and tree.total[pa] == 0.0  # its failure counts as the worst reward
    root, child = (), pa[:1]
    expected = tree.total[child] / tree.visits[child] + 1.5 * (__import__("math").log(4) / tree.visits[child]) ** 0.5
    assert tree.uct(root, child, 1.5) == pytest.approx(expected)


def test_mcts_expands_an_untried_child_before_exploiting_then_follows_uct() -> None:
    space = small(terms=[1])
    decisions = Decisions(space)
    logits = next(c for c in space.cores if c.student == "logits")
    stage2 = next(c for c in space.cores if c.student == "stage2")
    settings = SearchSettings(strategy="mcts", mcts={"exploration": 0.5})
    # only the logits pair was tried: the pair level has an untried child, which is expanded
    first = propose(space, decisions, [Tried(Candidate(((logits, 1.0),)), 0.8)], settings)
    assert first.terms[0][0].student == "stage2"
    # both tried, logits far better: UCT (same exploration term for both) descends into logits
    history = [Tried(Candidate(((logits, 1.0),)), 0.9), Tried(Candidate(((stage2, 1.0),)), 0.1)]
    assert propose(space, decisions, history, settings).terms[0][0].student == "logits"
    # and the other way round
    history = [Tried(Candidate(((logits, 1.0),)), 0.1), Tried(Candidate(((stage2, 1.0),)), 0.9)]
    assert propose(space, decisions, history, settings).terms[0][0].student == "stage2"


@pytest.mark.parametrize("strategy", ["mcts", "evolution"])
def test_guided_strategies_spend_their_later_trials_where_the_reward_is_high(strategy: str) -> None:
    space = small()
    mean = {}
    for name in (strategy, "random"):
        history = history_of(space, SearchSettings(strategy=name, seed=0, evolution={"population": 6}), synthetic, 40)
        later = [t.reward or 0.0 for t in history[20:]]  # a failure scores 0
        mean[name] = sum(later) / len(later)
    assert mean[strategy] > 1.3 * mean["random"]


@pytest.mark.parametrize("seed", range(40))
def test_a_mutation_changes_one_component_of_one_term_or_adds_or_drops_a_term(seed: int) -> None:
    space = small()
    parent = space.sample(seed)
    child = _mutate(list(parent.terms), space, random.Random(seed))
    if len(child) != len(parent.terms):
        assert abs(len(child) - len(parent.terms)) == 1 and len(child) in space.term_counts
        assert set(child) ^ set(parent.terms) and (set(child) < set(parent.terms) or set(parent.terms) < set(child))
        return
    changed = [(old, new) for old, new in zip(parent.terms, child, strict=True) if old != new]
    assert len(changed) <= 1  # (a mutation may find no neighbour: then nothing changes)
    for (core, weight), (new_core, new_weight) in changed:
        differs = [(core.student, core.teacher) != (new_core.student, new_core.teacher),
                   (core.transforms, core.transform_params) != (new_core.transforms, new_core.transform_params),
                   (core.distance, core.distance_params) != (new_core.distance, new_core.distance_params),
                   weight != new_weight]
        assert sum(differs) == 1


# -- end to end --------------------------------------------------------------------------------------------------------

def space_file(tmp_path: Path, base: Path, **search: Any) -> Path:
    data = {"recipe": str(base),
            "pairs": [{"student": "logits", "teacher": "logits"}, {"student": "stage2", "teacher": "stage2"}],
            "transforms": {"softmax_t": {"temperature": [1, 4]}, "attention": {}},
            "max_chain": 2, "distances": {"kl": {}, "mse": {}}, "weights": [0.5, 1], "terms": [1],
            "search": {"strategy": "random", "trials": 3, "proxy": {"epochs": 1, "validation": 0.2}, **search}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_search_trials_are_proxy_runs_on_a_validation_split_sharing_one_teacher_cache(
        tmp_path: Path, tiny_kd: dict, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_kd["train"]["epochs"] = 4
    base = write_recipe(tmp_path / "tiny.yaml", tiny_kd)
    out = tmp_path / "out"
    assert main(["search", str(space_file(tmp_path, base)), "--out", str(out)]) == 0
    assert "train it (test split): kdkit run" in capsys.readouterr().out
    result = json.loads((out / "search.json").read_text())
    assert result["complete"] == 3 and len({r["formula"] for r in result["trials"]}) == 3
    keys = set()
    for row in result["trials"]:
        trial = yaml.safe_load((Path(row["run_dir"]) / "recipe.yaml").read_text())
        assert trial["data"]["validation"] == {"fraction": 0.2, "seed": 0} and trial["train"]["epochs"] == 1
        assert trial["teacher"]["cache"]["taps"] == ["logits", "stage2"]
        keys.add(json.loads((Path(row["run_dir"]) / "summary.json").read_text())["teacher_cache"]["key"])
    assert len(keys) == 1  # one cache, built once, read by every trial
    (cache,) = result["cost"]["teacher_caches"]
    assert result["cost"]["teacher_forwards"] == cache["views"] * cache["images"] == 1 * 160  # 200 - 20 % held out
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert "validation" not in best["data"] and best["train"]["epochs"] == 4  # the base recipe's run, test split
    assert best["teacher"] == recipe_from_dict(tiny_kd).to_dict()["teacher"]  # no proxy cache
    winner = yaml.safe_load((out / "trials" / str(result["best"]["number"]) / "recipe.yaml").read_text())
    assert recipe_from_dict(best).distill == recipe_from_dict(winner).distill
    assert best["distill"][0]["loss"] == "composed"
    report = (out / "report.md").read_text()
    assert result["best"]["formula"] in report and "teacher forwards" in report


@pytest.mark.slow
def test_kill_9_mid_trial_then_rerun_finishes_that_trial_and_proposes_as_if_uninterrupted(
        tmp_path: Path, tiny_kd: dict) -> None:
    base = write_recipe(tmp_path / "tiny.yaml", tiny_kd)
    space = space_file(tmp_path, base, strategy="mcts", proxy={"epochs": 2, "validation": 0.2})
    out, marker = tmp_path / "out", tmp_path / "killed_here"
    command = ["search", str(space), "--out", str(out)]
    env = kill_9_in_trial_1(command, marker)
    before = {t.number: t for t in _trials(out / "search.db")}
    assert [(n, t.state.name) for n, t in sorted(before.items())] == [(0, "COMPLETE"), (1, "RUNNING")]

    done = subprocess.run([sys.executable, "-m", "kdkit", *command], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming trial 1" in done.stdout
    after = _trials(out / "search.db")
    assert [t.state.name for t in after] == ["COMPLETE"] * 3
    assert after[0].value == before[0].value and after[1].user_attrs["resumed"] == 1
    formulas = [t.user_attrs["candidate"]["formula"] for t in after]
    assert formulas[:2] == [before[n].user_attrs["candidate"]["formula"] for n in (0, 1)] and len(set(formulas)) == 3
    epochs = [row["epoch"] for row in json.loads((out / "trials" / "1" / "metrics.json").read_text())]
    assert epochs == [1, 2]  # continued from its epoch-1 checkpoint, no epoch twice

    # an uninterrupted search of the same space proposes the same three distillers
    fresh = tmp_path / "fresh"
    assert main(["search", str(space), "--out", str(fresh)]) == 0
    assert [t.user_attrs["candidate"]["formula"] for t in _trials(fresh / "search.db")] == formulas


@pytest.mark.parametrize(("args", "search", "expected"), [
    (["--trials", "0"], {}, ["a budget of 0 trials searches nothing", "fix: give --trials 1 or more"]),
    ([], {"trials": 0}, ["search.trials", "greater than or equal to 1"]),
    (["--strategy", "mctz"], {}, ["unknown search strategy 'mctz'", "valid choices: mcts"]),
    ([], {"strategy": "genetic"}, ["search.strategy", "'mcts', 'evolution' or 'random'"]),
    ([], {"storage": "sqlite:////no/such/folder/s.db"}, ["cannot be opened", "fix: give a reachable database URL"]),
    ([], {"objective": "loss"}, ["objective 'loss' is not a metric", "fix: set search.objective"]),
], ids=["budget-0-flag", "budget-0-file", "unknown-strategy-flag", "unknown-strategy-file", "storage", "objective"])
def test_bad_input_exits_2_before_any_trial(tmp_path: Path, tiny_kd: dict, args: list[str], search: dict,
                                            expected: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    base = write_recipe(tmp_path / "tiny.yaml", tiny_kd)
    out = tmp_path / "out"
    assert main(["search", str(space_file(tmp_path, base, **search)), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err
    assert not (out / "trials").exists()


def test_a_space_naming_a_tap_the_networks_lack_exits_2(tmp_path: Path, tiny_kd: dict,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    base = write_recipe(tmp_path / "tiny.yaml", tiny_kd)
    path = space_file(tmp_path, base)
    data = yaml.safe_load(path.read_text())
    data["pairs"][1]["teacher"] = "stage9"
    path.write_text(yaml.safe_dump(data))
    assert main(["search", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "stage9" in err and "stage2" in err


def test_cache_taps_must_cover_the_teacher_taps_the_terms_read(tmp_path: Path, tiny_kd: dict,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    tiny_kd["teacher"]["cache"] = {"views": 1, "taps": ["logits"]}
    tiny_kd["distill"].append({"loss": "composed", "student": "stage2", "teacher": "stage2",
                               "transforms": ["attention"], "distance": "mse"})
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", tiny_kd))]) == 2
    err = capsys.readouterr().err
    assert "reads teacher tap 'stage2', which teacher.cache.taps does not store" in err and "add 'stage2'" in err


def test_cache_taps_stores_the_listed_taps_even_when_no_term_reads_them(tmp_path: Path, cached: dict) -> None:
    from conftest import built_cache

    cached["teacher"]["cache"]["taps"] = ["logits", "stage1", "stage2"]
    _, _, cache, _, _ = built_cache(cached)
    assert cache.specs == ["logits", "stage1", "stage2"]
