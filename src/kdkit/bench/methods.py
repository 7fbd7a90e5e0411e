"""``kdkit bench methods``: every distillation method on Fashion-MNIST with the same teacher and budget.

Each method is a shipped recipe in ``recipes/fashion_mnist/`` (the labels-only student and every
method on the same 3,000-image subset, 30 epochs, the same optimiser and schedule); the teacher is
trained once (or reused). For N seeds per method it records best and last top-1 (mean +- std), time
per epoch and the extra trainable parameters (bridges and loss heads), then writes ``results.md``,
``results.json`` and an HTML/PNG report (bar plot of every method) to the output folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from kdkit.build import KNOWN_SHAPES
from kdkit.checkpoint import atomic_write_text
from kdkit.errors import KdkitError
from kdkit.method import METHODS, active_methods
from kdkit.models import build_model
from kdkit.profile import count_flops, machine_info
from kdkit.recipe import find_recipe, load_recipe, recipes_root
from kdkit.report import mean_std, write_report
from kdkit.runner import run_recipe

SUITE = "fashion_mnist"
NOT_METHODS = {"teacher"}


def method_recipes() -> list[str]:
    """The method recipes of the benchmark suite: the labels-only baseline first, then alphabetical."""
    names = sorted(p.stem for p in (recipes_root() / SUITE).glob("*.yaml") if p.stem not in NOT_METHODS)
    return sorted(names, key=lambda n: (n != "student_ce", n != "kd", n))


def run_methods_bench(out: Path, seeds: int = 3, methods: list[str] | None = None, quick: bool = False,
                      overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the method benchmark and return its results (also written to ``out``).

    Args:
        out: Output folder (one run folder per method and seed, plus the report).
        seeds: Seeds per method.
        methods: Recipe names to run (default: all of :func:`method_recipes`).
        quick: One epoch each (the teacher on 2,000 images), for smoke tests.
        overrides: ``key=value`` overrides applied to every student recipe (e.g. ``train.epochs=10``).
    """
    available = method_recipes()
    chosen = methods or available
    unknown = [m for m in chosen if m not in available]
    if unknown:
        raise KdkitError(f"unknown method recipe {unknown[0]!r}", choices=available, bad=unknown[0],
                         fix=f"pick recipes from recipes/{SUITE}/ (kdkit ls recipes)")
    quick_over = ["train.epochs=1"] if quick else []
    teacher_quick = [*quick_over, "data.subset=2000"] if quick else []
    teacher = load_recipe(find_recipe(f"{SUITE}/teacher"), [*teacher_quick, f"output.dir={out}/teacher"])
    run_recipe(teacher, reuse=True, overwrite=True)  # reuse a finished identical run, else start over
    rows, folders, labels = [], [], []
    for method in chosen:
        summaries = []
        for seed in range(seeds):
            extra = []
            base = load_recipe(find_recipe(f"{SUITE}/{method}"))
            if base.teacher is not None:
                extra = [f"teacher.checkpoint={out}/teacher", "teacher.recipe=null"]
            recipe = load_recipe(find_recipe(f"{SUITE}/{method}"),
                                 [*extra, *quick_over, *(overrides or []), f"train.seed={seed}",
                                  f"output.dir={out}/{method}_seed{seed}", "output.progress=false"])
            summary = run_recipe(recipe, reuse=True, overwrite=True)
            print(f"bench: {method} seed {seed}: best {summary['best_top1']:.2f} last {summary['last_top1']:.2f} "
                  f"({summary['epoch_seconds']:.2f} s/epoch)", flush=True)
            summaries.append(summary)
            folders.append(recipe.run_dir)
            labels.append(method)
        rows.append(_row(method, summaries))
    baseline = next((r for r in rows if r["method"] == "student_ce"), None)
    kd = next((r for r in rows if r["method"] == "kd"), None)
    for row in rows:
        row["vs_labels_only"] = row["best_top1"] - baseline["best_top1"] if baseline else None
        row["vs_kd"] = row["best_top1"] - kd["best_top1"] if kd else None
    results = {"rows": rows, "seeds": seeds, "quick": quick, "overrides": overrides or [],
               "machine": machine_info(), "command": " ".join(sys.argv)}
    table = format_table(results)
    atomic_write_text(out / "results.md", table + "\n")
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    report = write_report(folders, out / "report", labels=labels, title="kdkit method benchmark (Fashion-MNIST)",
                          preamble=f"<pre>{table}</pre>")
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


def _row(method: str, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    best = mean_std([s["best_top1"] for s in summaries])
    last = mean_std([s["last_top1"] for s in summaries])
    first = summaries[0]
    recipe = load_recipe(find_recipe(f"{SUITE}/{method}"))
    cost = deployed_cost(first, recipe)
    latencies = [s["latency_ms"] for s in summaries if s.get("latency_ms") is not None]
    row = {
        "method": method, "description": recipe.description, "seeds": len(summaries),
        "best_top1": best[0], "best_top1_std": best[1], "last_top1": last[0], "last_top1_std": last[1],
        "epoch_seconds": sum(s["epoch_seconds"] for s in summaries) / len(summaries),
        "extra_params": first["bridge_params"] + first.get("loss_params", 0),
        # student + bridges + loss heads; the deployed network may be smaller (a deploying bridge skips the classifier)
        "trained_params": first["params"] + first["bridge_params"] + first.get("loss_params", 0),
        "deployed_params": cost["params"], "deployed_flops": cost["flops"],
        # the median over seeds of each run's deployed latency
        "latency_ms": sorted(latencies)[len(latencies) // 2] if latencies else cost["latency_ms"],
        "epochs": first["epochs"], "train_samples": first["train_samples"],
    }
    row["methods"] = [m.name for m in active_methods(recipe)]
    for method in active_methods(recipe):
        row.update(method.bench_fields(summaries))
    return row


def format_table(results: dict[str, Any]) -> str:
    """Markdown table of the benchmark (what the README shows)."""
    lines = ["| method | best top-1 (%) | last top-1 (%) | vs labels only | vs KD | s / epoch | trained params "
             "| deployed params | deployed MFLOPs | latency (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    delta = lambda v: "–" if v is None else f"{v:+.2f}"  # noqa: E731
    for r in results["rows"]:
        flops = "–" if r.get("deployed_flops") is None else f"{r['deployed_flops'] / 1e6:.2f}"
        latency = "–" if r.get("latency_ms") is None else f"{r['latency_ms']:.2f}"
        deployed = r.get("deployed_params")
        lines.append(f"| {r['method']} | {r['best_top1']:.2f} ± {r['best_top1_std']:.2f} | {r['last_top1']:.2f} ± "
                     f"{r['last_top1_std']:.2f} | {delta(r['vs_labels_only'])} | {delta(r['vs_kd'])} | "
                     f"{r['epoch_seconds']:.2f} | {r['trained_params']:,} | "
                     f"{'–' if deployed is None else f'{deployed:,}'} | {flops} | {latency} |")
    for r in results["rows"]:
        for name in r.get("methods", []):
            notes = METHODS.get(name).bench_notes(r)
            lines += ["", *notes] if notes else []
    m = results["machine"]
    first = results["rows"][0]
    lines += ["", f"{results['seeds']} seeds per method; student cnn_student on {first['train_samples']:,} "
              f"Fashion-MNIST images for {first['epochs']} epochs, teacher cnn_teacher on all 60,000.",
              f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
              f"python {m['python']}. Command: `{results['command']}`"]
    return "\n".join(lines)
