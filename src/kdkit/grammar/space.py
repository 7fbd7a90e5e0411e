"""The distiller search space (``SPACE.yaml``): which terms a search may combine, how many there are, and candidates.

A *term* is ``(student tap, teacher tap) -> transform chain -> distance -> weight`` (a ``composed`` loss entry); a
*distiller* (a :class:`Candidate`) is a set of terms. The space file names a base recipe (the pair, data and
training; a candidate replaces its ``distill:``), the tap pairs, the allowed transforms (each with the choices of its
parameters) and the longest chain, the distances, the weights and the numbers of terms::

    recipe: kd.yaml
    pairs: [{student: logits, teacher: logits}, {student: stage2, teacher: stage2}]
    transforms: {softmax_t: {temperature: [1, 4]}, standardize: {}, attention: {}, l2_normalize: {}}
    max_chain: 2
    distances: {kl: {}, mse: {}, cka: {}}
    weights: [0.5, 1, 2]
    terms: [1, 2]

Chains are ordered sequences of distinct allowed transforms, of length 0 (the taps as they are) to ``max_chain``,
a softmax only last.
A *core* is a term without its weight; only cores whose chain applies to the pair's tap shapes and whose distance
can compare the results are in the space (the shapes are probed once from the base recipe's networks). A distiller
with ``n`` terms is ``n`` distinct cores, each with a weight, so the space holds
``sum_n C(cores, n) * len(weights)^n`` distillers. :class:`BoundSpace` enumerates them in a fixed order, counts them
and samples one deterministically from a seed -- what the search strategies (MCTS, evolution, random) build on.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from annotated_types import Ge, Gt
from pydantic import Field, ValidationError

from kdkit.build import KNOWN_SHAPES
from kdkit.errors import KdkitError, RecipeErrors
from kdkit.losses.composed import TENSOR_ARGS, chain_formula
from kdkit.losses.distances import DISTANCES
from kdkit.losses.transforms import TRANSFORMS, Misfit, Shape, fit_chain
from kdkit.models import build_model
from kdkit.params import check_params
from kdkit.recipe import Recipe, find_recipe, load_recipe, schema_errors
from kdkit.schema import Strict, read_yaml
from kdkit.taps import probe_shapes, resolve_tap

#: Choices of each parameter of a piece: ``{temperature: [1, 4]}`` (an empty mapping: the defaults).
ParamChoices = dict[str, Annotated[list[Any], Field(min_length=1)]]


class PairSpec(Strict):
    """A (student tap, teacher tap) pair a term may read (names as in recipes: ``logits``, ``stage2``, paths)."""

    student: str
    teacher: str


class ProxySpec(Strict):
    """How a candidate is scored: a short run of the base recipe on a validation split of its training images."""

    epochs: int = Field(3, ge=1, description="epochs of each proxy run (the base recipe's schedule, shortened)")
    validation: float = Field(0.1, gt=0, lt=1, description="share of the training images held out to score "
                              "candidates (class-balanced; the test split is never read by a trial)")
    cache: bool = Field(True, description="read the teacher from a cache of `epochs` stored views, holding every "
                        "tap of `pairs:`: the teacher runs once per search, not once per trial")


class MctsSpec(Strict):
    """Monte-Carlo tree search (Auto-KD): UCT over one component per tree level."""

    exploration: float = Field(1.0, gt=0, description="UCT constant c in Q + c*sqrt(ln N_parent / N_child), "
                               "rewards min-max normalised over the finished trials")
    widening: float = Field(0.5, gt=0, le=1, description="progressive widening: a node visited N times may have "
                            "tried max(1, N^widening) children (1: every child before any is exploited)")


class EvolutionSpec(Strict):
    """Steady-state evolution (KD-Zero): tournament selection from the best finished trials, crossover, mutation."""

    population: int = Field(8, ge=2, description="random candidates first, then the best `population` finished "
                            "trials are the parents")
    tournament: int = Field(3, ge=1, description="parents drawn per tournament (the best of them is picked)")
    crossover: float = Field(0.5, ge=0, le=1, description="probability that a child mixes two parents' terms")


class SearchSettings(Strict):
    """The search itself: strategy, budget, seeds, proxy runs and where trials are recorded."""

    strategy: Literal["mcts", "evolution", "random"] = Field("mcts", description="mcts (Auto-KD, the default), "
                                                             "evolution (KD-Zero) or random (the baseline)")
    trials: int = Field(20, ge=1, description="finished trials wanted (--trials replaces it)")
    seed: int = Field(0, description="seed of the strategy and of the validation split")
    proxy: ProxySpec = Field(default_factory=ProxySpec)
    objective: str | None = Field(None, description="summary metric to maximise (default: the task's best metric)")
    storage: str | None = Field(None, description="Optuna storage URL (default sqlite:///OUT/search.db)")
    study: str | None = Field(None, description="study name (default: derived from the space and base recipe)")
    mcts: MctsSpec = Field(default_factory=MctsSpec)
    evolution: EvolutionSpec = Field(default_factory=EvolutionSpec)


class SearchSpaceSpec(Strict):
    """The schema of ``SPACE.yaml`` (see the module docstring)."""

    recipe: str = Field(..., description="base recipe (path relative to this file, or a shipped name): the pair, "
                        "data and training; a candidate replaces its distill:")
    pairs: list[PairSpec] = Field(..., min_length=1, description="tap pairs a term may read")
    transforms: dict[str, ParamChoices] = Field(default_factory=dict, description="allowed transforms, each with "
                                                "the choices of its parameters")
    max_chain: int = Field(2, ge=0, le=4, description="longest transform chain (0: raw taps only)")
    distances: dict[str, ParamChoices] = Field(..., min_length=1, description="allowed distances, each with the "
                                               "choices of its parameters")
    weights: list[Annotated[float, Gt(0)]] = Field([1.0], min_length=1, description="term weight choices")
    terms: list[Annotated[int, Ge(1)]] = Field([1], min_length=1, description="choices of the number of terms")
    search: SearchSettings = Field(default_factory=SearchSettings, description="how `kdkit search` explores the "
                                   "space (strategy, budget, proxy runs)")


@dataclass(frozen=True)
class Core:
    """A term without its weight: tap pair, transform chain (with parameters) and distance (with parameters)."""

    student: str
    teacher: str
    transforms: tuple[str, ...]
    transform_params: dict[str, dict[str, Any]] = field(hash=False)
    distance: str
    distance_params: dict[str, Any] = field(hash=False)

    def formula(self) -> str:
        """The core as a formula over ``s.TAP`` and ``t.TAP``."""
        return chain_formula(self.transforms, self.transform_params, self.distance, self.distance_params,
                             f"s.{self.student}", f"t.{self.teacher}")


@dataclass(frozen=True)
class Candidate:
    """A distiller: its terms as ``(core, weight)`` pairs, in the space's core order."""

    terms: tuple[tuple[Core, float], ...]

    def to_distill(self) -> list[dict[str, Any]]:
        """The recipe's ``distill:`` list: one ``composed`` entry per term (plain data, YAML-ready)."""
        entries = []
        for core, weight in self.terms:
            entry: dict[str, Any] = {"loss": "composed", "student": core.student, "teacher": core.teacher,
                                     "weight": weight, "transforms": list(core.transforms)}
            given = {name: params for name, params in core.transform_params.items() if params}
            if given:
                entry["transform_params"] = given
            entry["distance"] = core.distance
            if core.distance_params:
                entry["distance_params"] = dict(core.distance_params)
            entries.append(entry)
        return entries

    def formula(self) -> str:
        """The distiller as a formula, e.g. ``1·KL(softmax(t.logits/4) ‖ softmax(s.logits/4))·4² + ...``."""
        return " + ".join(f"{weight:g}·{core.formula()}" for core, weight in self.terms)


