"""DHO as a registered method: recognised from its terms; its checks, and what its deployed heads score.

DHO needs no engine hooks: its KD head is a :class:`~kdkit.bridges.roles.CombiningBridge` trained by its loss, and
the model's own classifier is the CE head (the ``dho`` loss requires the ``dho_head`` bridge, which the planner
checks). The method refuses recipes where the pair cannot work (no CE weight, more than one KD head, peers) and,
after training, writes ``summary.json``'s ``dho`` section: the test top-1 of the CE head alone, of the KD head
alone and of the combination for alpha in 0, 0.1, ..., 1 at the recipe's beta. Those are for analysis (the paper's
"test-time tuning without retraining"): the deployed alpha and beta are the recipe's, never chosen on the test set.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import torch

from kdkit.data.loader import BatchLoader
from kdkit.distill import pick
from kdkit.engine import Engine, Hooks
from kdkit.method import Method, MethodRun, register_method
from kdkit.methods.dho.head import DhoHead, combine_heads
from kdkit.taps import LOGITS

LOSS = "dho"
BRIDGE = "dho_head"
#: The alphas the summary scores (0: the KD head alone, 1: the CE head alone).
ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


def dho_term(student: Any) -> str | None:
    """The name of the term whose bridge is DHO's KD head, if any."""
    return next((name for name, bridge in student.bridges.items() if isinstance(bridge, DhoHead)), None)


def full_test_loader(loader: BatchLoader) -> BatchLoader:
    """The whole test split in one process's loader (the engine's is sharded under DDP)."""
    return BatchLoader(loader.images, loader.labels, batch_size=loader.batch_size, mean=loader.mean, std=loader.std,
                       device=loader.device, shuffle=False, drop_last=False, channels_last=loader.channels_last)


@torch.no_grad()
def head_logits(student: Any, term: str, loader: BatchLoader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CE head's and the KD head's logits on every batch of ``loader``, and the labels (student in eval mode)."""
    was_training = student.training
    student.eval()
    ce, kd, labels = [], [], []
    try:
        for x, y, _ in loader.epoch(0):
            logits = student.model(x)
            captured = {**(student.recorder.pop() if student.recorder is not None else {}), LOGITS: logits}
            ce.append(logits.float())
            kd.append(student.bridges[term](pick(captured, student.reads[term])).float())
            labels.append(y)
    finally:
        student.train(was_training)
    return torch.cat(ce), torch.cat(kd), torch.cat(labels)


def alpha_sweep(ce: torch.Tensor, kd: torch.Tensor, labels: torch.Tensor, beta: float) -> dict[str, float]:
    """Top-1 (%) of the combined heads for each alpha of :data:`ALPHAS` at ``beta``."""
    return {f"{alpha:.1f}": 100.0 * float((combine_heads(ce, kd, alpha, beta).argmax(1) == labels).float().mean())
            for alpha in ALPHAS}


class DhoRun(MethodRun):
    """No hooks; after training, the heads' test accuracies (rank 0)."""

    def __init__(self) -> None:
        super().__init__(Hooks())

    def summary(self, engine: Engine) -> dict[str, Any]:
        term = dho_term(engine.student)
        if term is None:
            return {}
        head: DhoHead = engine.student.bridges[term]
        ce, kd, labels = head_logits(engine.student, term, full_test_loader(engine.eval_loader))
        sweep = alpha_sweep(ce, kd, labels, head.beta)
        return {"dho": {"alpha": head.alpha, "beta": head.beta, "ce_head_top1": sweep["1.0"],
                        "kd_head_top1": 100.0 * float((kd.argmax(1) == labels).float().mean()),
                        "top1_by_alpha": sweep}}


@register_method
class DhoMethod(Method):
    """DHO: dual-head optimisation (Kang et al., 2025), a CE and a KD head on one feature, combined when deployed."""

    name = "dho"

    def active(self, recipe: Any) -> bool:
        return any(t.loss == LOSS or t.bridge == BRIDGE for t in recipe.distill)

    def check(self, recipe: Any) -> list[str]:
        problems = []
        terms = [i for i, t in enumerate(recipe.distill) if t.loss == LOSS or t.bridge == BRIDGE]
        if len(terms) > 1:
            problems.append(f"DHO has one KD head: distill.{terms[1]} is a second `{LOSS}` term or `{BRIDGE}` bridge; "
                            "keep one")
        if not recipe.train.ce_weight:
            problems.append("DHO's CE head (the model's classifier) learns from the labels with train.ce_weight "
                            "(lambda); with 0 it never trains and the deployed prediction mixes in an untrained head: "
                            "set train.ce_weight > 0 (0.5 in the official code's train_others.py)")
        if recipe.peers is not None:
            problems.append("DHO deploys the model's own head with its KD head; `peers:` is not supported with it")
        return problems

    def attach(self, built: Any, ctx: Any) -> MethodRun:
        return DhoRun()

    def report_section(self, label: str, summary: dict[str, Any], folder: Path) -> str:
        """Test top-1 of each head and of the combination for each alpha (analysis; the recipe's alpha is deployed)."""
        dho = summary.get("dho")
        if not dho:
            return ""
        rows = "".join(f"<tr><td>{html.escape(alpha)}{' (deployed)' if float(alpha) == dho['alpha'] else ''}</td>"
                       f"<td>{top1:.2f}</td></tr>" for alpha, top1 in dho["top1_by_alpha"].items())
        return (f"<h3>{html.escape(label)}: DHO heads (<code>{html.escape(str(folder))}</code>)</h3>"
                f"<p>CE head alone {dho['ce_head_top1']:.2f} %, KD head alone {dho['kd_head_top1']:.2f} %; the "
                f"combination at beta {dho['beta']:g} for each alpha (for analysis: the deployed alpha is the "
                f"recipe's, never chosen on the test set).</p><table><tr><th>alpha</th><th>top-1 (%)</th></tr>"
                f"{rows}</table>")
