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

    For FM-KT this is the student up to the flow bridge's tap plus the bridge's inference chain; for
    every other recipe it is the plain model.
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
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, *input_shape, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


@torch.inference_mode()
def used_parameters(model: nn.Module, input_shape: tuple[int, int, int], *, device: torch.device | str = "cpu") -> int:
    """Parameters of the modules that run in one forward: what deploying ``model`` needs (a classifier that
    a deployed FM-KT student never reaches is not counted)."""
    ran: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda mod, _inputs: ran.append(mod)) for m in model.modules()
               if any(True for _ in m.parameters(recurse=False))]
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    unique = {id(p): p for m in ran for p in m.parameters(recurse=False)}
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


def has_flow(student: nn.Module) -> bool:
    """Whether ``student`` deploys an FM-KT chain: a deploying bridge (logit variant) or a rewriting one
    (feature variant, whose chain runs inside the model's forward)."""
    return getattr(student, "deploy_term", None) is not None or bool(getattr(student, "rewriting", None))


def flow_costs(student: nn.Module, input_shape: tuple[int, int, int], *, device: torch.device | str = "cpu",
               loader: Any = None,
               steps: tuple[int, ...] = (1, 2, 4, 8)) -> dict[str, Any]:
    """Cost (and accuracy) of an FM-KT student's deployable variants: the chains with ``steps`` inference
    steps, and the plain student (what FM-KT^Theta deploys).

    Every chain of the student (the deploying ``flow`` bridge and the rewriting ``flow_feature`` bridges) is
    run with the same step count ``n`` in variant ``fmkt_n{n}``. Accuracy for these variants is reported for
    analysis; the deployed ``eval_steps`` is fixed in the recipe before training (never picked from these
    figures). The plain student's accuracy is only reported with Theta, where its classifier is trained
    (without Theta it is never trained); it includes any feature chains (they are inside the model's forward).
    A student with feature chains only has no plain variant.

    Returns:
        ``{"deployed": name, "eval_steps": n, "variants": {name: {params, flops, latency_ms[, top1]}}}``.
    """
    term = student.deploy_term
    bridge = student.bridges[term] if term is not None else None
    chains = ([bridge] if bridge is not None else []) + [student.bridges[t] for t in student.rewriting]
    deployed = Deployed(student)
    variants: dict[str, dict[str, Any]] = {}
    saved_steps = [chain.eval_steps for chain in chains]
    theta = bridge is not None and bridge.theta
    try:
        if bridge is not None:
            bridge.theta = False  # measure the chain even when Theta deploys the plain student
        for n in steps:
            for chain in chains:
                chain.eval_steps = n
            variants[f"fmkt_n{n}"] = _variant(deployed, input_shape, device, loader)
        for chain, n in zip(chains, saved_steps, strict=True):
            chain.eval_steps = n
        if bridge is not None:  # the whole model (feature chains included, at their own eval_steps)
            variants["plain_theta"] = _variant(student.model, input_shape, device, loader if theta else None)
    finally:
        for chain, n in zip(chains, saved_steps, strict=True):
            chain.eval_steps = n
        if bridge is not None:
            bridge.theta = theta
    eval_steps = saved_steps[0]
    return {"deployed": "plain_theta" if theta else f"fmkt_n{eval_steps}", "eval_steps": eval_steps,
            "variants": variants}


def _variant(model: nn.Module, shape: tuple[int, int, int], device: torch.device | str,
             loader: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"params": used_parameters(model, shape, device=device),
                           "flops": count_flops(model, shape, device=device),
                           "latency_ms": round(latency_ms(model, shape, device=device), 4)}
    if loader is not None:
        row["top1"] = top1(model, loader)
    return row