class BoundSpace:
    """A space whose cores are checked against the tap shapes: count, enumerate, sample.

    Args:
        spec: The validated space.
        shapes: Per-sample ``(student_shape, teacher_shape)`` of each pair, by ``(student, teacher)`` tap names.
        source: The space file, for messages.

    Raises:
        KdkitError: No core fits the taps, or no allowed number of terms has enough cores (an empty space).
    """

    def __init__(self, spec: SearchSpaceSpec, shapes: dict[tuple[str, str], tuple[Shape, Shape]],
                 source: str | None = None) -> None:
        self.spec = spec
        self.cores = list(_valid_cores(spec, shapes))
        self.term_counts = [n for n in spec.terms if n <= len(self.cores)]
        if not self.term_counts:
            raise KdkitError(f"the search space is empty: {len(self.cores)} valid term(s) for distillers of "
                             f"{sorted(spec.terms)} term(s)", where=source,
                             fix="allow transforms and distances that fit the taps (e.g. softmax_t with kl on "
                                 "logits, attention or relation on feature maps), raise max_chain, or lower terms")

    def size(self) -> int:
        """Number of distillers: ``sum_n C(cores, n) * len(weights)^n`` over the allowed term counts ``n``."""
        weights = len(self.spec.weights)
        return sum(math.comb(len(self.cores), n) * weights**n for n in self.term_counts)

    def candidates(self) -> Iterator[Candidate]:
        """Every distiller once: by number of terms, then core combination, then weights (a fixed order)."""
        for n in sorted(self.term_counts):
            for chosen in itertools.combinations(self.cores, n):
                for weights in itertools.product(self.spec.weights, repeat=n):
                    yield Candidate(tuple(zip(chosen, weights, strict=True)))

    def sample(self, seed: int) -> Candidate:
        """One distiller drawn from ``seed`` alone (the same seed gives the same candidate): the number of terms
        uniformly among the allowed ones, then distinct cores and a weight for each uniformly."""
        rng = random.Random(seed)
        n = rng.choice(self.term_counts)
        chosen = sorted(rng.sample(range(len(self.cores)), n))
        return Candidate(tuple((self.cores[i], rng.choice(self.spec.weights)) for i in chosen))


