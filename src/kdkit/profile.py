"""Model cost measurements: parameter counts and inference latency."""

from __future__ import annotations

import platform
import statistics
import time

import torch
from torch import nn


@torch.inference_mode()
def latency_ms(model: nn.Module, input_shape: tuple[int, int, int], *, batch: int = 1, repeats: int = 50,
               warmup: int = 10, device: torch.device | str = "cpu") -> float:
    """Median wall-clock milliseconds per image of ``model`` in eval mode.

    Args:
        model: The model (its mode is restored afterwards).
        input_shape: ``(C, H, W)``.
        batch: Images per forward (1 measures per-request latency).
        repeats: Timed forwards; the median is reported.
        warmup: Untimed forwards first.
        device: Where to run.
    """
    was_training = model.training
    model.eval()
    x = torch.zeros(batch, *input_shape, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        model(x)
        sync()
        times.append((time.perf_counter() - start) * 1000.0 / batch)
    model.train(was_training)
    return statistics.median(times)


def machine_info() -> dict[str, str]:
    """Machine and library versions, printed next to every figure kdkit reports."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import os

    return {
        "cpu": cpu, "cores": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads()),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(), "torch": torch.__version__, "os": platform.platform(terse=True),
    }
