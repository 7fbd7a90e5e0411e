"""MDCS as a registered method: recognised from its term; the recipes it refuses; the class prior from the training
labels and the consistency warm-up installed on the loss; each expert's test accuracy in ``summary.json``."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import torch

from kdkit.data.loader import BatchLoader
from kdkit.distill import pick
from kdkit.engine import Engine, Hooks
from kdkit.method import Method, MethodRun, register_method
from kdkit.methods.mdcs.head import MdcsExperts
from kdkit.methods.mdcs.loss import MdcsLoss
from kdkit.taps import LOGITS

LOSS = "mdcs"
BRIDGE = "mdcs_experts"


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(K,)`` training images per class: the prior MDCS shifts the experts by."""
    return torch.bincount(labels.reshape(-1).long().cpu(), minlength=num_classes)


def full_test_loader(loader: BatchLoader) -> BatchLoader:
    """The whole test split in one process's loader (the engine's is sharded under DDP)."""
    return BatchLoader(loader.images, loader.labels, batch_size=loader.batch_size, mean=loader.mean, std=loader.std,
                       device=loader.device, shuffle=False, drop_last=False, channels_last=loader.channels_last)


@torch.no_grad()
def expert_logits(student: Any, term: str, loader: BatchLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert's raw logits ``(N, E, K)`` on ``loader`` and the labels (student in eval mode)."""
    was_training = student.training
    student.eval()
    outs, labels = [], []
    try:
        for x, y, _ in loader.epoch(0):
            logits = student.model(x)
            captured = {**(student.recorder.pop() if student.recorder is not None else {}), LOGITS: logits}
            outs.append(student.bridges[term](pick(captured, student.reads[term])).float())
            labels.append(y)
    finally:
        student.train(was_training)
    return torch.cat(outs), torch.cat(labels)


class MdcsRun(MethodRun):
    """Sets the loss's consistency ramp before every step; after training, each expert's test top-1.

    Args:
        loss: The ``mdcs`` term's loss (its prior already installed).
        term: The term's name (its bridge holds the experts).
    """

    def __init__(self, loss: MdcsLoss, term: str) -> None:
        self.loss, self.term = loss, term
        super().__init__(Hooks(batch_transforms=[self.ramp]))

    def ramp(self, engine: Engine, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> tuple:
        """The ramp at the batch's epoch position, as the objective's term warm-ups (a pure function of the step,
        so a resumed run ramps alike)."""
        self.loss.ramp(engine.epoch + engine.batch / engine.steps_per_epoch)
        return x, y, index

    def summary(self, engine: Engine) -> dict[str, Any]:
        experts, labels = expert_logits(engine.student, self.term, full_test_loader(engine.eval_loader))
        top1 = [100.0 * float((experts[:, k].argmax(1) == labels).float().mean()) for k in range(experts.shape[1])]
        return {"mdcs": {"lambdas": list(self.loss.lambdas), "expert_top1": top1,
                         "ensemble_top1": 100.0 * float((experts.mean(1).argmax(1) == labels).float().mean()),
                         "prior": [round(float(p), 6) for p in self.loss.log_prior.exp()]}}


@register_method
class MdcsMethod(Method):
    """MDCS (Zhao et al., ICCV 2023): prior-shifted experts and consistency self-distillation for long tails."""

    name = "mdcs"
    needs_labels = True  # the diversity loss and the confident-instance sampling read every label

    def active(self, recipe: Any) -> bool:
        return any(t.loss == LOSS or t.bridge == BRIDGE for t in recipe.distill)

    def check(self, recipe: Any) -> list[str]:
        problems = []
        terms = [i for i, t in enumerate(recipe.distill) if t.loss == LOSS or t.bridge == BRIDGE]
        if len(terms) > 1:
            problems.append(f"MDCS has one set of experts: distill.{terms[1]} is a second `{LOSS}` term or "
                            f"`{BRIDGE}` bridge; keep one")
        for i in terms:
            if recipe.distill[i].loss != LOSS:
                problems.append(f"distill.{i}: the `{BRIDGE}` bridge feeds the `{LOSS}` loss, got loss "
                                f"{recipe.distill[i].loss!r}; set `loss: {LOSS}`")
        if recipe.data.views != 2:
            problems.append(f"MDCS distils each image's weakly augmented view into its strongly augmented one: "
                            f"data.views is {recipe.data.views} (choices: 2); set data.views: 2")
        if recipe.train.ce_weight:
            problems.append(f"MDCS's cross-entropies are its experts' (the diversity loss, inside the `{LOSS}` term); "
                            f"train.ce_weight {recipe.train.ce_weight:g} would add one on the experts' mean, which "
                            "MDCS has not: set train.ce_weight: 0")
        if recipe.peers is not None:
            problems.append("MDCS trains one network's experts: remove `peers:`")
        return problems

    def attach(self, built: Any, ctx: Any) -> MethodRun:
        term = next(t for t in built.objective.terms if isinstance(t.loss, MdcsLoss))
        assert isinstance(built.student.bridges[term.name], MdcsExperts)
        loss: MdcsLoss = term.loss  # type: ignore[assignment]
        loss.set_prior(class_counts(built.data.train_labels, built.data.num_classes))
        loss.log_prior = loss.log_prior.to(built.device)  # once, not every step
        return MdcsRun(loss, term.name)

    def report_section(self, label: str, summary: dict[str, Any], folder: Path) -> str:
        """Each expert's test top-1 and the deployed ensemble's."""
        mdcs = summary.get("mdcs")
        if not mdcs:
            return ""
        rows = "".join(f"<tr><td>{k}</td><td>{lam:g}</td><td>{top1:.2f}</td></tr>"
                       for k, (lam, top1) in enumerate(zip(mdcs["lambdas"], mdcs["expert_top1"], strict=True)))
        return (f"<h3>{html.escape(label)}: MDCS experts (<code>{html.escape(str(folder))}</code>)</h3>"
                f"<p>Deployed: the experts' mean logits, top-1 {mdcs['ensemble_top1']:.2f} %.</p>"
                f"<table><tr><th>expert</th><th>lambda</th><th>top-1 (%)</th></tr>{rows}</table>")
