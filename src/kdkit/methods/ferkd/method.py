"""FerKD as a registered method: the ``ferkd:`` section, the recipes it refuses, hard-region mining installed on
the cache's replay, SelfMix as a batch transform, and what the mining kept in ``summary.json``."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from kdkit.cache import CachedTeacher, ViewReplay
from kdkit.cache.views import apply_views
from kdkit.data.augment import normalize
from kdkit.distill import Term, pick
from kdkit.engine import Engine, Hooks
from kdkit.errors import KdkitError
from kdkit.method import Method, MethodRun, register_method
from kdkit.methods.ferkd.loss import FerkdLoss, SelfMixPartner
from kdkit.methods.ferkd.mining import discarded, kept_views, view_confidence
from kdkit.methods.ferkd.selfmix import cutmix_boxes, partner_slots, paste
from kdkit.schema import Strict

LOSS = "ferkd"


class FerkdSpec(Strict):
    """The recipe section ``ferkd:`` (with a ``ferkd`` term and ``teacher.cache``)."""

    discard_easy: float = Field(0.1, ge=0, lt=1, description="share of each image's stored views with the highest "
                                "teacher confidence on the true class that is never replayed (floor(views * share))")
    discard_hard: float = Field(0.1, ge=0, lt=1, description="share of each image's stored views with the lowest "
                                "teacher confidence on the true class that is never replayed (floor(views * share))")
    selfmix: bool = Field(True, description="CutMix each image with a box of another kept view of the same image")
    selfmix_alpha: float = Field(1.0, gt=0, description="SelfMix box area: lam ~ Beta(alpha, alpha), as CutMix")


def ferkd_terms(recipe: Any) -> list[int]:
    """Indices of the recipe's ``ferkd`` terms."""
    return [i for i, t in enumerate(recipe.distill) if t.loss == LOSS]


def cache_problems(recipe: Any) -> list[str]:
    """FerKD mines and mixes the stored views of a teacher cache: one must be there, with views to mine."""
    if recipe.teacher is None or recipe.teacher.cache is None:
        return [f"FerKD mines the stored views of a teacher cache: teacher.cache is "
                f"{None if recipe.teacher is None else recipe.teacher.cache!r} (choices: a teacher-output cache, "
                "`teacher: {cache: {views: 30}}`); add teacher.cache to the recipe's teacher"]
    spec, views = recipe.ferkd, recipe.teacher.cache.views
    if recipe.data.augment.crop_padding == 0 and not recipe.data.augment.hflip:
        views = 1  # an identity augmentation stores one view (kdkit.teacher_cache)
    easy, hard = discarded(views, spec.discard_easy, spec.discard_hard)
    left = views - easy - hard
    if left < 1:
        return [f"ferkd.discard_easy {spec.discard_easy:g} + ferkd.discard_hard {spec.discard_hard:g} drop {easy} + "
                f"{hard} of the {views} stored views per image, leaving none (choices: shares whose floor(views * "
                f"share) sum to less than {views}); lower them or store more teacher.cache.views"]
    if spec.selfmix and left < 2:
        return [f"ferkd.selfmix mixes two kept views of the same image: {left} of {views} stored view(s) per image "
                "is kept (choices: 2 or more kept views); store more teacher.cache.views (and an augmentation), "
                "lower the discard shares, or set ferkd.selfmix: false"]
    return []


