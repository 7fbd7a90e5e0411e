"""TST as a registered method: the ``tst:`` section, its engine hooks, summary, report and benchmark pieces."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from kdkit.engine import Engine, Hooks, Phase
from kdkit.method import Method, MethodRun, register_method
from kdkit.methods.tst.ops import OPS
from kdkit.methods.tst.spec import TstSpec
from kdkit.methods.tst.trainer import TstTrainer
from kdkit.pages import embed_png


class TstRun(MethodRun):
    """The hooks of one TST run: ``[policy(x); x]`` batches, the policy phase, its log and checkpointed state."""

    def __init__(self, trainer: TstTrainer) -> None:
        self.trainer = trainer
        policy_epochs = set(trainer.policy_epochs)
        # engine.batch > 0: resumed in the middle of an epoch whose policy phase already ran (the checkpoint
        # holds the trained policy)
        phase = Phase("tst", due=lambda e: e.batch == 0 and e.epoch in policy_epochs, run=trainer.train_policy)
        super().__init__(Hooks(batch_transforms=[trainer.batch_transform], callbacks=[trainer.callback],
                               phases=[phase], state={"tst": trainer.state}))

    def summary(self, engine: Engine) -> dict[str, Any]:
        return self.trainer.summary()


@register_method
class TstMethod(Method):
    """TST: a learned augmentation policy trained against teacher and student (Shao et al., IJCAI 2023)."""

    name = "tst"
    section = "tst"
    spec = TstSpec
    feeds_teacher_new_images = True  # the policy's augmented images
    needs_labels = True  # the policy phase scores the labels: -log p_T(y) - log(1 - p_S(y))

    def moves_pixels(self, recipe: Any) -> str | None:
        """TST's geometric operations (shears, translations, rotation), when ``tst.ops`` has any."""
        moving = [op for op in recipe.tst.ops if OPS[op].moves_pixels]
        if not moving:
            return None
        kept = [op for op in recipe.tst.ops if not OPS[op].moves_pixels]
        return (f"tst.ops has {moving}; the photometric operations ({kept or 'e.g. brightness, contrast'}) keep "
                "every pixel in place")

    def check(self, recipe: Any) -> list[str]:
        spec: TstSpec = recipe.tst
        problems = []
        if not recipe.has_teacher:
            problems.append("`tst:` trains its augmentation against a teacher, but no `teacher:` is given")
        if recipe.data.views != 1:
            problems.append("`tst:` doubles each batch itself ([augmented; original]); it cannot be combined "
                            "with data.views: 2")
        late = [e for e in spec.policy_epochs if e >= recipe.train.epochs]
        if late:
            problems.append(f"tst.policy_epochs {late} are not before train.epochs {recipe.train.epochs} "
                            "(epochs count from 0)")
        return problems

    def attach(self, built: Any, ctx: Any) -> MethodRun:
        return TstRun(TstTrainer.from_plan(built, ctx))

    def report_section(self, label: str, summary: dict[str, Any], folder: Path) -> str:
        """The learned policy over time and augmented samples next to their originals."""
        if not (folder / "tst_policy.png").is_file():
            return ""
        parts = [f"<h3>{html.escape(label)}: TST policy (<code>{html.escape(str(folder))}</code>)</h3>"]
        seconds = summary.get("tst_policy_seconds")
        if seconds is not None:
            parts.append(f"<p>Policy phases: {summary.get('tst_policy_phases', '?')}, {seconds:.1f} s of "
                         f"{summary.get('train_seconds', float('nan')):.1f} s of training.</p>")
        for name in ("tst_policy.png", "tst_samples.png"):
            if (folder / name).is_file():
                parts.append(embed_png(folder / name))
        return "".join(parts)

    def bench_fields(self, summaries: list[dict[str, Any]]) -> dict[str, Any]:
        """Seconds of policy phases (reported apart from the student's) and of training, per run."""
        if not any("tst_policy_seconds" in s for s in summaries):
            return {}
        n = len(summaries)
        return {"tst_policy_seconds": sum(s.get("tst_policy_seconds", 0.0) for s in summaries) / n,
                "train_seconds": sum(s["train_seconds"] for s in summaries) / n}

    def bench_notes(self, row: dict[str, Any]) -> list[str]:
        if "tst_policy_seconds" not in row:
            return []
        return [f"{row['method']}: policy phases took {row['tst_policy_seconds']:.1f} s of "
                f"{row['train_seconds']:.1f} s of training per run (included in s / epoch)."]
