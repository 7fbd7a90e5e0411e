"""How far a step is from the machine's limit: FLOPs counted by torch, the rate achieved against the CPU's peak
(:mod:`kdkit.hardware`), and a profile of kdkit's step by part."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from kdkit.checkpoint import atomic_write_text

#: Rows of the profiler table written next to the benchmark (by self CPU time).
PROFILE_ROWS = 25
PROFILE_FILE = "profile.txt"


def training_flops(model: nn.Module, x: Tensor, loss: Callable[[Tensor], Tensor]) -> int:
    """FLOPs of one training step's forward and backward of ``model`` on ``x`` with ``loss`` of its output (the
    task's supervised loss), as :class:`~torch.utils.flop_counter.FlopCounterMode` counts them (matrix products and
    convolutions; a multiply-add counts 2; elementwise work is not counted). The gradients it makes are dropped."""
    counter = FlopCounterMode(display=False)
    with counter:
        loss(model(x)).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


@torch.inference_mode()
def inference_flops(model: nn.Module, x: Tensor) -> int:
    """FLOPs of one forward of ``model`` on ``x`` (counted as in :func:`training_flops`)."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    return int(counter.get_total_flops())


def achieved(flops: int, ms: float, peak: float | None) -> dict[str, Any]:
    """The rate ``flops`` in ``ms`` milliseconds reach, and its fraction of ``peak`` FLOP/s (``None``: unknown)."""
    rate = flops / (ms / 1000.0)
    return {"flops": flops, "ms": ms, "flops_per_s": rate, "peak": peak,
            "fraction_of_peak": rate / peak if peak else None}


def step_profile(step: Callable[[], None], steps: int, folder: Path, device: torch.device) -> dict[str, Any]:
    """Profile ``steps`` calls of ``step``; write the top :data:`PROFILE_ROWS` operators by self CPU time to
    ``folder/profile.txt`` and return the time of each named part of a step (the ``kdkit.*`` ranges of
    :func:`kdkit.engine.step_part`) and which dominates."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    table = events.table(sort_by="self_cpu_time_total", row_limit=PROFILE_ROWS)
    atomic_write_text(folder / PROFILE_FILE, f"torch.profiler over {steps} steps, top {PROFILE_ROWS} operators by "
                      f"self CPU time\n\n{table}\n")
    return parts_of(
        {e.key: e.cpu_time_total / steps / 1000.0 for e in events if e.key.startswith("kdkit.")},
        {e.key: e.self_cpu_time_total / steps / 1000.0 for e in events if not e.key.startswith("kdkit.")})


def parts_of(parts_ms: dict[str, float], ops_self_ms: dict[str, float]) -> dict[str, Any]:
    """The named parts of a step (ms per step, inclusive), their shares, the dominant one and the five operators
    with the most self time."""
    total = sum(parts_ms.values())
    shares = {name.removeprefix("kdkit."): ms / total for name, ms in parts_ms.items()} if total else {}
    top = sorted(ops_self_ms.items(), key=lambda kv: -kv[1])[:5]
    return {"parts_ms": {k.removeprefix("kdkit."): v for k, v in parts_ms.items()}, "shares": shares,
            "dominant": max(shares, key=lambda k: shares[k]) if shares else None,
            "top_ops_self_ms": dict(top), "file": PROFILE_FILE}