class FerkdRun(MethodRun):
    """Installs the mined views on the cache's replay before the first batch and mixes every batch (SelfMix).

    Args:
        spec: The ``ferkd:`` section.
        term: The ``ferkd`` term (its loss receives the SelfMix partner).
        labels: ``(N,)`` training labels, in the cache's order.
        seed: Seed of the SelfMix draws.
    """

    def __init__(self, spec: FerkdSpec, term: Term, labels: torch.Tensor, seed: int) -> None:
        self.spec, self.term, self.labels, self.seed = spec, term, labels.cpu(), seed
        self.stats: dict[str, Any] = {}
        self.replay: ViewReplay | None = None
        transforms = [self.selfmix] if spec.selfmix else []
        super().__init__(Hooks(batch_transforms=transforms, callbacks=[self.on_event]))

    def install(self, engine: Engine) -> ViewReplay:
        """Mine the cache once per run (a pure function of it, so a resumed run mines the same views)."""
        if self.replay is not None:
            return self.replay
        if not isinstance(engine.teacher, CachedTeacher):
            raise KdkitError("FerKD reads the teacher cache's stored views, and this run's teacher is not cached",
                             bad=type(engine.teacher).__name__, choices=["CachedTeacher"],
                             fix="add teacher.cache to the recipe", where="teacher.cache")
        replay = engine.teacher.replay
        confidence = view_confidence(replay.cache, self.labels, str(self.term.teacher_tap))
        easy, hard = discarded(replay.cache.num_views, self.spec.discard_easy, self.spec.discard_hard)
        kept = kept_views(confidence, easy, hard)
        replay.keep(kept)
        kept_conf = confidence.gather(1, kept)
        loss: FerkdLoss = self.term.loss  # type: ignore[assignment]
        self.stats = {"views_stored": replay.cache.num_views, "views_kept": int(kept.shape[1]),
                      "dropped_easy": easy, "dropped_hard": hard,
                      "confidence_mean_stored": round(float(confidence.mean()), 4),
                      "confidence_mean_kept": round(float(kept_conf.mean()), 4),
                      "calibrated_share": round(float((kept_conf < loss.calibrate_below).float().mean()), 4),
                      "selfmix": self.spec.selfmix}
        self.replay = replay
        return replay

    def on_event(self, engine: Engine, event: str) -> None:
        """At every epoch start (also after a resume), before any batch is drawn."""
        if event == "epoch_start":
            self.install(engine)

    def selfmix(self, engine: Engine, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> tuple:
        """Paste a box of another kept view of the same image into each image; hand the pasted regions' stored
        teacher output and each image's own share to the ``ferkd`` loss."""
        replay = self.install(engine)
        assert replay.kept is not None
        rng = np.random.default_rng([self.seed + 7919 * engine.ctx.rank, engine.epoch, engine.batch])
        partner = replay.kept.to(index.device)[index, partner_slots(replay.slots(index, engine.epoch),
                                                                  replay.kept.shape[1], rng)]
        loader = engine.train_loader
        raw = loader.images.index_select(0, index.to(loader.images.device))
        table = replay.cache.views
        pixels = apply_views(raw, table[index.to(table.device), partner.to(table.device)], replay.augment)
        mask, lam = cutmix_boxes(len(x), x.shape[-2], x.shape[-1], self.spec.selfmix_alpha, rng)
        x = paste(x, normalize(pixels, loader.mean, loader.std), mask)
        stored = pick(replay.cache.lookup(index, partner), self.term.teacher_tap)
        self.term.loss.partner = SelfMixPartner(stored.to(x.device), lam.to(x.device))  # type: ignore[union-attr]
        return x, y, index

    def summary(self, engine: Engine) -> dict[str, Any]:
        return {"ferkd": dict(self.stats)} if self.stats else {}


@register_method
class FerkdMethod(Method):
    """FerKD (Shen & Xing, ICCV 2023): hard-region mining, calibrated labels and SelfMix on a teacher cache."""

    name = "ferkd"
    section = "ferkd"
    spec = FerkdSpec
    needs_labels = True  # the mining ranks views by the true class's probability

    def check(self, recipe: Any) -> list[str]:
        problems = cache_problems(recipe)
        terms = ferkd_terms(recipe)
        if not terms:
            problems.append("the `ferkd:` section trains with FerKD's calibrated labels: no `ferkd` term in distill "
                            f"(terms: {[t.loss for t in recipe.distill]}); add `- {{loss: ferkd}}` to distill")
        elif len(terms) > 1:
            problems.append(f"FerKD has one target per region: distill.{terms[1]} is a second `ferkd` term; keep one")
        elif recipe.distill[terms[0]].teacher not in (None, "logits"):
            problems.append(f"FerKD reads the teacher's logits: distill.{terms[0]}.teacher is "
                            f"{recipe.distill[terms[0]].teacher!r} (choices: logits); remove it or set logits")
        if recipe.peers is not None:
            problems.append("FerKD trains one student from a teacher cache: remove `peers:`")
        return problems

    def attach(self, built: Any, ctx: Any) -> MethodRun:
        term = next(t for t in built.objective.terms if isinstance(t.loss, FerkdLoss))
        return FerkdRun(built.recipe.ferkd, term, built.data.train_labels, built.recipe.train.seed)

    def report_section(self, label: str, summary: dict[str, Any], folder: Path) -> str:
        """What the mining kept."""
        stats = summary.get("ferkd")
        if not stats:
            return ""
        return (f"<h3>{html.escape(label)}: FerKD regions (<code>{html.escape(str(folder))}</code>)</h3>"
                f"<p>{stats['views_kept']} of {stats['views_stored']} stored views per image replayed "
                f"({stats['dropped_easy']} easiest and {stats['dropped_hard']} hardest dropped); teacher confidence "
                f"on the true class {stats['confidence_mean_stored']:.3f} over all views, "
                f"{stats['confidence_mean_kept']:.3f} over the kept ones, of which "
                f"{100 * stats['calibrated_share']:.1f} % are calibrated to softened hard labels; "
                f"SelfMix {'on' if stats['selfmix'] else 'off'}.</p>")
