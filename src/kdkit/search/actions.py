"""A distiller as a sequence of decisions, one component per step: what a search tree branches on.

Auto-KD's tree chooses one component per level. Here a distiller with ``n`` terms is the decisions

    n:<terms>, then per term (in the space's core order): pair, each transform of the chain (with its
    parameters) and ``end`` when the chain is shorter than ``max_chain``, the distance (with its parameters),
    the weight

so the tree's first levels choose the number of terms and the tap pair, the next ones the transforms, and so on.
Only decisions that still lead to a valid term are offered: the choices at a step are those of the valid cores
(:class:`kdkit.grammar.space.BoundSpace`) that agree with the steps taken. Terms are taken in increasing core order
(and each core at most once), so every distiller has exactly one decision sequence.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from typing import Any

from kdkit.grammar.space import BoundSpace, Candidate, Core

Path = tuple[str, ...]


def _params(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True) if params else ""


def core_steps(core: Core, max_chain: int) -> Path:
    """The decisions that choose ``core`` (pair, transforms, ``end``, distance)."""
    steps = [f"pair:{core.student},{core.teacher}"]
    steps += [f"t:{name}{_params(core.transform_params.get(name, {}))}" for name in core.transforms]
    if len(core.transforms) < max_chain:
        steps.append("t:end")
    steps.append(f"d:{core.distance}{_params(core.distance_params)}")
    return tuple(steps)


class Decisions:
    """The decision sequences of a bound space: a candidate's path, the choices after a prefix, a path's candidate.

    Args:
        space: The bound space.
    """

    def __init__(self, space: BoundSpace) -> None:
        self.space = space
        self.weights = [f"w:{w:g}" for w in space.spec.weights]
        self._weight = dict(zip(self.weights, space.spec.weights, strict=True))
        self._index: dict[Core, int] = {}
        # prefix of a core's steps -> sorted indices of the cores under it; full steps -> the core's index
        self._under: dict[Path, list[int]] = {}
        self._children: dict[Path, list[str]] = {}
        self._leaf: dict[Path, int] = {}
        for i, core in enumerate(space.cores):
            self._index[core] = i
            steps = core_steps(core, space.spec.max_chain)
            self._leaf[steps] = i
            for k in range(len(steps) + 1):
                self._under.setdefault(steps[:k], []).append(i)
                if k < len(steps) and steps[k] not in self._children.setdefault(steps[:k], []):
                    self._children[steps[:k]].append(steps[k])

    def canonical(self, terms: Sequence[tuple[Core, float]]) -> Candidate:
        """The distiller of ``terms``, its terms in the space's core order (the order :meth:`path` takes them in)."""
        return Candidate(tuple(sorted(terms, key=lambda term: self._index[term[0]])))

    def path(self, candidate: Candidate) -> Path:
        """The decisions that build ``candidate``."""
        terms = self.canonical(candidate.terms).terms
        steps: list[str] = [f"n:{len(terms)}"]
        for core, weight in terms:
            steps += [*core_steps(core, self.space.spec.max_chain), f"w:{weight:g}"]
        return tuple(steps)

    def choices(self, path: Path) -> list[str]:
        """The decisions offered after ``path`` (empty when ``path`` is a whole distiller)."""
        if not path:
            return [f"n:{n}" for n in sorted(self.space.term_counts)]
        n = int(path[0][2:])
        done, last, current = self._split(path[1:])
        if current is None:  # between terms: a new term, or the end
            return [] if len(done) == n else self._term_choices((), last, n - len(done))
        steps = tuple(current)
        if steps in self._leaf:  # the core is chosen: its weight
            return list(self.weights)
        return self._term_choices(steps, last, n - len(done))

    def candidate(self, path: Path) -> Candidate:
        """The distiller a whole decision sequence builds."""
        done, _, current = self._split(path[1:])
        assert current is None and len(done) == int(path[0][2:]), f"not a whole distiller: {path}"
        return Candidate(tuple(done))

    def _term_choices(self, steps: Path, last: int, left: int) -> list[str]:
        """Next steps of a term begun with ``steps`` that keep a valid core with index in ``(last, cores - left]``
        (later terms need ``left - 1`` cores after it)."""
        high = len(self.space.cores) - left
        return [step for step in self._children.get(steps, []) if _any_between(self._under[(*steps, step)], last, high)]

    def _split(self, body: Path) -> tuple[list[tuple[Core, float]], int, list[str] | None]:
        """Finished terms, the last finished term's core index (-1 before the first), and the steps of the term
        being chosen (None between terms)."""
        done: list[tuple[Core, float]] = []
        last = -1
        current: list[str] = []
        for step in body:
            if step.startswith("w:"):
                index = self._leaf[tuple(current)]
                done.append((self.space.cores[index], self._weight[step]))
                last, current = index, []
            else:
                current.append(step)
        return done, last, current or None


def _any_between(indices: list[int], low: int, high: int) -> bool:
    """Whether sorted ``indices`` holds a value in ``(low, high]``."""
    i = bisect.bisect_right(indices, low)
    return i < len(indices) and indices[i] <= high


def candidate_record(candidate: Candidate, space: BoundSpace) -> dict[str, Any]:
    """What the storage keeps of a distiller: its cores' indices in the space, weights, formula and terms."""
    index = {core: i for i, core in enumerate(space.cores)}
    return {"cores": [index[core] for core, _ in candidate.terms], "weights": [w for _, w in candidate.terms],
            "formula": candidate.formula(), "distill": candidate.to_distill()}


def candidate_of(record: dict[str, Any], space: BoundSpace) -> Candidate:
    """The distiller a :func:`candidate_record` describes."""
    return Candidate(tuple((space.cores[i], float(w)) for i, w in zip(record["cores"], record["weights"],
                                                                         strict=True)))
