"""Optimisers that take the loss's gradient in named parts, and DOT, the one kdkit ships.

An optimiser that needs the gradient of each part of the loss separately (not only of their sum) says so with
:class:`PartwiseOptimizer`: the engine then backpropagates each part of the objective on its own, from one
forward pass, and hands the gradients over part by part. The parts are :data:`SUPERVISED` (the task's supervised
losses) and :data:`DISTILLATION` (every other term).

:class:`DOT` is the Distillation-Oriented Trainer (Zhao et al., ICCV 2023): SGD with one momentum buffer for the
supervised gradient (momentum ``momentum - delta``) and one for the distillation gradient (``momentum + delta``),
exactly as the official ``DistillationOrientedTrainer`` of mdistiller (``mdistiller/engine/dot.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from kdkit.errors import KdkitError

SUPERVISED = "supervised"  # the task's supervised losses (cross-entropy, a peer's own supervised term)
DISTILLATION = "distillation"  # every other term of the objective
LOSS_PARTS = (SUPERVISED, DISTILLATION)
DOT_DELTA = 0.075  # the paper's and mdistiller's CIFAR-100 setting


@runtime_checkable
class PartwiseOptimizer(Protocol):
    """An optimiser that takes the gradient of each named part of the loss separately.

    The trainer backpropagates the parts in the order of ``loss_parts`` from one forward pass. After each part but
    the last it calls ``take_part(name)``, which moves the gradients out of ``.grad`` (leaving it empty); the last
    part's gradients stay in ``.grad`` for ``step()``, as with any optimiser.
    """

    loss_parts: tuple[str, ...]

    def take_part(self, part: str) -> None:
        """Take the gradients now in ``.grad`` as those of ``part``, leaving ``.grad`` empty."""


def dot_problem(momentum: float, delta: float) -> tuple[str, str] | None:
    """Why ``momentum`` and ``delta`` cannot be DOT's settings and the fix, or ``None`` when they can: both momenta,
    ``momentum - delta`` (supervised) and ``momentum + delta`` (distillation), must lie in (0, 1)."""
    if not 0 <= delta < momentum:
        return (f"delta {delta} is outside [0, momentum) = [0, {momentum}) (the supervised gradient's momentum, "
                "momentum - delta, must stay positive)", f"use e.g. delta: {DOT_DELTA} with momentum: 0.9")
    if momentum + delta >= 1:
        return (f"momentum + delta = {momentum} + {delta} is not below 1 (the distillation gradient's momentum "
                "would not decay)", f"lower delta below {1 - momentum:.4g} or lower momentum")
    return None


class DOT(torch.optim.Optimizer):
    """Distillation-Oriented Trainer: SGD with separate momentum buffers for the supervised and distillation
    gradients, ``momentum - delta`` and ``momentum + delta``.

    The update of each parameter ``p`` (``g_s``, ``g_d``: its supervised and distillation gradients, ``b_s``,
    ``b_d``: its buffers, ``wd``: weight decay, ``d``: dampening), as mdistiller's code does it:

    * ``p`` has a supervised gradient: ``u = g_s + wd * p`` (weight decay goes here, once);
      ``b_s = u`` on its first one, else ``b_s = m * b_s + (1 - d) * u`` with ``m = momentum - delta`` when ``p``
      also has a distillation gradient this step and ``m = ((momentum + delta) + (momentum - delta)) / 2`` (plain
      ``momentum``) when not; then ``p -= lr * b_s``.
    * ``p`` has a distillation gradient: ``b_d = g_d`` on its first one (no weight decay, even for a parameter
      without a supervised gradient: mdistiller's quirk, kept), else ``b_d = (momentum + delta) * b_d + (1 - d) *
      g_d`` when ``p`` also has a supervised gradient, and ``b_d = m * b_d + (1 - d) * (g_d + wd * p)`` with the
      plain momentum ``m`` above when not; then ``p -= lr * b_d``.

    Unlike mdistiller's class it works with several parameter groups (each its own ``lr``, ``momentum``,
    ``delta``, ``weight_decay``, ``dampening``). No Nesterov variant: the paper and code have none. The
    distillation gradient arrives through :meth:`take_part` (see :class:`PartwiseOptimizer`), the supervised one in
    ``.grad``.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate.
        momentum: The base momentum (the paper's beta).
        delta: The paper's Delta, in ``[0, momentum)`` with ``momentum + delta < 1``.
        dampening: Dampening of both buffers (0 in the paper).
        weight_decay: L2 penalty, added once per parameter (see above).

    Raises:
        KdkitError: A group's settings are out of range.
    """

    loss_parts = (DISTILLATION, SUPERVISED)

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float, momentum: float = 0.9,
                 delta: float = DOT_DELTA, dampening: float = 0.0, weight_decay: float = 0.0) -> None:
        self._taken: dict[Tensor, Tensor] = {}
        super().__init__(params, {"lr": lr, "momentum": momentum, "delta": delta, "dampening": dampening,
                                  "weight_decay": weight_decay})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking its settings (a group's own keys override the defaults)."""
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1], len(self.param_groups) - 1)

    def take_part(self, part: str) -> None:
        """Take the gradients in ``.grad`` as the distillation part's (the only part taken this way), leaving
        ``.grad`` empty; :meth:`step` uses them with the supervised gradients then in ``.grad``."""
        if part != DISTILLATION:
            raise KdkitError(f"DOT takes the {DISTILLATION!r} part through take_part, got {part!r}",
                             bad=part, choices=[DISTILLATION],
                             fix="backpropagate the distillation part, call take_part, then the supervised part")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._taken[p] = p.grad
                    p.grad = None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update from the taken distillation gradients and the supervised ones in ``.grad``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        taken, self._taken = self._taken, {}
        for group in self.param_groups:
            for p in group["params"]:
                distill = taken.get(p)
                if p.grad is not None:
                    self._supervised_update(p, p.grad, distill is not None, group)
                if distill is not None:
                    self._distillation_update(p, distill, p.grad is not None, group)
        return loss

    def _supervised_update(self, p: Tensor, grad: Tensor, both: bool, group: dict[str, Any]) -> None:
        """``p -= lr * b_s`` (see the class); the float operations are mdistiller's, in its order."""
        task_m, distill_m = group["momentum"] - group["delta"], group["momentum"] + group["delta"]
        d_p = grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] != 0 else grad
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = torch.clone(d_p).detach()
        else:
            buf.mul_(task_m if both else (distill_m + task_m) / 2.0).add_(d_p, alpha=1 - group["dampening"])
        p.add_(buf, alpha=-group["lr"])

    def _distillation_update(self, p: Tensor, grad: Tensor, both: bool, group: dict[str, Any]) -> None:
        """``p -= lr * b_d`` (see the class). mdistiller updates every parameter's supervised part before any
        distillation part; each parameter's arithmetic involves only itself, so doing both per parameter gives
        the same bits."""
        task_m, distill_m = group["momentum"] - group["delta"], group["momentum"] + group["delta"]
        state = self.state[p]
        buf = state.get("momentum_kd_buffer")
        if buf is None:
            buf = state["momentum_kd_buffer"] = torch.clone(grad).detach()
        elif both:  # weight decay went into the supervised buffer
            buf.mul_(distill_m).add_(grad, alpha=1 - group["dampening"])
        else:
            d_p = grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] != 0 else grad
            buf.mul_((distill_m + task_m) / 2.0).add_(d_p, alpha=1 - group["dampening"])
        p.add_(buf, alpha=-group["lr"])


def _check_group(group: dict[str, Any], index: int) -> None:
    """Refuse a parameter group whose settings DOT cannot use, naming the group and the range."""
    where = f"DOT parameter group {index}"
    problem = dot_problem(group["momentum"], group["delta"])
    if problem:
        raise KdkitError(f"{where}: {problem[0]}", bad=str(group["delta"]), fix=problem[1])
    for key, low, high in (("lr", 0.0, None), ("weight_decay", 0.0, None), ("dampening", 0.0, 1.0)):
        value = group[key]
        if value < low or (high is not None and value >= high):
            span = f"[{low}, {high})" if high is not None else f">= {low}"
            raise KdkitError(f"{where}: {key} {value} is outside {span}", bad=str(value),
                             fix=f"set {key} {span}")
