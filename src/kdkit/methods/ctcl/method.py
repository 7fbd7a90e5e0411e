"""CTCL as a registered method: the recipes its three terms cannot work with, and who taught whom in the summary.

The method has no section: it is active when a recipe has an ``hfd``, ``region_bsd`` or ``pixel_bsd`` term. Its
terms read a CNN and a ViT trained together (``model:`` and a peer, or two peers); each network also learns from
the labels (the task's loss, ``ce`` and ``ce@PEER``), and either is deployable (``deploy:``).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from kdkit.distill import as_specs
from kdkit.engine import Engine, Hooks
from kdkit.method import Method, MethodRun, register_method
from kdkit.methods.ctcl.loss import PairLoss

TASK = "segmentation"
#: Each term's taps, in order, for the networks A and B (``A.x, B.x`` pairs); the tap names are examples.
LAYOUT = {"hfd": ("low", "low"), "region_bsd": ("high", "high", "logits", "logits"),
          "pixel_bsd": ("logits", "logits")}
LOGIT_SLOTS = {"hfd": (), "region_bsd": (2, 3), "pixel_bsd": (0, 1)}


def is_vit(arch: str) -> bool:
    """Whether an architecture name is a vision transformer: kdkit's ``vit_seg_*`` or a timm ViT/DeiT."""
    name = arch.removeprefix("timm:").lower()
    return name.startswith(("vit", "deit"))


def ctcl_terms(recipe: Any) -> list[int]:
    """Indices of the recipe's CTCL terms."""
    return [i for i, t in enumerate(recipe.distill) if t.loss in LAYOUT]


def example_taps(loss: str, a: str, b: str) -> list[str]:
    """The tap list a term of ``loss`` reads for networks ``a`` and ``b``."""
    return [f"{(a, b)[k % 2]}.{tap}" for k, tap in enumerate(LAYOUT[loss])]


def term_pair(recipe: Any, i: int) -> tuple[tuple[str, str] | None, list[str]]:
    """The two networks CTCL term ``i`` reads (``None`` when its taps do not name them so), and its problems."""
    term = recipe.distill[i]
    taps = [term.student] if isinstance(term.student, str) else list(term.student or [])
    trained = list(recipe.trained_members())
    pair = trained[:2] if len(trained) >= 2 else ["model", "vit"]
    shape = ", ".join(example_taps(term.loss, *pair))
    layout = (f"distill.{i}.student is {term.student!r}: {term.loss} reads {len(LAYOUT[term.loss])} taps, network A's "
              f"and network B's alternately, each NAME.TAP of a trained network (e.g. [{shape}]); give that list")
    if len(taps) != len(LAYOUT[term.loss]) or any("." not in tap for tap in taps):
        return None, [layout]
    names = [tap.split(".", 1)[0] for tap in taps]
    a, b = names[0], names[1]
    problems = []
    if a == b or names != [(a, b)[k % 2] for k in range(len(names))]:
        problems.append(layout)
    unknown = [n for n in (a, b) if n not in trained]
    if unknown:
        problems.append(f"distill.{i}.student reads {unknown[0]!r}, which is not a trained network (choices: "
                        f"{', '.join(trained)}); CTCL trains both networks: name `model` or a peer")
    for k in LOGIT_SLOTS[term.loss]:
        if taps[k].split(".", 1)[1] != "logits":
            problems.append(f"distill.{i}.student[{k}] is {taps[k]!r}: {term.loss} reads the networks' per-pixel "
                            f"logits there (choices: {names[k]}.logits); set it to {names[k]}.logits")
    if term.teacher is not None:
        problems.append(f"distill.{i}.teacher is {term.teacher!r}: {term.loss} reads both networks through "
                        "`student:` and detaches each target itself; remove `teacher:` from the term")
    return ((a, b) if not problems else None), problems


def pair_problems(recipe: Any, pairs: dict[int, tuple[str, str]]) -> list[str]:
    """Every CTCL term reads the same two networks, a CNN and a ViT."""
    first, (a, b) = next(iter(pairs.items()))
    problems = [f"distill.{i} reads {set(p)}, distill.{first} {({a, b})}: CTCL trains one CNN-ViT pair; make every "
                f"CTCL term read the same two networks" for i, p in pairs.items() if set(p) != {a, b}]
    members = recipe.trained_members()
    archs = {n: members[n].arch for n in (a, b) if n in members}
    if len(archs) == 2 and sum(is_vit(arch) for arch in archs.values()) != 1:
        kinds = ", ".join(f"{n}: {arch} ({'ViT' if is_vit(arch) else 'CNN'})" for n, arch in archs.items())
        problems.append(f"CTCL collaborates a CNN and a ViT, and distill.{first} pairs {kinds} (choices: one "
                        "network a ViT, e.g. arch vit_seg_student or timm:vit_*, the other a CNN, e.g. "
                        "segnet_student); change one network's arch")
    return problems


class CtclRun(MethodRun):
    """Reports how often each network of the pair taught in the BSD terms.

    Args:
        terms: The run's CTCL terms that count their teachers (region- and pixel-wise BSD).
    """

    def __init__(self, terms: list[Any]) -> None:
        self.terms = terms
        super().__init__(Hooks())

    def summary(self, engine: Engine) -> dict[str, Any]:
        shares = {}
        for term in self.terms:
            names = [spec.split(".", 1)[0] for spec in as_specs(term.student_tap)[:2]]
            counts = term.loss.taught.tolist()
            shares[term.name] = {"taught": dict(zip(names, counts, strict=True)), "unit": term.loss.unit}
        return {"ctcl": shares}


@register_method
class CtclMethod(Method):
    """CNN-Transformer collaborative learning (Zhu et al., ICCV 2023): HFD, region- and pixel-wise BSD."""

    name = "ctcl"
    needs_labels = True  # both BSD terms choose their teacher by the cross-entropy with the labels

    def active(self, recipe: Any) -> bool:
        return bool(ctcl_terms(recipe))

    def check(self, recipe: Any) -> list[str]:
        problems = []
        if recipe.task != TASK:
            problems.append(f"CTCL's terms compare per-pixel predictions and feature regions: task is "
                            f"{recipe.task!r} (choices: {TASK}); set task: {TASK}")
        if recipe.peers is None:
            problems.append("CTCL trains a CNN and a ViT together: `peers:` is None; add the second network as a "
                            "peer (e.g. peers: {vit: {arch: vit_seg_student}})")
            return problems
        pairs = {}
        for i in ctcl_terms(recipe):
            pair, found = term_pair(recipe, i)
            problems += found
            if pair is not None:
                pairs[i] = pair
        if pairs:
            problems += pair_problems(recipe, pairs)
        return problems

    def attach(self, built: Any, ctx: Any) -> MethodRun:
        return CtclRun([t for t in built.objective.terms if isinstance(t.loss, PairLoss)])

    def report_section(self, label: str, summary: dict[str, Any], folder: Path) -> str:
        """Who taught how many regions and pixels."""
        stats = summary.get("ctcl")
        if not stats:
            return ""
        lines = []
        for term, info in stats.items():
            total = max(sum(info["taught"].values()), 1)
            who = ", ".join(f"{html.escape(n)} {100 * c / total:.1f} %" for n, c in info["taught"].items())
            lines.append(f"<li>{html.escape(term)}: teacher of the {info['unit']} with one: {who}</li>")
        return (f"<h3>{html.escape(label)}: CTCL directions (<code>{html.escape(str(folder))}</code>)</h3>"
                f"<ul>{''.join(lines)}</ul>")
