"""Timing that knows its own precision: interleaved blocks, spreads, paired ratios and verdicts on targets.

A machine's speed drifts (clock, other processes, cache state) on the scale of seconds, so timing one variant
after another compares different moments. Here every variant runs a block of ``steps`` steps in turn, in an order
rotated each round, for ``rounds`` rounds: each variant gets one time per round, a row reports the median over
rounds with its interquartile range, and a ratio of two variants is computed per round (the two blocks ran
seconds apart) before its median and spread are taken. A target is called met or missed only when the whole
spread lies on one side of it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

#: A verdict that the spread does not allow.
UNDECIDED = "undecided (spread larger than margin)"


@dataclass(frozen=True)
class Spread:
    """The median of some values and their spread: quartiles (the interquartile range) and extremes."""

    median: float
    q1: float
    q3: float
    low: float
    high: float
    n: int

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
    return Spread(statistics.median(values), q1, q3, min(values), max(values), len(values))


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """``numerator[r] / denominator[r]`` for every round ``r``: each ratio of two blocks that ran seconds apart."""
    if len(numerator) != len(denominator):
        raise ValueError(f"{len(numerator)} rounds against {len(denominator)}: ratios pair the same rounds")
    return [n / d for n, d in zip(numerator, denominator, strict=True)]


def verdict(ratio: Spread, target: float) -> str:
    """Whether ``ratio <= target`` holds: ``met`` when the whole interquartile range is at or below the target,
    ``missed`` when it is all above, else :data:`UNDECIDED` (the spread straddles the target)."""
    if ratio.q3 <= target:
        return "met"
    if ratio.q1 > target:
        return "missed"
    return UNDECIDED


def faster(ratio: Spread) -> str:
    """Which side of ``a / b`` is faster: ``a`` when the whole interquartile range is below 1, ``b`` when it is
    all above, else :data:`UNDECIDED`."""
    if ratio.q3 < 1.0:
        return "a"
    if ratio.q1 > 1.0:
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