def _param_combos(choices: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every assignment of the listed parameter choices (``[{}]`` when none are listed)."""
    names = list(choices)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*(choices[n] for n in names))]


def _chains(spec: SearchSpaceSpec) -> Iterator[tuple[tuple[str, ...], dict[str, dict[str, Any]]]]:
    """Every chain of distinct allowed transforms of length 0..max_chain (a terminal transform -- a softmax -- only
    last), with each parameter assignment."""
    names = list(spec.transforms)
    for length in range(spec.max_chain + 1):
        for chain in itertools.permutations(names, length):
            if any(TRANSFORMS.get(n).terminal for n in chain[:-1]):  # composed refuses them
                continue
            per_transform = [_param_combos(spec.transforms[n]) for n in chain]
            for params in itertools.product(*per_transform):
                yield chain, dict(zip(chain, params, strict=True))


def _valid_cores(spec: SearchSpaceSpec, shapes: dict[tuple[str, str], tuple[Shape, Shape]]) -> Iterator[Core]:
    """The cores whose chain applies to the pair's shapes and whose distance compares the chain's outputs."""
    chains = list(_chains(spec))
    distances = [(name, params) for name, choices in spec.distances.items()
                 for params in _param_combos(choices)]
    for pair in spec.pairs:
        s_shape, t_shape = shapes[(pair.student, pair.teacher)]
        for chain, chain_params in chains:
            fit = fit_chain(chain, chain_params, s_shape, t_shape)
            if isinstance(fit, Misfit):
                continue
            distribution = bool(chain) and TRANSFORMS.get(chain[-1]).distribution
            for name, params in distances:
                if DISTANCES.get(name).problem(fit[0], fit[1], distribution) is None:
                    yield Core(pair.student, pair.teacher, chain, chain_params, name, params)


# -- reading and checking a space file -------------------------------------------------------------------------------

def parse_space(data: Any, source: str | None = None) -> SearchSpaceSpec:
    """Validate a space's data: the schema, then every transform, distance and parameter choice by name.

    Raises:
        RecipeErrors: Every problem found (unknown keys, names with the closest choices, bad parameter values).
    """
    if not isinstance(data, dict):
        raise KdkitError(f"a search space is a mapping of keys, got {type(data).__name__}", where=source,
                         fix="see recipes/fashion_mnist/search_space.yaml")
    try:
        spec = SearchSpaceSpec.model_validate(data)
    except ValidationError as exc:
        raise RecipeErrors(schema_errors(exc, SearchSpaceSpec, fix="see docs/distiller-grammar.md for the keys",
                                         whole="space"), source) from None
    errors = _piece_errors(spec)
    if errors:
        raise RecipeErrors(errors, source)
    return spec


def _piece_errors(spec: SearchSpaceSpec) -> list[KdkitError]:
    """Unknown transforms and distances (closest first), ``identity`` listed, and parameter choices their
    functions refuse (unknown parameter, wrong type, out of bounds)."""
    errors: list[KdkitError] = []
    for key, registry, chosen in (("transforms", TRANSFORMS, spec.transforms),
                                  ("distances", DISTANCES, spec.distances)):
        for name, choices in chosen.items():
            where = f"{key}.{name}"
            if name not in registry:
                errors.append(KdkitError(f"unknown {registry.kind} {name!r}", choices=registry.names(), bad=name,
                                         fix="use a registered name (docs/distiller-grammar.md lists them)",
                                         where=where))
                continue
            if name == "identity":
                errors.append(KdkitError("identity is the empty chain, which every space already includes",
                                         fix="remove it from transforms", where=where))
                continue
            fn = registry.get(name).fn
            for param, values in choices.items():
                for i, value in enumerate(values):
                    try:
                        check_params(fn, {param: value}, skip=TENSOR_ARGS, where=f"{where}.{param}.{i}",
                                     what=f"{registry.kind} {name!r}")
                    except KdkitError as exc:
                        errors.extend(exc.errors if isinstance(exc, RecipeErrors) else [exc])
    return errors


def load_space(path: str | Path) -> tuple[SearchSpaceSpec, Path]:
    """Read and validate a ``SPACE.yaml``; returns the space and its base recipe's resolved path.

    Raises:
        KdkitError: A missing file, invalid YAML, or what :func:`parse_space` and :func:`find_recipe` report.
    """
    file = Path(path)
    if not file.is_file():
        raise KdkitError(f"no search space file {str(path)!r}", fix="give the path of a SPACE.yaml "
                         "(recipes/fashion_mnist/search_space.yaml is an example)")
    spec = parse_space(read_yaml(file.read_text()), str(file))
    return spec, find_recipe(spec.recipe, relative_to=file.parent, where="recipe")


def pair_shapes(spec: SearchSpaceSpec, recipe: Recipe, data_shape: tuple[int, int, int] | None = None
                ) -> dict[tuple[str, str], tuple[Shape, Shape]]:
    """Per-sample shapes of each tap pair, probed once on the base recipe's student and teacher (random weights).

    Args:
        spec: The space.
        recipe: Its base recipe.
        data_shape: ``(classes, channels, image size)`` of the recipe's data; default: the dataset's known shape
            (the space is then checked without loading the data).

    Raises:
        KdkitError: The recipe has no teacher, or a tap that neither network has (closest taps first).
    """
    if recipe.teacher is None:
        raise KdkitError("the base recipe has no teacher to distil from", where="recipe",
                         fix="point recipe: at a recipe with a teacher: section (e.g. fashion_mnist/kd)")
    if data_shape is None and recipe.data.dataset not in KNOWN_SHAPES:
        raise KdkitError(f"the base recipe's dataset {recipe.data.dataset!r} has no known image shape",
                         choices=list(KNOWN_SHAPES), bad=recipe.data.dataset, where="recipe",
                         fix="use a base recipe on one of these datasets, or add the dataset's (classes, channels, "
                             "size) to kdkit.build.KNOWN_SHAPES")
    classes, channels, size = data_shape or KNOWN_SHAPES[recipe.data.dataset]
    shapes: dict[str, dict[str, Shape]] = {}
    for side, net in (("student", recipe.model), ("teacher", recipe.teacher)):
        model = build_model(net.arch, num_classes=classes, in_channels=channels, image_size=size, params=net.params)
        taps = {getattr(p, side): resolve_tap(model, getattr(p, side), where=f"pairs.{i}.{side}")
                for i, p in enumerate(spec.pairs)}
        shapes[side] = probe_shapes(model, list(taps.values()), torch.zeros(2, channels, size, size))
    return {(p.student, p.teacher): (shapes["student"][p.student], shapes["teacher"][p.teacher]) for p in spec.pairs}


def open_space(path: str | Path) -> BoundSpace:
    """Load ``SPACE.yaml``, probe its taps on the base recipe's networks and bind the space (all checks first).

    Raises:
        KdkitError: Any bad input (see :func:`load_space`, :func:`pair_shapes`, :class:`BoundSpace`).
    """
    spec, recipe_path = load_space(path)
    return BoundSpace(spec, pair_shapes(spec, load_recipe(recipe_path)), source=str(path))
