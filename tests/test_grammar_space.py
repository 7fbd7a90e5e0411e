"""The distiller search space: its size, enumeration, seeded sampling, candidates as recipes and formulas, and bad
input refused before anything runs."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kdkit.cli import main
from kdkit.errors import KdkitError, RecipeErrors
from kdkit.grammar import BoundSpace, open_space, parse_space
from kdkit.losses.composed import ComposedLoss
from kdkit.recipe import recipes_root

EXAMPLE = recipes_root() / "fashion_mnist" / "search_space.yaml"
BASE = str(recipes_root() / "fashion_mnist" / "kd.yaml")
SHAPES = {("logits", "logits"): ((10,), (10,)), ("stage2", "stage2"): ((16, 7, 7), (64, 7, 7))}
SMALL: dict[str, Any] = {
    "recipe": BASE,
    "pairs": [{"student": "logits", "teacher": "logits"}, {"student": "stage2", "teacher": "stage2"}],
    "transforms": {"softmax_t": {"temperature": [1, 4]}, "standardize": {}, "attention": {}},
    "max_chain": 2,
    "distances": {"kl": {}, "mse": {}},
    "weights": [1, 10],
    "terms": [1, 2],
}


@pytest.fixture(scope="module")
def example() -> BoundSpace:
    return open_space(EXAMPLE)


def small(**changes: Any) -> BoundSpace:
    data = {**copy.deepcopy(SMALL), **changes}
    return BoundSpace(parse_space(data), SHAPES)


def test_small_space_holds_exactly_the_terms_that_fit() -> None:
    space = small()
    found = {(c.student, c.transforms, tuple(sorted(c.transform_params.get("softmax_t", {}).items())), c.distance)
             for c in space.cores}
    expected = set()
    for t in (1, 4):  # logits: [softmax_t] and [standardize, softmax_t] with kl or mse
        for chain in (("softmax_t",), ("standardize", "softmax_t")):
            expected |= {("logits", chain, (("temperature", t),), d) for d in ("kl", "mse")}
        # stage2: softmax over the attention map's positions
        expected |= {("stage2", ("attention", "softmax_t"), (("temperature", t),), d) for d in ("kl", "mse")}
    expected |= {("logits", (), (), "mse"), ("logits", ("standardize",), (), "mse")}
    expected |= {("stage2", ("attention",), (), "mse")}  # raw stage2 maps differ in channels: only attention fits
    assert found == expected


def test_size_is_the_number_of_candidates_enumerated_each_once() -> None:
    space = small()
    cores, weights = len(space.cores), 2
    assert space.size() == cores * weights + math.comb(cores, 2) * weights**2 == 15 * 2 + 105 * 4
    listed = [yaml.safe_dump(c.to_distill()) for c in space.candidates()]
    assert len(listed) == space.size() == len(set(listed))


def test_sampling_is_deterministic_by_seed_and_stays_in_the_space() -> None:
    space = small()
    draws = [space.sample(seed) for seed in range(40)]
    assert [d.to_distill() for d in draws] == [space.sample(seed).to_distill() for seed in range(40)]
    assert len({yaml.safe_dump(d.to_distill()) for d in draws}) > 20
    for draw in draws:
        assert 1 <= len(draw.terms) <= 2
        assert all(core in space.cores and weight in (1, 10) for core, weight in draw.terms)


def test_shipped_example_size_is_the_stated_one(example: BoundSpace) -> None:
    assert (len(example.cores), example.size()) == (896, 6_418_944)
    assert "896 valid terms (cores), 6,418,944 distillers" in EXAMPLE.read_text()


@pytest.mark.parametrize("stride", [pytest.param(1, marks=pytest.mark.slow), 29])
def test_every_term_of_the_shipped_space_builds_and_computes_a_finite_loss(example: BoundSpace, stride: int) -> None:
    """Every core (slow: 896 losses built), or every 29th (31 cores, every chain length, pair and distance family)."""
    shapes = {("logits", "logits"): ((10,), (10,)), ("stage1", "stage1"): ((8, 14, 14), (32, 14, 14)),
              ("stage2", "stage2"): ((16, 7, 7), (64, 7, 7))}
    generator = torch.Generator().manual_seed(0)
    for core in example.cores[::stride]:
        entry = {k: v for k, v in core_entry(core).items() if k in ("transforms", "transform_params", "distance",
                                                                     "distance_params")}
        loss = ComposedLoss(**entry)
        s_shape, t_shape = shapes[(core.student, core.teacher)]
        assert loss.check_shapes(s_shape, t_shape) is None, core
        student = torch.randn(4, *s_shape, generator=generator, requires_grad=True)
        value = loss(student, torch.randn(4, *t_shape, generator=generator), None)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(student.grad).all(), core.formula()


def core_entry(core: Any) -> dict[str, Any]:
    from kdkit.grammar import Candidate

    return Candidate(((core, 1.0),)).to_distill()[0]


@pytest.mark.slow  # validating the Fashion-MNIST base recipe reads its data (~9 s)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_sampled_candidate_is_an_ordinary_recipe(example: BoundSpace, seed: int, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    recipe = yaml.safe_load(Path(BASE).read_text())
    recipe["teacher"]["recipe"] = str(recipes_root() / "fashion_mnist" / "teacher.yaml")
    recipe["distill"] = example.sample(seed).to_distill()
    recipe["output"] = {"dir": str(tmp_path / "run")}
    path = tmp_path / "candidate.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err


def test_candidate_formula_reads_like_the_paper() -> None:
    space = small(pairs=[{"student": "logits", "teacher": "logits"}], transforms={
        "standardize": {}, "softmax_t": {"temperature": [2]}}, distances={"kl": {}}, weights=[9], terms=[1])
    kd = next(c for c in space.candidates() if c.terms[0][0].transforms == ("standardize", "softmax_t"))
    assert kd.formula() == "9·KL(softmax(std(t.logits)/2) ‖ softmax(std(s.logits)/2))·2²"
    assert kd.to_distill() == [{"loss": "composed", "student": "logits", "teacher": "logits", "weight": 9.0,
                                "transforms": ["standardize", "softmax_t"],
                                "transform_params": {"softmax_t": {"temperature": 2}}, "distance": "kl"}]


# -- bad input -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "where", "first_choice"), [
    ({"transforms": {"softmx_t": {}}}, "transforms.softmx_t", "softmax_t"),
    ({"distances": {"kld": {}}}, "distances.kld", "kl"),
    ({"transforms": {"softmax_t": {"temprature": [2]}}}, "transforms.softmax_t.temprature", "temperature"),
    ({"pairz": []}, "pairz", "pairs"),
])
def test_unknown_names_are_refused_with_the_closest_choice_first(change: dict[str, Any], where: str,
                                                                 first_choice: str) -> None:
    with pytest.raises(KdkitError) as err:
        parse_space({**copy.deepcopy(SMALL), **change})
    errors = err.value.errors if isinstance(err.value, RecipeErrors) else [err.value]
    hit = next(e for e in errors if e.where and e.where.startswith(where))
    assert hit.choices[0] == first_choice and hit.fix


@pytest.mark.parametrize(("change", "message"), [
    ({"transforms": {"softmax_t": {"temperature": [0]}}}, "temperature must be > 0"),
    ({"transforms": {"identity": {}}}, "identity is the empty chain"),
    ({"distances": {}}, "at least 1 item"),
    ({"weights": [-1]}, "greater than 0"),
    ({"pairs": []}, "at least 1 item"),
])
def test_bad_values_are_refused_naming_them(change: dict[str, Any], message: str) -> None:
    with pytest.raises(KdkitError, match=message):
        parse_space({**copy.deepcopy(SMALL), **change})


def test_an_empty_space_is_refused_with_a_fix() -> None:
    with pytest.raises(KdkitError, match="the search space is empty: 0 valid term") as err:
        small(pairs=[{"student": "stage2", "teacher": "stage2"}], transforms={}, distances={"kl": {}})
    assert "fix:" in str(err.value)
    with pytest.raises(KdkitError, match="1 valid term"):
        small(pairs=[{"student": "stage2", "teacher": "stage2"}], transforms={"attention": {}},
              distances={"mse": {}}, terms=[2])


def test_unknown_tap_names_the_closest_taps(tmp_path: Path) -> None:
    data = {**copy.deepcopy(SMALL), "pairs": [{"student": "stage3", "teacher": "stage2"}]}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(KdkitError) as err:
        open_space(path)
    assert err.value.where == "pairs.0.student" and err.value.choices[0] in ("stage1", "stage2")


def test_missing_base_recipe_and_space_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**copy.deepcopy(SMALL), "recipe": "no_such.yaml"}))
    with pytest.raises(KdkitError, match=r"no recipe file 'no_such\.yaml'"):
        open_space(path)
    with pytest.raises(KdkitError, match="no search space file"):
        open_space(tmp_path / "absent.yaml")


def test_validate_checks_a_space_file_and_states_its_size(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["validate", str(EXAMPLE)]) == 0
    assert "896 terms, 6,418,944 distillers of 1/2 term(s)" in capsys.readouterr().out
    bad = tmp_path / "search_space.yaml"
    bad.write_text(yaml.safe_dump({**copy.deepcopy(SMALL), "distances": {"kld": {}}}))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "distances.kld: unknown distance 'kld'; valid choices: kl" in err and "fix:" in err
