"""Reports: learning curves and comparisons of run folders, as PNG plots and one HTML page.

``kdkit report RUN [RUN ...]`` groups runs by recipe name (seeds of one recipe are pooled into
mean +- std) and writes ``curves.png``, ``comparison.png`` and ``report.html`` (images embedded, so
the page is one self-contained file).
"""

from __future__ import annotations

import html
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdkit.checkpoint import atomic_write_text
from kdkit.errors import KdkitError
from kdkit.pages import embed_png


@dataclass
class RunRecord:
    """A finished run folder: its summary and per-epoch metrics."""

    path: Path
    label: str
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]


def load_run(path: Path, label: str | None = None) -> RunRecord:
    """Read a run folder (``summary.json`` and ``metrics.json``)."""
    summary_file, metrics_file = path / "summary.json", path / "metrics.json"
    if not metrics_file.is_file():
        raise KdkitError(f"{str(path)!r} is not a kdkit run folder (no metrics.json)",
                         fix="pass folders written by `kdkit run` (see output.dir in the recipe)")
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {"name": path.name}
    return RunRecord(path, label or summary.get("name", path.name), summary, json.loads(metrics_file.read_text()))


def run_metric(run: RunRecord) -> str:
    """The metric that picked the run's best epoch (its task's; runs from before tasks existed: top1)."""
    return str(run.summary.get("metric", "top1"))


def best_of(run: RunRecord) -> float:
    """The run's best value of its metric (from the summary, else from its epochs)."""
    metric = run_metric(run)
    return float(run.summary.get(f"best_{metric}", max(m[f"test_{metric}"] for m in run.metrics)))


