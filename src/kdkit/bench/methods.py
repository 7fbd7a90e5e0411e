"""``kdkit bench methods``: every distillation method on Fashion-MNIST with the same teacher and budget.

Each method is a shipped recipe in ``recipes/fashion_mnist/`` (the labels-only student and every
method on the same 3,000-image subset, 30 epochs, the same optimiser and schedule); the teacher is
trained once (or reused). For N seeds per method it records best and last top-1 (mean +- std), time
per epoch and the extra trainable parameters (bridges and loss heads), then writes ``results.md``,
``results.json`` and an HTML/PNG report (bar plot of every method) to the output folder.
"""

from __future__ import annotations

import functools
import html
import json
import re
import sys
from pathlib import Path
from typing import Any

from kdkit.build import KNOWN_SHAPES
from kdkit.checkpoint import atomic_write_text
from kdkit.errors import KdkitError
from kdkit.export.gallery import predictions_section
from kdkit.method import METHODS, active_methods
from kdkit.models import build_model
from kdkit.pages import html_table
from kdkit.profile import count_flops, machine_info
from kdkit.recipe import find_recipe, load_recipe, recipes_root, shipped_recipe_files
from kdkit.report import LATENCY_MEANING, deployed_latency, mean_std, write_report
from kdkit.runner import run_or_continue

SUITE = "fashion_mnist"
NOT_METHODS = {"teacher"}
#: How a metric is shown in the table's header.
METRIC_HEADERS = {"top1": "top-1 (%)", "map": "mAP (%)", "miou": "mIoU (%)"}


def suites() -> list[str]:
    """The benchmark suites: folders of shipped recipes with a ``teacher.yaml`` and a ``student_*`` baseline."""
    return sorted(p.parent.name for p in recipes_root().glob("*/teacher.yaml")
                  if any(p.parent.glob("student_*.yaml")))


def method_recipes(suite: str = SUITE) -> list[str]:
    """The method recipes of a suite: the labels-only baseline (``student_*``) first, then KD, then alphabetical."""
    names = sorted(p.stem for p in shipped_recipe_files() if p.parent == recipes_root() / suite
                   and p.stem not in NOT_METHODS and not p.stem.startswith("teacher_"))  # teacher_*: more teachers
    return sorted(names, key=lambda n: (not n.startswith("student_"), n != "kd", n))


