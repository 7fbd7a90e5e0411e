"""Optimisers and learning-rate schedules built from the recipe's ``train`` section."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from kdkit.optimizers import DOT
from kdkit.recipe import OptimizerSpec, ScheduleSpec, TrainSpec


def build_optimizer(params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
                    spec: OptimizerSpec) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov), AdamW or DOT (:class:`kdkit.optimizers.DOT`) over parameters or parameter
    groups (frozen ones left out; a group's own keys, e.g. ``lr``, override the spec's)."""
    items = list(params)
    groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    groups = [g for g in groups if g["params"]] or [{"params": []}]
    if spec.name == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov,
                               weight_decay=spec.weight_decay)
    if spec.name == "dot":
        assert spec.delta is not None  # the schema sets dot's default
        return DOT(groups, lr=spec.lr, momentum=spec.momentum, delta=spec.delta, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)


def optimizer_factory(train: TrainSpec) -> Callable[[list[dict[str, Any]], int],
                                                   tuple[torch.optim.Optimizer, LambdaLR]]:
    """The engine's ``make_optimizer`` for a recipe's ``train`` section: its optimiser and per-step schedule."""

    def make(groups: list[dict[str, Any]], steps_per_epoch: int) -> tuple[torch.optim.Optimizer, LambdaLR]:
        optimizer = build_optimizer(groups, train.optimizer)
        return optimizer, build_schedule(optimizer, train.schedule, train.optimizer.lr, steps_per_epoch, train.epochs)

    return make


def lr_factor(step: int, spec: ScheduleSpec, base_lr: float, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    Linear warm-up over ``warmup_steps`` multiplies whichever schedule follows: ``multistep`` (x gamma
    at each milestone epoch), ``cosine`` (from 1 to ``min_lr/base_lr`` over all steps) or ``constant``.
    """
    epoch = step // max(steps_per_epoch, 1)
    if spec.name == "multistep":
        factor = spec.gamma ** sum(1 for m in spec.milestones if epoch >= m)
    elif spec.name == "cosine":
        floor = spec.min_lr / base_lr
        progress = min(step / max(total_steps, 1), 1.0)
        factor = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        factor = 1.0
    if spec.warmup_steps and step < spec.warmup_steps:
        factor *= (step + 1) / spec.warmup_steps
    return factor


def build_schedule(optimizer: torch.optim.Optimizer, spec: ScheduleSpec, base_lr: float, steps_per_epoch: int,
                   epochs: int) -> LambdaLR:
    """A per-step :class:`LambdaLR` implementing :func:`lr_factor` (its state dict is plain data)."""
    total = steps_per_epoch * epochs

    def factor(step: int) -> float:
        return lr_factor(step, spec, base_lr, steps_per_epoch, total)

    return LambdaLR(optimizer, factor)
