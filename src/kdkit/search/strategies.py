"""Search strategies: given the trials so far, propose the next distiller.

A strategy keeps no state of its own: it rebuilds what it needs (MCTS's visit counts and values, the evolution's
population) from the history of finished and failed trials, in trial order, and draws with a generator seeded by
``(search seed, number of trials so far)``. So a search that is stopped and restarted proposes exactly what it
would have proposed without the interruption, and the storage holding the trials is the only record.

* ``mcts`` -- Monte-Carlo tree search with UCT, as Auto-KD (Li et al., ICCV 2023): one component per tree level
  (:mod:`kdkit.search.actions`); selection by UCT among a node's tried children, expansion of one untried child,
  a uniformly random rollout to a whole distiller, and the reward backed up along the path. A node with ``N``
  visits may have tried ``max(1, N^widening)`` children (progressive widening, Coulom 2007; Chaslot et al. 2008):
  the transform levels offer dozens of choices, and expanding every child before exploiting any would spend a
  small budget on breadth alone. ``widening: 1`` is plain UCT (every child first); Auto-KD's code is not public,
  so its handling of wide levels is unknown.
* ``evolution`` -- steady-state evolution as KD-Zero (Li et al., NeurIPS 2023): random candidates until
  ``population`` trials finished, then each child comes from tournament-selected parents among the best
  ``population`` trials, by crossover (the union of two parents' terms, resampled) and a mutation that changes one
  component of one term (its tap pair, chain, distance or weight) or adds or drops a term; a child already tried
  is mutated again (one more mutation every 10 draws), so a converged population still moves.
* ``random`` -- uniform sampling (:meth:`kdkit.grammar.space.BoundSpace.sample`), the baseline.

Every strategy proposes a distiller not tried before (up to :data:`ATTEMPTS` draws; the space may be exhausted).
A failed trial (it diverged or could not be built) counts as the worst reward seen.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kdkit.errors import KdkitError
from kdkit.grammar.space import BoundSpace, Candidate, Core, SearchSettings
from kdkit.search.actions import Decisions, Path

#: Draws tried before a strategy gives up finding an untried distiller.
ATTEMPTS = 200


@dataclass(frozen=True)
class Tried:
    """A trial so far: its distiller and its reward (None: it failed)."""

    candidate: Candidate
    reward: float | None


Strategy = Callable[[BoundSpace, Decisions, Sequence[Tried], random.Random, SearchSettings], Candidate]


def propose(space: BoundSpace, decisions: Decisions, history: Sequence[Tried], settings: SearchSettings) -> Candidate:
    """The next distiller of ``settings.strategy`` after ``history`` (deterministic in both).

    Raises:
        KdkitError: No untried distiller was found (the space is exhausted or nearly so).
    """
    rng = random.Random(f"{settings.seed}:{len(history)}")
    return STRATEGIES[settings.strategy](space, decisions, history, rng, settings)


def _untried(draw: Callable[[int], Candidate], seen: set[Candidate]) -> Candidate:
    """The first of ``draw(0), draw(1), ...`` not in ``seen``."""
    for attempt in range(ATTEMPTS):
        candidate = draw(attempt)
        if candidate not in seen:
            return candidate
    raise KdkitError(f"no untried distiller found in {ATTEMPTS} draws after {len(seen)} trials",
                     fix="enlarge the space (more transforms, distances, weights or terms) or lower the budget")


# -- random -----------------------------------------------------------------------------------------------------------

def random_search(space: BoundSpace, decisions: Decisions, history: Sequence[Tried], rng: random.Random,
                  settings: SearchSettings) -> Candidate:
    """A uniformly drawn distiller (:meth:`BoundSpace.sample`) not tried before."""
    return _untried(lambda _: space.sample(rng.getrandbits(64)), {t.candidate for t in history})


# -- MCTS -------------------------------------------------------------------------------------------------------------

class Tree:
    """Visit counts and reward sums of every decision prefix, rebuilt from the history.

    Args:
        history: The trials so far.
        decisions: The space's decision sequences.
    """

    def __init__(self, history: Sequence[Tried], decisions: Decisions) -> None:
        self.decisions = decisions
        self.visits: dict[Path, int] = {}
        self.total: dict[Path, float] = {}
        rewards = [t.reward for t in history if t.reward is not None]
        self.low, self.high = (min(rewards), max(rewards)) if rewards else (0.0, 0.0)
        for t in history:
            self.backup(decisions.path(t.candidate), self.normalised(t.reward))

    def normalised(self, reward: float | None) -> float:
        """``reward`` min-max scaled over the finished trials into [0, 1] (a failure: 0; all equal: 0.5)."""
        if reward is None:
            return 0.0
        return (reward - self.low) / (self.high - self.low) if self.high > self.low else 0.5

    def backup(self, path: Path, value: float) -> None:
        """Add one visit with ``value`` to every prefix of ``path`` (the root included)."""
        for k in range(len(path) + 1):
            self.visits[path[:k]] = self.visits.get(path[:k], 0) + 1
            self.total[path[:k]] = self.total.get(path[:k], 0.0) + value

    def widening(self, path: Path, alpha: float) -> float:
        """How many children node ``path`` may have tried (progressive widening): ``max(1, N(path)^alpha)``."""
        return max(1.0, self.visits.get(path, 0) ** alpha)

    def uct(self, parent: Path, child: Path, exploration: float) -> float:
        """``Q(child) + c * sqrt(ln N(parent) / N(child))``."""
        n = self.visits[child]
        return self.total[child] / n + exploration * math.sqrt(math.log(self.visits[parent]) / n)


def mcts(space: BoundSpace, decisions: Decisions, history: Sequence[Tried], rng: random.Random,
         settings: SearchSettings) -> Candidate:
    """Select by UCT down the fully expanded nodes, expand one untried child, roll out at random.

    A rollout that ends on a distiller already tried is backed up with its known reward (so the tree learns where
    the tried distillers are) and the search descends again, up to :data:`ATTEMPTS` times.
    """
    tree = Tree(history, decisions)
    known = {t.candidate: tree.normalised(t.reward) for t in history}
    for _ in range(ATTEMPTS):
        path: Path = ()
        while True:
            choices = decisions.choices(path)
            if not choices:
                break
            tried = [c for c in choices if (*path, c) in tree.visits]
            if len(tried) < len(choices) and len(tried) < tree.widening(path, settings.mcts.widening):
                path = (*path, rng.choice([c for c in choices if (*path, c) not in tree.visits]))
                break
            parent = path
            path = max(((*parent, c) for c in tried),
                       key=lambda child: (tree.uct(parent, child, settings.mcts.exploration), rng.random()))
        while choices := decisions.choices(path):  # rollout
            path = (*path, rng.choice(choices))
        candidate = decisions.candidate(path)
        if candidate not in known:
            return candidate
        tree.backup(path, known[candidate])
    raise KdkitError(f"MCTS found no untried distiller in {ATTEMPTS} descents after {len(history)} trials",
                     fix="enlarge the space (more transforms, distances, weights or terms) or lower the budget")


# -- evolution --------------------------------------------------------------------------------------------------------

def evolution(space: BoundSpace, decisions: Decisions, history: Sequence[Tried], rng: random.Random,
              settings: SearchSettings) -> Candidate:
    """Random candidates until ``population`` trials finished; then a child of tournament-selected parents."""
    spec = settings.evolution
    seen = {t.candidate for t in history}
    finished = [t for t in history if t.reward is not None]
    if len(finished) < spec.population:
        return _untried(lambda _: space.sample(rng.getrandbits(64)), seen)
    # the best `population` finished trials (earlier first among equals)
    ranked = sorted(range(len(finished)), key=lambda i: (-finished[i].reward, i))  # type: ignore[operator]
    population = [finished[i] for i in ranked[:spec.population]]

    def tournament() -> Candidate:
        drawn = rng.sample(range(len(population)), min(spec.tournament, len(population)))
        return population[min(drawn)].candidate  # population is sorted best first

    def child(attempt: int) -> Candidate:
        terms = list(tournament().terms)
        if rng.random() < spec.crossover:
            pool = list(dict.fromkeys(terms + list(tournament().terms)))
            n = len(terms) if rng.random() < 0.5 else len(pool)
            n = min(max(n, min(space.term_counts)), max(space.term_counts), len(pool))
            mixed = _distinct_cores(rng.sample(pool, len(pool)), n)
            terms = mixed if len(mixed) in space.term_counts else terms
        # a child already tried mutates further: one more mutation every 10 attempts (the population has converged)
        for _ in range(1 + attempt // 10):
            terms = _mutate(terms, space, rng)
        return decisions.canonical(terms)

    return _untried(child, seen)


def _distinct_cores(terms: list[tuple[Core, float]], n: int) -> list[tuple[Core, float]]:
    """The first ``n`` terms of ``terms`` whose cores differ (fewer when fewer cores differ)."""
    kept: list[tuple[Core, float]] = []
    for term in terms:
        if all(term[0] != other[0] for other in kept):
            kept.append(term)
        if len(kept) == n:
            break
    return kept


def _mutate(terms: list[tuple[Core, float]], space: BoundSpace, rng: random.Random) -> list[tuple[Core, float]]:
    """Change one thing: a term's pair, chain or distance (to a valid core that keeps the other two), its weight,
    or add or drop a term (when the space allows that many terms)."""
    kinds = ["pair", "chain", "distance", "weight"]
    if len(terms) + 1 in space.term_counts:
        kinds.append("add")
    if len(terms) - 1 in space.term_counts:
        kinds.append("drop")
    kind = rng.choice(kinds)
    terms = list(terms)
    used = {core for core, _ in terms}
    if kind == "add":
        spare = [core for core in space.cores if core not in used]
        return [*terms, (rng.choice(spare), rng.choice(space.spec.weights))] if spare else terms
    i = rng.randrange(len(terms))
    if kind == "drop":
        return terms[:i] + terms[i + 1:]
    core, weight = terms[i]
    if kind == "weight":
        others = [w for w in space.spec.weights if w != weight]
        terms[i] = (core, rng.choice(others)) if others else terms[i]
        return terms
    neighbours = [other for other in space.cores if other not in used and _differs_only_in(core, other, kind)]
    if neighbours:
        terms[i] = (rng.choice(neighbours), weight)
    return terms


def _differs_only_in(a: Core, b: Core, kind: str) -> bool:
    parts = {"pair": (a.student, a.teacher) == (b.student, b.teacher),
             "chain": (a.transforms, a.transform_params) == (b.transforms, b.transform_params),
             "distance": (a.distance, a.distance_params) == (b.distance, b.distance_params)}
    return not parts[kind] and all(same for name, same in parts.items() if name != kind)


STRATEGIES: dict[str, Strategy] = {"mcts": mcts, "evolution": evolution, "random": random_search}