def run_methods_bench(out: Path, seeds: int = 3, methods: list[str] | None = None, quick: bool = False,
                      overrides: list[str] | None = None, suite: str = SUITE) -> dict[str, Any]:
    """Run the method benchmark and return its results (also written to ``out``).

    Args:
        out: Output folder (one run folder per method and seed, plus the report).
        seeds: Seeds per method.
        methods: Recipe names to run (default: all of :func:`method_recipes`).
        quick: One epoch each (the teacher on 2,000 images), for smoke tests.
        overrides: ``key=value`` overrides applied to every student recipe (e.g. ``train.epochs=10``).
        suite: The folder of shipped recipes (:func:`suites`), e.g. ``fashion_mnist`` or ``scenes``.
    """
    if suite not in suites():
        raise KdkitError(f"unknown benchmark suite {suite!r}", choices=suites(), bad=suite,
                         fix="pick a folder of recipes/ that holds a teacher.yaml and a student_* baseline")
    available = method_recipes(suite)
    chosen = methods or available
    unknown = [m for m in chosen if m not in available]
    if unknown:
        raise KdkitError(f"unknown method recipe {unknown[0]!r}", choices=available, bad=unknown[0],
                         fix=f"pick recipes from recipes/{suite}/ (kdkit ls recipes)")
    quick_over = ["train.epochs=1"] if quick else []
    teacher_quick = [*quick_over, "data.subset=2000"] if quick else []
    teacher = load_recipe(find_recipe(f"{suite}/teacher"), [*teacher_quick, f"output.dir={out}/teacher"])
    run_or_continue(teacher)
    rows, folders, labels = [], [], []
    for method in chosen:
        summaries = []
        for seed in range(seeds):
            source = find_recipe(f"{suite}/{method}")  # its other teachers' recipes are relative to it
            base = load_recipe(source)
            # the suite's teacher is trained once, into the benchmark folder (also a network that starts from it,
            # such as a pivot teacher refined with the students); other teachers by their own recipes
            suite_teacher = [key for key, spec in base.weights_sources().items() if spec.recipe == "teacher.yaml"]
            extra = [item for key in suite_teacher
                     for item in (f"{key}.checkpoint={out}/teacher", f"{key}.recipe=null")]
            recipe = load_recipe(source, [*extra, *quick_over, *(overrides or []), f"train.seed={seed}",
                                          f"output.dir={out}/{method}_seed{seed}", "output.progress=false"])
            summary = run_or_continue(recipe, source=source)
            metric = summary.get("metric", "top1")
            print(f"bench: {method} seed {seed}: best {metric} {summary[f'best_{metric}']:.2f} last "
                  f"{summary[f'last_{metric}']:.2f} "
                  f"({summary['epoch_seconds']:.2f} s/epoch)", flush=True)
            summaries.append(summary)
            folders.append(recipe.run_dir)
            labels.append(method)
        rows.append(_row(f"{suite}/{method}", method, summaries))
    baseline = next((r for r in rows if r["method"].startswith("student_")), None)
    kd = next((r for r in rows if r["method"] == "kd"), None)
    for row in rows:  # a difference only between rows scored by one metric
        row["vs_labels_only"] = row["best"] - baseline["best"] if same_metric(row, baseline) else None
        row["vs_kd"] = row["best"] - kd["best"] if same_metric(row, kd) else None
    teacher_summary = json.loads((teacher.run_dir / "summary.json").read_text())
    results = {"suite": suite, "rows": rows, "seeds": seeds, "quick": quick, "overrides": overrides or [],
               "teacher": {k: teacher_summary.get(k) for k in ("arch", "train_samples", "dataset")},
               "machine": machine_info(), "command": " ".join(sys.argv)}
    table = format_table(results)
    atomic_write_text(out / "results.md", table + "\n")
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    # the predictions' figure shows the teacher's too: what each student was taught to reproduce
    predictions = functools.partial(predictions_section, extra=[("teacher", teacher.run_dir)])
    report = write_report(folders, out / "report", labels=labels, title=f"kdkit method benchmark ({suite})",
                          table=html_report_table(results), sections=[predictions])
    print(table)
    print(f"report: {report}")
    return results


def deployed_cost(summary: dict[str, Any], recipe: Any) -> dict[str, Any]:
    """Parameters, FLOPs and latency (ms, batch 1) of the network a run deploys (``summary["deployed"]``).

    Summaries written before that field existed deploy the plain student, whose FLOPs are measured here;
    a method whose deployed network differs says so in its :meth:`~kdkit.method.Method.bench_fields`.
    """
    if isinstance(summary.get("deployed"), dict):
        return dict(summary["deployed"])
    flops = None
    if recipe.data.dataset in KNOWN_SHAPES:
        num_classes, channels, size = KNOWN_SHAPES[recipe.data.dataset]
        model = build_model(recipe.model.arch, num_classes=num_classes, in_channels=channels, image_size=size,
                            params=recipe.model.params)
        flops = count_flops(model, (channels, size, size))
    return {"params": summary["params"], "flops": flops, "latency_ms": summary.get("latency_ms")}


