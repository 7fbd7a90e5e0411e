"""What an FM-KT student costs to deploy, for N = 1, 2, 4, 8 inference steps and for the plain student."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kdkit.profile import Deployed, count_flops, latency_ms, used_parameters


def has_flow(student: nn.Module) -> bool:
    """Whether ``student`` deploys an FM-KT chain: a deploying bridge (logit variant) or a rewriting one
    (feature variant, whose chain runs inside the model's forward)."""
    return getattr(student, "deploy_term", None) is not None or bool(getattr(student, "rewriting", None))


def flow_costs(student: nn.Module, input_shape: tuple[int, int, int], *, device: torch.device | str = "cpu",
               score: Callable[[nn.Module], float] | None = None, metric: str = "top1",
               steps: tuple[int, ...] = (1, 2, 4, 8)) -> dict[str, Any]:
    """Cost (and accuracy) of an FM-KT student's deployable variants: the chains with ``steps`` inference
    steps, and the plain student (what FM-KT^Theta deploys).

    Every chain of the student (the deploying ``flow`` bridge and the rewriting ``flow_feature`` bridges) is
    run with the same step count ``n`` in variant ``fmkt_n{n}``. Accuracy for these variants is reported for
    analysis; the deployed ``eval_steps`` is fixed in the recipe before training (never picked from these
    figures). The plain student's accuracy is only reported with Theta, where its classifier is trained
    (without Theta it is never trained); it includes any feature chains (they are inside the model's forward).
    A student with feature chains only has no plain variant.

    Args:
        student: The trained :class:`~kdkit.distill.Student`.
        input_shape: ``(C, H, W)`` of one image.
        device: Where to measure.
        score: The task's metric of a network on the test split (the engine's evaluation), or ``None`` for costs
            only.
        metric: That metric's name (the key of each variant's score: ``top1``, ``map``, ``miou``, ...).
        steps: Inference step counts to measure.

    Returns:
        ``{"deployed": name, "eval_steps": n, "metric": metric, "variants": {name: {params, flops, latency_ms[,
        metric]}}}``.
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
            variants[f"fmkt_n{n}"] = _variant(deployed, input_shape, device, score, metric)
        for chain, n in zip(chains, saved_steps, strict=True):
            chain.eval_steps = n
        if bridge is not None:  # the whole model (feature chains included, at their own eval_steps)
            variants["plain_theta"] = _variant(student.model, input_shape, device, score if theta else None, metric)
    finally:
        for chain, n in zip(chains, saved_steps, strict=True):
            chain.eval_steps = n
        if bridge is not None:
            bridge.theta = theta
    eval_steps = saved_steps[0]
    return {"deployed": "plain_theta" if theta else f"fmkt_n{eval_steps}", "eval_steps": eval_steps,
            "metric": metric, "variants": variants}


def _variant(model: nn.Module, shape: tuple[int, int, int], device: torch.device | str,
             score: Callable[[nn.Module], float] | None, metric: str) -> dict[str, Any]:
    row: dict[str, Any] = {"params": used_parameters(model, shape, device=device),
                           "flops": count_flops(model, shape, device=device),
                           "latency_ms": round(latency_ms(model, shape, device=device), 4)}
    if score is not None:
        row[metric] = score(model)
    return row
