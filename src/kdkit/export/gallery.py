"""A report section drawing deployed networks' predictions over a few test images, next to the ground truth.

For the runs whose task draws its targets (:attr:`kdkit.task.Task.drawn`: boxes, class masks; classification draws
nothing and gets no section), the images :data:`GALLERY_INDICES` of each run's stored test samples
(``deploy_samples.safetensors``: the first test images, their targets) are drawn with their ground truth in the
first row, then one row per run group: the deployed network of the group's first run (its best checkpoint), run on
the CPU from the run folder. Runs on the same images share one figure, so methods are compared image by image; each
class keeps one colour in every panel. A run that cannot be drawn (no stored targets, not finished) is named in the
section with the reason.
"""

from __future__ import annotations

import hashlib
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import yaml
from torch import Tensor

from kdkit.deployment import SAMPLE_COUNT, SAMPLES_FILE, read_deployment, read_sample_targets, read_samples
from kdkit.errors import KdkitError
from kdkit.export.network import RawImages
from kdkit.export.source import open_run
from kdkit.pages import embed_png
from kdkit.report import RunRecord, save_figure
from kdkit.task import TASKS, Drawing, Task

if TYPE_CHECKING:
    from matplotlib.axes import Axes

#: The stored test samples drawn (indices into ``deploy_samples.safetensors``: the first test images).
GALLERY_INDICES = (0, 1, 2, 3, 4, 5)
#: Opacity of a class mask over the image.
MASK_ALPHA = 0.55
#: A box whose top is in this share of the image's height has its label inside it (no room above).
LABEL_ROOM = 0.08
#: Side of one image's panel (inches).
PANEL_INCHES = 2.2


@dataclass
class Sheet:
    """Runs of one task on the same stored images: one figure.

    Attributes:
        task: Their task.
        images: The drawn images, ``uint8 (N, C, H, W)``.
        targets: Their per-sample targets, by the data's key.
        classes: The class names.
        rows: ``(label, run folder)`` of each run drawn, in order.
    """

    task: Task
    images: Tensor
    targets: dict[str, Tensor]
    classes: tuple[str, ...]
    rows: list[tuple[str, Path]] = field(default_factory=list)


def class_colour(index: int, num_classes: int) -> tuple[float, float, float, float]:
    """The RGBA colour of class ``index`` (matplotlib's ``tab10``, ``tab20`` beyond 10 classes)."""
    import matplotlib

    name, size = ("tab10", 10) if num_classes <= 10 else ("tab20", 20)
    return tuple(float(c) for c in matplotlib.colormaps[name](index % size))  # type: ignore[return-value]


def overlay(mask: Tensor, num_classes: int) -> np.ndarray:
    """The RGBA image ``(H, W, 4)`` drawn over an image for a class mask: each class's colour at
    :data:`MASK_ALPHA`, transparent where the mask is -1."""
    mask = mask.cpu()
    rgba = np.zeros((*mask.shape, 4))
    for index in mask.unique().tolist():
        if index >= 0:
            rgba[mask.numpy() == index] = (*class_colour(index, num_classes)[:3], MASK_ALPHA)
    return rgba


def draw_panel(ax: Axes, image: Tensor, drawing: Drawing, classes: Sequence[str]) -> None:
    """Draw ``image`` (``uint8 (C, H, W)``) with ``drawing`` over it: the mask, then each box with its class name
    (and score)."""
    from matplotlib.patches import Rectangle

    pixels = image.permute(1, 2, 0).cpu().numpy()
    ax.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels, cmap="gray", vmin=0, vmax=255,
              interpolation="nearest")
    if drawing.mask is not None:
        ax.imshow(overlay(drawing.mask, len(classes)), interpolation="nearest")
    scores = drawing.scores.tolist() if drawing.scores is not None else [None] * len(drawing.classes)
    for (x0, y0, x1, y1), index, score in zip(drawing.boxes.tolist(), drawing.classes.tolist(), scores, strict=True):
        colour = class_colour(index, len(classes))
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour, lw=1.2))
        text = classes[index] if score is None else f"{classes[index]} {score:.2f}"
        inside = y0 < LABEL_ROOM * image.shape[-2]  # no room above a box at the image's top: label inside it
        ax.text(x0 - 0.5, y0 - 0.5, text, fontsize=6, color="white", va="top" if inside else "bottom", ha="left",
                clip_on=True, bbox={"facecolor": colour, "edgecolor": "none", "pad": 0.5, "alpha": 0.85})
    ax.set_xticks([])
    ax.set_yticks([])


def shown_classes(drawings: Sequence[Drawing]) -> list[int]:
    """The classes drawn anywhere in ``drawings`` (boxes and masks), sorted."""
    found: set[int] = set()
    for drawing in drawings:
        found.update(drawing.classes.tolist())
        if drawing.mask is not None:
            found.update(v for v in drawing.mask.unique().tolist() if v >= 0)
    return sorted(found)


def predicted(folder: Path, task: Task, images: Tensor) -> list[Drawing]:
    """What ``task`` draws of the deployed network of run ``folder`` (best checkpoint, CPU) on ``images``."""
    run = open_run(folder, "best")
    network = RawImages(run.network, run.deployment).eval()
    with torch.inference_mode():
        outputs = network(images)
    return task.drawn_outputs(outputs, run.student.model, run.deployment.size)


