"""Model cost measurements: parameter counts, FLOPs and inference latency (of the deployed network)."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any

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


class Deployed(nn.Module):
    """The deployed network of a :class:`~kdkit.distill.Student` as a module: ``forward = student.predict``.

    With a deploying bridge this is the student up to the bridge's tap plus the bridge; otherwise the plain
    model.
    """

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student.predict(x)


@torch.inference_mode()
def count_flops(model: nn.Module, input_shape: tuple[int, int, int], *, device: torch.device | str = "cpu") -> int:
    """FLOPs of one forward of one image, measured by :class:`torch.utils.flop_counter.FlopCounterMode`
    (matmuls and convolutions; a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    # FlopCounterMode's module tracker hooks the gradients of module inputs that require grad; a view of a
    # parameter taken in inference mode (e.g. learned queries) requires grad without a grad_fn and breaks it.
    model.requires_grad_(False)
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for param, flag in zip(model.parameters(), flags, strict=True):
            param.requires_grad_(flag)
    return int(counter.get_total_flops())


@torch.inference_mode()
def used_parameters(model: nn.Module, input_shape: tuple[int, int, int], *, device: torch.device | str = "cpu") -> int:
    """Parameters of the modules that run in one forward: what deploying ``model`` needs (a classifier that
    a deployed network never reaches is not counted)."""
    ran: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda mod, _inputs: ran.append(mod)) for m in model.modules()
               if any(True for _ in m.parameters())]
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    # A module of torch.nn that runs uses all its parameters, also those of children it calls functionally
    # (MultiheadAttention's out_proj never runs as a module); a user's module may hold unused children.
    unique = {id(p): p for m in ran
              for p in m.parameters(recurse=type(m).__module__.startswith("torch.nn.modules."))}
    return sum(p.numel() for p in unique.values())


@torch.inference_mode()
def top1(model: nn.Module, loader: Any) -> float:
    """Top-1 accuracy (%) of ``model`` in eval mode over a :class:`~kdkit.data.loader.BatchLoader`'s batches."""
    was_training = model.training
    model.eval()
    hits, total = 0, 0
    for x, y, _ in loader.epoch(0):
        hits += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    return 100.0 * hits / max(total, 1)
