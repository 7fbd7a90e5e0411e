"""Timing that knows its own precision: interleaved blocks, spreads, paired ratios and verdicts on targets.

A machine's speed drifts (clock, other processes, cache state) on the scale of seconds, so timing one variant
after another compares different moments. Here every variant runs a block of ``steps`` steps in turn, in an order
rotated each round, for ``rounds`` rounds: each variant gets one time per round, a row reports the median over
rounds with its interquartile range, and a ratio of two variants is computed per round (the two blocks ran
seconds apart) before its median and spread are taken.

A target is called met or missed only when the 95 % confidence interval of the median lies on one side of it.
That interval is distribution-free (order statistics of the rounds: the median lies between the ``l``-th smallest
and ``l``-th largest value with probability ``1 - 2 P(Binomial(n, 1/2) < l)``), and it narrows as rounds are
added, which the interquartile range -- the spread of single rounds -- does not: with 15 rounds it runs from the
4th to the 12th value (96.5 %).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

#: A verdict that the precision does not allow.
UNDECIDED = "undecided (the median's 95% interval straddles it)"
#: The confidence of :attr:`Spread.ci_low` .. :attr:`Spread.ci_high`.
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Spread:
    """The median of some values, their spread (quartiles, extremes) and the median's confidence interval.

    Attributes:
        ci_low: Lower end of the median's distribution-free interval (:func:`median_interval`).
        ci_high: Upper end.
        coverage: Its exact coverage (at least :data:`CONFIDENCE` from 6 values on; below, the extremes).
    """

    median: float
    q1: float
    q3: float
    low: float
    high: float
    n: int
    ci_low: float
    ci_high: float
    coverage: float

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return asdict(self)


def spread(values: Sequence[float]) -> Spread:
    """The :class:`Spread` of ``values`` (quartiles by linear interpolation; one value is its own spread)."""
    if not values:
        raise ValueError("no values to summarise")
    if len(values) == 1:
        q1 = q3 = float(values[0])
    else:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    ci_low, ci_high, coverage = median_interval(values)
    return Spread(statistics.median(values), q1, q3, min(values), max(values), len(values), ci_low, ci_high, coverage)


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """A distribution-free confidence interval of the median: ``(x_(l), x_(n+1-l), coverage)``, the ``l``-th
    smallest and largest values for the largest ``l`` whose coverage ``1 - 2 P(B <= l - 1)``, ``B ~ Binomial(n,
    1/2)``, is at least ``confidence``. With fewer than 6 values no ``l`` reaches 95 %: the extremes are returned
    with their (lower) coverage."""
    xs, n = sorted(values), len(values)
    cdf, below, rank = 0.0, [], 0  # below[j] = P(B <= j); rank = l
    for j in range(n + 1):
        cdf += math.comb(n, j) / 2.0 ** n
        below.append(cdf)
    while rank + 1 <= n // 2 and 1.0 - 2.0 * below[rank] >= confidence:  # x_(rank+1) still keeps the coverage
        rank += 1
    rank = max(rank, 1)
    coverage = 1.0 - 2.0 * below[rank - 1] if n > 1 else 0.0
    return xs[rank - 1], xs[n - rank], coverage


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """``numerator[r] / denominator[r]`` for every round ``r``: each ratio of two blocks that ran seconds apart."""
    if len(numerator) != len(denominator):
        raise ValueError(f"{len(numerator)} rounds against {len(denominator)}: ratios pair the same rounds")
    return [n / d for n, d in zip(numerator, denominator, strict=True)]


def verdict(ratio: Spread, target: float) -> str:
    """Whether ``ratio <= target`` holds: ``met`` when the median's confidence interval is at or below the target,
    ``missed`` when it is all above, else :data:`UNDECIDED`."""
    if ratio.ci_high <= target:
        return "met"
    if ratio.ci_low > target:
        return "missed"
    return UNDECIDED


def faster(ratio: Spread) -> str:
    """Which side of ``a / b`` is faster: ``a`` when the median's confidence interval is below 1, ``b`` when it is
    all above, else :data:`UNDECIDED`."""
    if ratio.ci_high < 1.0:
        return "a"
    if ratio.ci_low > 1.0:
        return "b"
    return UNDECIDED


def interleaved(variants: dict[str, Callable[[], Any]], *, steps: int, rounds: int, warmup: int,
                sync: Callable[[], None] = lambda: None,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Milliseconds per step of each variant, one value per round.

    Args:
        variants: Name -> one step (it fetches its own batch, so loading is timed as in training).
        steps: Steps per timed block.
        rounds: Blocks per variant. Round ``r`` starts with variant ``r mod len(variants)`` (then the others in
            order), so no variant always runs first or after the same neighbour.
        warmup: Untimed steps of each variant first.
        sync: Waits for the device's queued work (a GPU's), called at both ends of a block.
        clock: Seconds (for tests).
    """
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        start = r % len(names)
        for name in names[start:] + names[:start]:
            step = variants[name]
            sync()
            began = clock()
            for _ in range(steps):
                step()
            sync()
            times[name].append((clock() - began) * 1000.0 / steps)
    return times