def _row(name: str, method: str, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    metric = summaries[0].get("metric", "top1")
    best = mean_std([s[f"best_{metric}"] for s in summaries])
    last = mean_std([s[f"last_{metric}"] for s in summaries])
    first = summaries[0]
    recipe = load_recipe(find_recipe(name))
    cost = deployed_cost(first, recipe)
    latency = deployed_latency(summaries)
    row = {
        "method": method, "description": recipe.description, "seeds": len(summaries),
        "metric": metric, "best": best[0], "best_std": best[1], "last": last[0], "last_std": last[1],
        "arch": first.get("arch"), "dataset": first.get("dataset"),
        "epoch_seconds": sum(s["epoch_seconds"] for s in summaries) / len(summaries),
        "extra_params": first["bridge_params"] + first.get("loss_params", 0),
        # student + bridges + loss heads; the deployed network may be smaller (a deploying bridge skips the classifier)
        "trained_params": first["params"] + first["bridge_params"] + first.get("loss_params", 0),
        "deployed_params": cost["params"], "deployed_flops": cost["flops"],
        # the median over seeds of each run's deployed latency (batch 1), the one the report shows
        "latency_ms": latency if latency is not None else cost["latency_ms"],
        "epochs": first["epochs"], "train_samples": first["train_samples"],
    }
    row["methods"] = [m.name for m in active_methods(recipe)]
    for method in active_methods(recipe):
        row.update(method.bench_fields(summaries))
    return row


def same_metric(row: dict[str, Any], other: dict[str, Any] | None) -> bool:
    """Whether ``other`` exists and scores by ``row``'s metric (a difference of two metrics means nothing)."""
    return other is not None and other["metric"] == row["metric"]


def table_cells(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The benchmark table's header and rows, as text (rendered as Markdown and as HTML). When the rows are scored
    by different metrics (a labels-only baseline that cannot report the methods' metric), each value names its
    metric."""
    metrics = {r["metric"] for r in results["rows"]}
    metric = results["rows"][0]["metric"]
    shown = METRIC_HEADERS.get(metric, metric) if len(metrics) == 1 else "(metric named in each cell)"
    header = ["method", f"best {shown}", f"last {shown}", "vs labels only", "vs KD", "s / epoch", "trained params",
              "deployed params", "deployed MFLOPs", f"latency (ms, {LATENCY_MEANING})"]
    delta = lambda v: "–" if v is None else f"{v:+.2f}"  # noqa: E731
    rows = []
    for r in results["rows"]:
        named = "" if len(metrics) == 1 else f" {r['metric']}"
        flops = "–" if r.get("deployed_flops") is None else f"{r['deployed_flops'] / 1e6:.2f}"
        latency = "–" if r.get("latency_ms") is None else f"{r['latency_ms']:.2f}"
        deployed = r.get("deployed_params")
        rows.append([r["method"], f"{r['best']:.2f} ± {r['best_std']:.2f}{named}",
                     f"{r['last']:.2f} ± {r['last_std']:.2f}{named}",
                     delta(r["vs_labels_only"]), delta(r["vs_kd"]), f"{r['epoch_seconds']:.2f}",
                     f"{r['trained_params']:,}", "–" if deployed is None else f"{deployed:,}", flops, latency])
    return header, rows


def table_notes(results: dict[str, Any]) -> list[str]:
    """The lines under the table: each method's notes, the budget, the machine and the command."""
    lines: list[str] = []
    for r in results["rows"]:
        for name in r.get("methods", []):
            lines += METHODS.get(name).bench_notes(r)
    m = results["machine"]
    first = results["rows"][0]
    teacher = results.get("teacher") or {}
    return [*lines, f"{results['seeds']} seeds per method; student {first.get('arch')} on "
            f"{first['train_samples']:,} {first.get('dataset')} images for {first['epochs']} epochs, teacher "
            f"{teacher.get('arch')} on {teacher.get('train_samples') or 0:,}.",
            f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
            f"python {m['python']}. Command: `{results['command']}`"]


def format_table(results: dict[str, Any]) -> str:
    """Markdown table of the benchmark (what the README shows)."""
    header, rows = table_cells(results)
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    for note in table_notes(results):
        lines += ["", note]
    return "\n".join(lines)


def html_report_table(results: dict[str, Any]) -> str:
    """The benchmark table and its notes as HTML (the report's one table)."""
    header, rows = table_cells(results)
    # the notes' `code` spans (Markdown) become <code> elements
    notes = "".join("<p>" + re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(note)) + "</p>"
                    for note in table_notes(results))
    return html_table(header, rows) + notes
