"""DistillNearest / DistillWeighted as a registered method: the ``source_select:`` section, the recipes it refuses,
the plan-time scoring, selection and target heads, and the scores in ``summary.json`` and the report."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from kdkit.data import UNLABELLED
from kdkit.data.augment import normalize
from kdkit.engine import Hooks
from kdkit.method import Method, MethodRun, register_method
from kdkit.methods.source_select.loss import SourceKDLoss
from kdkit.methods.source_select.similarity import fit_target_head, gbc_score, selection_weights
from kdkit.schema import Strict
from kdkit.taps import TapRecorder, resolve_tap

LOSS = "source_kd"
SECTION = "source_select"


class SourceSelectSpec(Strict):
    """The recipe section ``source_select:`` (with one ``source_kd`` term reading every teacher of ``teachers:``)."""

    mode: Literal["weighted", "nearest"] = Field(
        "weighted", description="weighted: every source, weights softmax(score / temperature) (DistillWeighted); "
        "nearest: the highest-scoring source alone (DistillNearest)")
    score: Literal["gbc"] = Field("gbc", description="task similarity of a source on the target's labelled training "
                                  "images: gbc, the Gaussian Bhattacharyya coefficient of its features")
    feature: str = Field("penultimate", description="the sources' tap the similarity reads (each NAME.<feature>)")
    pca_dims: int = Field(64, ge=0, description="principal directions the features are projected on before GBC "
                          "(GBC's 64; 0: none)")
    temperature: float = Field(1.0, gt=0, description="weighted mode: softmax temperature over the scores")
    head: Literal["probe", "source"] = Field(
        "probe", description="probe: each source's pseudo-labels come from a linear target head fitted on its tapped "
        "feature with the labelled target images (the paper's); source: the source's own logits (same classes)")
    probe_steps: int = Field(100, ge=1, description="L-BFGS iterations of each target head's fit")
    probe_l2: float = Field(1e-4, ge=0, description="L2 penalty on each target head's weights")


def as_list(taps: Any) -> list[Any]:
    """A term's tap spec as a list."""
    return list(taps) if isinstance(taps, (list, tuple)) else [taps]


def source_terms(recipe: Any) -> list[int]:
    """Indices of the recipe's ``source_kd`` terms."""
    return [i for i, t in enumerate(recipe.distill) if t.loss == LOSS]


def tap_problems(recipe: Any, index: int) -> list[str]:
    """The ``source_kd`` term must read one tap per teacher of ``teachers:``, in any order, each the one ``head``
    needs: ``NAME.logits`` for ``head: source``, ``NAME.<feature>`` for ``head: probe``."""
    spec, term = recipe.source_select, recipe.distill[index]
    names = list(recipe.teachers or {})
    wanted = "logits" if spec.head == "source" else spec.feature
    expected = [f"{n}.{wanted}" for n in names]
    taps = as_list(term.teacher)
    if sorted(map(str, taps)) != sorted(expected):
        why = ("head: source distils each source's own outputs" if spec.head == "source" else
               f"head: probe fits each source's target head on its {spec.feature!r} feature")
        return [f"distill.{index}.teacher is {term.teacher!r}: {why}, so the term reads one tap per teacher of "
                f"`teachers:` (choices: {expected}); set distill.{index}.teacher: [{', '.join(expected)}]"]
    return []


def recipe_problems(recipe: Any) -> list[str]:
    """Why a recipe using ``source_kd`` or ``source_select:`` cannot run (empty when it can)."""
    terms = source_terms(recipe)
    spec = getattr(recipe, SECTION, None)
    if spec is None:  # the term alone: uniform weights over the teachers' own outputs (identity heads)
        wide = [f"distill.{i}.teacher" for i in terms if any(not str(t).endswith("logits") for t in
                                                              as_list(recipe.distill[i].teacher or "logits"))]
        if wide:
            return [f"{wide[0]} reads a feature: {LOSS} needs the weights and target heads the `source_select:` "
                    "section computes before training; add `source_select: {mode: weighted}` (or nearest), or read "
                    "the teachers' logits"]
        return []
    if len(terms) != 1:
        return [f"source_select configures one {LOSS} term, the recipe has {len(terms)}; give exactly one "
                f"`{{loss: {LOSS}, teacher: [NAME.{spec.feature}, ...]}}` term"]
    teachers = recipe.teachers or {}
    if recipe.teachers is None or len(teachers) < 2:
        given = "`teacher:` (one)" if recipe.teacher is not None else f"{len(teachers)} teacher(s)"
        return [f"source_select selects among or weighs several source models: {given} (choices: 2 or more named "
                "teachers); list the sources under `teachers:`"]
    problems = tap_problems(recipe, terms[0])
    for name, teacher in teachers.items():
        if teacher.cache is not None:
            problems.append(f"teachers.{name}.cache: the similarity and the target heads read the sources' features "
                            "of the unaugmented labelled images, which a cache of logits does not store; remove "
                            f"teachers.{name}.cache")
    if recipe.peers is not None:
        problems.append("source_select distils the sources into one student: remove `peers:`")
    return problems