def metric_label(groups: dict[str, list[RunRecord]]) -> str:
    """The metric name(s) of the groups' runs, for axis labels and table headers."""
    return " / ".join(dict.fromkeys(run_metric(r) for runs in groups.values() for r in runs))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def group_runs(runs: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Runs grouped by label, in first-seen order."""
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    return groups


def plot_curves(groups: dict[str, list[RunRecord]], file: Path) -> Path:
    """Each run's test metric and training loss per epoch, one colour per group (seeds as thin lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, runs) in enumerate(groups.items()):
        colour = f"C{i}"
        for j, run in enumerate(runs):
            epochs = [row["epoch"] for row in run.metrics]
            values = [row[f"test_{run_metric(run)}"] for row in run.metrics]
            ax_acc.plot(epochs, values, color=colour, lw=1.2, alpha=0.85, label=label if j == 0 else None)
            ax_loss.plot(epochs, [row["train_loss"] for row in run.metrics], color=colour, lw=1.2, alpha=0.85,
                         label=label if j == 0 else None)
    ax_acc.set(xlabel="epoch", ylabel=f"test {metric_label(groups)}", title="test metric")
    ax_loss.set(xlabel="epoch", ylabel="training loss (objective)", title="training loss", yscale="log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)
    return file


def plot_comparison(groups: dict[str, list[RunRecord]], file: Path) -> Path:
    """Best and last test metric per group (mean +- std over seeds), with parameter counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(groups)
    best = [mean_std([best_of(r) for r in groups[k]]) for k in labels]
    last = [mean_std([r.metrics[-1][f"test_{run_metric(r)}"] for r in groups[k]]) for k in labels]
    xs = range(len(labels))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(labels) + 2), 4))
    width = 0.38
    ax.bar([x - width / 2 for x in xs], [b[0] for b in best], width, yerr=[b[1] for b in best], capsize=4,
           label="best epoch")
    ax.bar([x + width / 2 for x in xs], [v[0] for v in last], width, yerr=[v[1] for v in last], capsize=4,
           label="last epoch")
    low = min(min(b[0] - b[1] for b in best), min(v[0] - v[1] for v in last))
    ax.set_ylim(max(0.0, low - 3), min(100.0, max(b[0] + b[1] for b in best) + 2))
    names = []
    for k in labels:
        params = groups[k][0].summary.get("params")
        names.append(f"{k}\n{params / 1000:.1f}k params" if params else k)
    ax.set_xticks(list(xs), names, fontsize=8)
    ax.set_ylabel(f"test {metric_label(groups)}")
    seeds = ", ".join(str(len(groups[k])) for k in labels)
    ax.set_title(f"{metric_label(groups)} (mean ± std over seeds; n = {seeds})")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)
    return file


def summary_rows(groups: dict[str, list[RunRecord]]) -> list[dict[str, Any]]:
    """One row per group: its metric's best and last value (mean/std over seeds), size, latency, seeds."""
    rows = []
    for label, runs in groups.items():
        best = mean_std([best_of(r) for r in runs])
        last = mean_std([r.metrics[-1][f"test_{run_metric(r)}"] for r in runs])
        first = runs[0].summary
        latency = [r.summary["latency_ms"] for r in runs if r.summary.get("latency_ms") is not None]
        rows.append({
            "label": label, "arch": first.get("arch"), "seeds": [r.summary.get("seed") for r in runs],
            "metric": run_metric(runs[0]), "best": best[0], "best_std": best[1], "last": last[0],
            "last_std": last[1], "params": first.get("params"),
            "latency_ms": statistics.median(latency) if latency else None,
            "train_samples": first.get("train_samples"), "epochs": first.get("epochs"),
            "train_seconds": statistics.fmean(r.summary.get("train_seconds", 0.0) for r in runs),
        })
    return rows


def _html_table(rows: list[dict[str, Any]]) -> str:
    head = ("<tr><th>run</th><th>arch</th><th>params</th><th>latency / image</th><th>train images</th>"
            "<th>epochs</th><th>metric</th><th>best</th><th>last</th><th>seeds</th><th>train time</th></tr>")
    body = []
    for r in rows:
        latency = f"{r['latency_ms']:.3f} ms" if r["latency_ms"] is not None else "–"
        body.append(
            f"<tr><td>{html.escape(str(r['label']))}</td><td>{html.escape(str(r['arch']))}</td>"
            f"<td>{r['params']:,}</td><td>{latency}</td><td>{r['train_samples']:,}</td><td>{r['epochs']}</td>"
            f"<td>{html.escape(r['metric'])}</td><td>{r['best']:.2f} ± {r['best_std']:.2f}</td><td>{r['last']:.2f} ± "
            f"{r['last_std']:.2f}</td><td>{len(r['seeds'])}</td><td>{r['train_seconds']:.0f} s</td></tr>")
    return "<table>" + head + "".join(body) + "</table>"


def method_sections(groups: dict[str, list[RunRecord]]) -> str:
    """Each registered method's section of the report, from the first run of each group."""
    from kdkit.method import METHODS

    parts = []
    for label, records in groups.items():
        first = records[0]
        for _, method in METHODS.items():
            parts.append(method.report_section(label, first.summary, first.path))
    parts = [p for p in parts if p]
    return "<h2>Method details</h2>" + "".join(parts) if parts else ""


def write_report(runs: list[Path], out: Path | None = None, *, labels: list[str] | None = None,
                 title: str = "kdkit report", preamble: str = "") -> Path:
    """Write ``report.html`` with plots and a table comparing run folders.

    Args:
        runs: Run folders.
        out: Output folder (default ``report/`` beside the first run).
        labels: Group label of each run (default: its recipe name); runs sharing a label are seeds.
        title: Page title.
        preamble: Extra HTML placed before the table (e.g. the demo's verdict), already escaped.

    Returns:
        The HTML file.
    """
    if not runs:
        raise KdkitError("no run folders given", fix="kdkit report runs/NAME [runs/OTHER ...]")
    records = [load_run(p, labels[i] if labels else None) for i, p in enumerate(runs)]
    out = out or runs[0].parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(records)
    curves = plot_curves(groups, out / "curves.png")
    comparison = plot_comparison(groups, out / "comparison.png")
    rows = summary_rows(groups)
    atomic_write_text(out / "summary.json", json.dumps(rows, indent=1))
    machine = records[0].summary.get("machine", {})
    machine_line = ", ".join(f"{k} {v}" for k, v in machine.items())
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:right}th{background:#f4f4f4}td:first-child,td:nth-child(2){text-align:left}"
             "img{max-width:100%}code{background:#f4f4f4;padding:1px 4px}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{preamble}"
            f"{_html_table(rows)}<h2>Learning curves</h2>{embed_png(curves)}<h2>Comparison</h2>{embed_png(comparison)}"
            f"{method_sections(groups)}<h2>Provenance</h2><p>Machine: {html.escape(machine_line)}</p><ul>"
            + "".join(f"<li><code>{html.escape(str(r.path))}</code>: {html.escape(r.summary.get('data_source', ''))}"
                      f"; command <code>{html.escape(r.summary.get('command', ''))}</code></li>" for r in records)
            + "</ul></body></html>")
    file = out / "report.html"
    atomic_write_text(file, page)
    return file