def plot_sheet(sheet: Sheet, rows: list[tuple[str, list[Drawing]]], file: Path) -> Path:
    """One column per image, one row per ``(label, drawings)``, a legend of the classes drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    columns = len(sheet.images)
    fig, axes = plt.subplots(len(rows), columns, figsize=(PANEL_INCHES * columns + 1.2, PANEL_INCHES * len(rows) + 0.6),
                             squeeze=False)
    for r, (label, drawings) in enumerate(rows):
        for c, drawing in enumerate(drawings):
            draw_panel(axes[r][c], sheet.images[c], drawing, sheet.classes)
            if r == 0:
                axes[r][c].set_title(f"test image {GALLERY_INDICES[c]}", fontsize=8)
        axes[r][0].set_ylabel(label, fontsize=8)
    found = shown_classes([d for _, drawings in rows for d in drawings])
    fig.legend(handles=[Patch(color=class_colour(i, len(sheet.classes)), label=sheet.classes[i]) for i in found],
               loc="lower center", ncol=min(len(found), 10) or 1, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.5 / (PANEL_INCHES * len(rows) + 0.6), 1, 1))
    return save_figure(fig, file, dpi=100)


def sheets(shown: Sequence[tuple[str, Path]]) -> tuple[list[Sheet], list[str]]:
    """The runs of ``shown`` that draw, as sheets of runs on the same stored images, and the reasons (HTML) why
    each run that cannot be drawn is not; runs whose task draws nothing are left out without a word."""
    found: dict[str, Sheet] = {}
    skipped: list[str] = []
    for label, folder in shown:
        deployment = read_deployment(folder)
        if deployment is None:
            if TASKS.get(recipe_task(folder)).drawn:
                skipped.append(_skip(label, folder, "it records no deployed network (no deploy.json: written by an "
                                                     "older kdkit, rerun it to draw its predictions)"))
            continue
        task = TASKS.get(deployment.task)
        if not task.drawn:
            continue
        try:
            images, _ = read_samples(folder)
            targets = read_sample_targets(folder)
        except KdkitError as exc:
            skipped.append(_skip(label, folder, f"its test samples cannot be read: {exc}"))
            continue
        if not targets:
            skipped.append(_skip(label, folder, f"its {SAMPLES_FILE} stores no test targets (written by an older "
                                                 "kdkit: rerun it to draw its predictions)"))
            continue
        index = [i for i in GALLERY_INDICES if i < len(images)]
        picked = {key: value[index] for key, value in targets.items()}
        digest = hashlib.sha256(task.name.encode() + images[index].numpy().tobytes()
                                + b"".join(picked[k].numpy().tobytes() for k in sorted(picked))).hexdigest()
        sheet = found.setdefault(digest, Sheet(task, images[index], picked, deployment.classes))
        sheet.rows.append((label, folder))
    return list(found.values()), skipped


def recipe_task(folder: Path) -> str:
    """The task of run ``folder`` by its ``recipe.yaml`` (a recipe's default, classification, without one)."""
    recipe_file = folder / "recipe.yaml"
    recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file.is_file() else None
    return str((recipe or {}).get("task", "classification"))


def _skip(label: str, folder: Path, reason: str) -> str:
    return f"<li>{html.escape(label)} (<code>{html.escape(str(folder))}</code>): not drawn, {html.escape(reason)}</li>"


def predictions_section(groups: dict[str, list[RunRecord]], out: Path, *,
                        extra: Sequence[tuple[str, Path]] = ()) -> str:
    """The report section (HTML) drawing each group's predictions over test images (module docstring); empty when no
    run's task draws. Writes ``predictions_<task>.png`` (``_2``, ... for more sheets of a task) into ``out``.

    Args:
        groups: The report's run groups; the first run of each is drawn.
        out: The report's folder.
        extra: More ``(label, run folder)`` drawn first, e.g. a benchmark's teacher.
    """
    shown = [*extra, *((label, runs[0].path) for label, runs in groups.items())]
    found, skipped = sheets(shown)
    if not found and not skipped:
        return ""
    parts = ["<h2>Predictions on test images</h2>"]
    counts: dict[str, int] = {}
    for sheet in found:
        counts[sheet.task.name] = counts.get(sheet.task.name, 0) + 1
        suffix = f"_{counts[sheet.task.name]}" if counts[sheet.task.name] > 1 else ""
        rows: list[tuple[str, list[Drawing]]] = [("ground truth", sheet.task.drawn_targets(sheet.targets) or [])]
        drawn: list[tuple[str, Path]] = []
        for label, folder in sheet.rows:
            try:
                rows.append((label, predicted(folder, sheet.task, sheet.images)))
                drawn.append((label, folder))
            except KdkitError as exc:
                skipped.append(_skip(label, folder, f"its network cannot be loaded: {exc}"))
        if not drawn:
            continue
        file = plot_sheet(sheet, rows, out / f"predictions_{sheet.task.name}{suffix}.png")
        parts.append(f"<figure>{embed_png(file)}<figcaption>{caption(sheet, drawn)} (<a href='{file.name}'>"
                     f"{file.name}</a>)</figcaption></figure>")
    if skipped:
        parts.append("<ul>" + "".join(skipped) + "</ul>")
    return "".join(parts)


def caption(sheet: Sheet, drawn: Sequence[tuple[str, Path]]) -> str:
    """What a sheet's figure shows, in words (HTML), ``drawn`` being its rows' ``(label, run folder)``."""
    runs = "; ".join(f"{html.escape(label)}: <code>{html.escape(str(folder))}</code>" for label, folder in drawn)
    indices = ", ".join(str(i) for i in GALLERY_INDICES[: len(sheet.images)])
    return (f"Test images {indices} (of the first {SAMPLE_COUNT} of the test split, stored in each run's "
            f"{SAMPLES_FILE}). Top row: the ground truth; then, per row, the deployed network (best checkpoint, run on "
            f"the CPU) of the first run of each group ({runs}): {html.escape(sheet.task.drawn)}. Each class has one "
            f"colour in every panel (legend below the images).")