def labelled_features(built: Any, taps: list[str], batch: int) -> tuple[dict[str, Tensor], Tensor]:
    """The frozen sources' ``taps`` (``NAME.tap``) on the labelled training images (unaugmented, never the test
    split), flattened to ``(N, D)`` on the CPU, and those images' labels."""
    data, ensemble = built.data, built.teacher.model
    picked = (data.train_labels != UNLABELLED).nonzero().flatten()
    recorder = TapRecorder(ensemble, [resolve_tap(ensemble, t) for t in taps])
    found: dict[str, list[Tensor]] = {t: [] for t in taps}
    try:
        with torch.no_grad():
            for start in range(0, len(picked), batch):
                idx = picked[start:start + batch]
                x = normalize(data.train_images[idx].to(built.device), data.mean, data.std)
                ensemble(x)
                for tap, value in recorder.pop().items():
                    found[tap].append(value.flatten(1).float().cpu())
    finally:
        recorder.remove()
    return {t: torch.cat(v) for t, v in found.items()}, data.train_labels[picked]


def source_name(tap: str) -> str:
    """The teacher a ``NAME.tap`` spec belongs to."""
    return tap.split(".", 1)[0]


class SourceSelectRun(MethodRun):
    """The selection made before training, reported in ``summary.json`` (``source_select``)."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(Hooks())
        self.record = record

    def summary(self, engine: Any) -> dict[str, Any]:
        return {SECTION: self.record}


@register_method
class SourceSelectMethod(Method):
    """DistillNearest / DistillWeighted (Borup, Phoo & Hariharan, ICCV 2023): sources scored on the target, then KD."""

    name = "source_select"
    section = SECTION
    spec = SourceSelectSpec

    def active(self, recipe: Any) -> bool:
        return getattr(recipe, SECTION, None) is not None or bool(source_terms(recipe))

    def check(self, recipe: Any) -> list[str]:
        return recipe_problems(recipe)

    def attach(self, built: Any, ctx: Any) -> MethodRun:
        recipe = built.recipe
        spec = recipe.source_select
        term = next(t for t in built.objective.terms if isinstance(t.loss, SourceKDLoss))
        term_taps = as_list(term.teacher_tap)
        score_taps = [f"{source_name(t)}.{spec.feature}" for t in term_taps]
        features, labels = labelled_features(built, sorted(set(score_taps + term_taps)), recipe.train.eval_batch_size)
        classes = len(built.data.classes)
        scores = torch.tensor([gbc_score(features[t], labels, classes, spec.pca_dims) for t in score_taps],
                              dtype=torch.float64)
        weights = selection_weights(scores, spec.mode, spec.temperature)
        heads, probe_top1 = {}, {}
        for s, tap in enumerate(term_taps):
            if spec.head == "probe" and (spec.mode == "weighted" or weights[s] > 0):
                heads[s] = fit_target_head(features[tap], labels, classes, spec.probe_steps, spec.probe_l2)
                logits = features[tap] @ heads[s][0].T + heads[s][1]
                probe_top1[source_name(tap)] = 100.0 * float((logits.argmax(1) == labels).double().mean())
        term.loss.configure(weights.float(), {s: (w.to(built.device), b.to(built.device))
                                              for s, (w, b) in heads.items()})
        names = [source_name(t) for t in term_taps]
        record = {"mode": spec.mode, "score": spec.score, "head": spec.head, "labelled_images": len(labels),
                  "scores": dict(zip(names, scores.tolist(), strict=True)),
                  "weights": dict(zip(names, weights.tolist(), strict=True)),
                  "selected": names[int(scores.argmax())], "probe_train_top1": probe_top1}
        if ctx.rank == 0:
            print(f"source_select: {spec.score} on {len(labels)} labelled training images: " + ", ".join(
                f"{n} {record['scores'][n]:.3f} (weight {record['weights'][n]:.3f})" for n in names), flush=True)
        return SourceSelectRun(record)

    def report_section(self, label: str, summary: dict[str, Any], folder: Path) -> str:
        """The sources' scores and weights."""
        record = summary.get(SECTION)
        if not record:
            return ""
        rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{record['scores'][n]:.3f}</td>"
                       f"<td>{record['weights'][n]:.3f}</td></tr>" for n in record["scores"])
        return (f"<h3>{html.escape(label)}: source selection ({html.escape(record['mode'])}, "
                f"{html.escape(record['score'])}; <code>{html.escape(str(folder))}</code>)</h3>"
                f"<table><tr><th>source</th><th>score</th><th>weight</th></tr>{rows}</table>")
