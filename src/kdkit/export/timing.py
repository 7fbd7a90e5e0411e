"""Latency of an export under its runtime against the deployed network under PyTorch eager, per image."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from kdkit.profile import latency_ms

#: Timed and untimed runs per figure (the median of the timed ones is reported, as kdkit's other latencies).
REPEATS, WARMUP = 50, 10


def runtime_latency_ms(run: Callable[[Tensor], Tensor], input_shape: tuple[int, int, int], *, batch: int = 1,
                       repeats: int = REPEATS, warmup: int = WARMUP) -> float:
    """Median wall-clock milliseconds per image of ``run`` on a batch of ``batch`` blank images, measured the way
    :func:`kdkit.profile.latency_ms` measures a module (CPU)."""
    x = torch.zeros(batch, *input_shape)
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - start) * 1000.0 / batch)
    return statistics.median(times)


def latency_table(network: nn.Module, run: Callable[[Tensor], Tensor], input_shape: tuple[int, int, int],
                  batches: tuple[int, ...], *, repeats: int = REPEATS,
                  warmup: int = WARMUP) -> dict[int, dict[str, float]]:
    """``{batch: {"eager": ms, "export": ms}}`` per image: PyTorch eager (``network``) and the export (``run``)."""
    return {b: {"eager": latency_ms(network, input_shape, batch=b, repeats=repeats, warmup=warmup),
                "export": runtime_latency_ms(run, input_shape, batch=b, repeats=repeats, warmup=warmup)}
            for b in batches}
