"""Reports: learning curves and comparisons of run folders, as PNG plots and one HTML page.

``kdkit report RUN [RUN ...]`` groups runs that differ only in their seed -- the same label (default: the
recipe name), the same resolved recipe less :data:`NOT_RESULT_KEYS`, the same number of processes (DDP
changes the effective batch) -- and pools each group's seeds into mean +- std. Groups that share a name are
told apart by what differs (``kd (train.epochs=10)``). It writes ``curves.png``, ``comparison.png`` and
``report.html`` (images embedded, so the page is one self-contained file). Each group keeps one colour in
every plot. Callers add sections (``sections``): ``kdkit report`` and ``kdkit bench methods`` add the deployed
networks' predictions drawn over test images for tasks that draw them (:mod:`kdkit.export.gallery`).
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from kdkit.checkpoint import atomic_write_text
from kdkit.errors import KdkitError
from kdkit.pages import embed_png, html_table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Recipe keys (dotted; a trailing ``.`` covers a section) that do not change a run's results: its names, the
#: seed (what a group pools over), where and how it writes, its CPU thread count.
NOT_RESULT_KEYS = ("name", "description", "train.seed", "train.threads", "output.")
#: Keys that tell groups of one name apart, shown in the label; more than this many get the group's digest.
SHOWN_DIFFERENCES = 3
#: What every latency in a report is (the runner measures it so: ``summary["latency_ms"]``).
LATENCY_MEANING = "deployed network, batch 1"


@dataclass
class RunRecord:
    """A finished run folder: its summary, per-epoch metrics and what its results depend on.

    Attributes:
        config: What its results depend on besides the seed (:func:`result_config`).
    """

    path: Path
    label: str
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)


def load_run(path: Path, label: str | None = None) -> RunRecord:
    """Read a run folder (``summary.json``, ``metrics.json`` and ``recipe.yaml``)."""
    summary_file, metrics_file = path / "summary.json", path / "metrics.json"
    if not metrics_file.is_file():
        raise KdkitError(f"{str(path)!r} is not a kdkit run folder (no metrics.json)",
                         fix="pass folders written by `kdkit run` (see output.dir in the recipe)")
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {"name": path.name}
    return RunRecord(path, label or summary.get("name", path.name), summary, json.loads(metrics_file.read_text()),
                     result_config(path, summary))


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as ``{"a.b.0.c": leaf}`` (an empty dict or list is a leaf)."""
    if isinstance(data, dict) and data:
        items = data.items()
    elif isinstance(data, list) and data:
        items = ((str(i), v) for i, v in enumerate(data))
    else:
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def result_config(path: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """What a run's results depend on besides its seed: its flattened ``recipe.yaml`` (when the folder has one)
    less :data:`NOT_RESULT_KEYS`, with ``train.amp`` the precision the run used (``auto`` resolved, from its
    summary), and its number of processes (``world_size``)."""
    recipe_file = path / "recipe.yaml"
    flat = flatten(yaml.safe_load(recipe_file.read_text()) or {}) if recipe_file.is_file() else {}
    config = {k: v for k, v in flat.items()
              if not any(k == skip or (skip.endswith(".") and k.startswith(skip)) for skip in NOT_RESULT_KEYS)}
    config["world_size"] = summary.get("world_size", 1)
    if "train.amp" in config and summary.get("amp"):  # `auto` trains what it picked on that machine
        config["train.amp"] = summary["amp"]["amp"]
    return config


def config_digest(config: dict[str, Any]) -> str:
    """A short hash of a :func:`result_config`."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_metric(run: RunRecord) -> str:
    """The metric that picked the run's best epoch (its task's; runs from before tasks existed: top1)."""
    return str(run.summary.get("metric", "top1"))


def best_of(run: RunRecord) -> float:
    """The run's best value of its metric (from the summary, else from its epochs)."""
    metric = run_metric(run)
    return float(run.summary.get(f"best_{metric}", max(m[f"test_{metric}"] for m in evaluated(run))))


def last_of(run: RunRecord) -> float:
    """The run's value of its metric at the last epoch."""
    return float(evaluated(run)[-1][f"test_{run_metric(run)}"])


def evaluated(run: RunRecord) -> list[dict[str, Any]]:
    """The run's epochs that were evaluated (all, unless the recipe sets ``train.eval_every``)."""
    return [row for row in run.metrics if f"test_{run_metric(run)}" in row]


def metric_label(groups: dict[str, list[RunRecord]]) -> str:
    """The metric name(s) of the groups' runs, for axis labels and table headers."""
    return " / ".join(dict.fromkeys(run_metric(r) for runs in groups.values() for r in runs))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def deployed_latency(summaries: Sequence[dict[str, Any]]) -> float | None:
    """A model's one latency (ms per image, :data:`LATENCY_MEANING`): the median over its runs of each run's
    measurement (``None`` when no run measured it)."""
    values = [s["latency_ms"] for s in summaries if s.get("latency_ms") is not None]
    return statistics.median(values) if values else None


def seeds_of(runs: Sequence[RunRecord]) -> list[Any]:
    """The training seeds of ``runs`` (``train.seed``), in order."""
    return [r.summary.get("seed") for r in runs]


def differences(configs: Sequence[dict[str, Any]]) -> list[str]:
    """The keys whose values are not the same in every one of ``configs``, in first-seen order."""
    keys = dict.fromkeys(k for c in configs for k in c)
    missing = object()
    return [k for k in keys if len({json.dumps(c.get(k, missing), default=repr) for c in configs}) > 1]


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def group_runs(runs: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Runs that differ only in their seed, grouped in first-seen order, by their label; groups that share a
    label are labelled ``label (key=value, ...)`` with the keys whose values differ between them."""
    by_key: dict[tuple[str, str], list[RunRecord]] = {}
    for run in runs:
        by_key.setdefault((run.label, config_digest(run.config)), []).append(run)
    by_label: dict[str, list[tuple[str, str]]] = {}
    for key in by_key:
        by_label.setdefault(key[0], []).append(key)
    groups: dict[str, list[RunRecord]] = {}
    for (label, digest), members in by_key.items():
        siblings = by_label[label]
        if len(siblings) == 1:
            groups[label] = members
            continue
        config = members[0].config
        differ = differences([by_key[s][0].config for s in siblings])
        shown = [f"{k}={_value(config[k]) if k in config else '(unset)'}" for k in differ[:SHOWN_DIFFERENCES]]
        if len(differ) > SHOWN_DIFFERENCES:
            shown.append(f"+{len(differ) - SHOWN_DIFFERENCES} more, config {digest}")
        groups[f"{label} ({', '.join(shown)})"] = members
    return groups


def colours(groups: dict[str, list[RunRecord]]) -> dict[str, str]:
    """One colour per group, the same in every plot."""
    return {label: f"C{i % 10}" for i, label in enumerate(groups)}


def save_figure(fig: Figure, file: Path, dpi: int = 110) -> Path:
    """Save ``fig`` as the PNG ``file`` atomically (a temporary file beside it, then a rename) and close it."""
    import matplotlib.pyplot as plt

    tmp = file.with_name(f".{file.stem}.tmp-{os.getpid()}{file.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return file


def plot_curves(groups: dict[str, list[RunRecord]], file: Path) -> Path:
    """Each run's test metric and training loss per epoch, one colour per group (each seed a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colour = colours(groups)
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for label, runs in groups.items():
        for j, run in enumerate(runs):
            epochs = [row["epoch"] for row in evaluated(run)]
            values = [row[f"test_{run_metric(run)}"] for row in evaluated(run)]
            style = {"color": colour[label], "lw": 1.2, "alpha": 0.85, "label": label if j == 0 else None,
                     "marker": "o" if len(epochs) == 1 else None}  # one epoch is a point, not a line
            ax_acc.plot(epochs, values, **style)
            ax_loss.plot([row["epoch"] for row in run.metrics], [row["train_loss"] for row in run.metrics], **style)
    ax_acc.set(xlabel="epoch", ylabel=f"test {metric_label(groups)}", title="test metric")
    ax_loss.set(xlabel="epoch", ylabel="training loss (objective)", title="training loss", yscale="log")
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, file)


def bar_top(tops: Sequence[float]) -> float:
    """The upper limit of a bar axis that starts at 0: room above the highest bar, 100 for a percentage."""
    highest = max(tops)
    return min(100.0, highest * 1.1) if highest <= 100.0 else highest * 1.1


def plot_comparison(groups: dict[str, list[RunRecord]], file: Path) -> Path:
    """Best and last test metric per group (mean +- std over seeds) on an axis from 0, each group in its colour
    (best epoch solid, last epoch hatched), with parameter counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    labels = list(groups)
    colour = colours(groups)
    best = [mean_std([best_of(r) for r in groups[k]]) for k in labels]
    last = [mean_std([last_of(r) for r in groups[k]]) for k in labels]
    xs = range(len(labels))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(labels) + 2), 4))
    width = 0.38
    fills = [colour[k] for k in labels]
    solid = ax.bar([x - width / 2 for x in xs], [b[0] for b in best], width, yerr=[b[1] for b in best], capsize=4,
                   color=fills, edgecolor=fills)
    hatched = ax.bar([x + width / 2 for x in xs], [v[0] for v in last], width, yerr=[v[1] for v in last],
                     capsize=4, color="white", edgecolor=fills, hatch="///")
    for bars in (solid, hatched):
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_ylim(0.0, bar_top([m + s for m, s in (*best, *last)]))
    names = []
    for k in labels:
        params = groups[k][0].summary.get("params")
        names.append(f"{k}\n{params / 1000:.1f}k params" if params else k)
    ax.set_xticks(list(xs), names, fontsize=8)
    ax.set_ylabel(f"test {metric_label(groups)}")
    seeds = ", ".join(str(len(groups[k])) for k in labels)
    ax.set_title(f"{metric_label(groups)} (mean ± std over seeds; n = {seeds})")
    ax.legend(handles=[Patch(facecolor="grey", edgecolor="grey", label="best epoch"),
                       Patch(facecolor="white", edgecolor="grey", hatch="///", label="last epoch")], fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, file)


def summary_rows(groups: dict[str, list[RunRecord]]) -> list[dict[str, Any]]:
    """One row per group: its metric's best and last value (mean/std over seeds), size, latency, seeds."""
    rows = []
    for label, runs in groups.items():
        best = mean_std([best_of(r) for r in runs])
        last = mean_std([last_of(r) for r in runs])
        first = runs[0].summary
        rows.append({
            "label": label, "arch": first.get("arch"), "seeds": seeds_of(runs), "runs": [str(r.path) for r in runs],
            "metric": run_metric(runs[0]), "best": best[0], "best_std": best[1], "last": last[0],
            "last_std": last[1], "params": first.get("params"),
            "latency_ms": deployed_latency([r.summary for r in runs]),
            "train_samples": first.get("train_samples"), "epochs": first.get("epochs"),
            "world_size": first.get("world_size", 1),
            "train_seconds": statistics.fmean(r.summary.get("train_seconds", 0.0) for r in runs),
        })
    return rows


def _spread(mean: float, std: float, n: int) -> str:
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "–"


def rows_table(rows: list[dict[str, Any]]) -> str:
    """The groups' table (HTML): one row per group, one latency per model."""
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    shown = metrics[0] if len(metrics) == 1 else "metric"  # one metric: named in the header
    header = ["run", "arch", "params", f"latency / image ({LATENCY_MEANING})", "train images", "epochs",
              *(["metric"] if len(metrics) > 1 else []), f"best {shown}", f"last {shown}", "training seeds",
              "train time"]
    body = []
    for r in rows:
        n = len(r["seeds"])
        latency = f"{r['latency_ms']:.3f} ms" if r["latency_ms"] is not None else "–"
        body.append([str(r["label"]), str(r["arch"]), _count(r["params"]), latency, _count(r["train_samples"]),
                     str(r["epochs"]), *([r["metric"]] if len(metrics) > 1 else []),
                     _spread(r["best"], r["best_std"], n), _spread(r["last"], r["last_std"], n),
                     ", ".join(str(s) for s in r["seeds"]), f"{r['train_seconds']:.0f} s"])
    return html_table(header, body)


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


def provenance(groups: dict[str, list[RunRecord]]) -> str:
    """One item per group: the seeds it pools, its processes, data and command, and each run's folder."""
    items = []
    for label, runs in groups.items():
        first = runs[0].summary
        seeds = ", ".join(str(s) for s in seeds_of(runs))
        folders = ", ".join(f"<code>{html.escape(str(r.path))}</code> (seed {html.escape(str(r.summary.get('seed')))})"
                            for r in runs)
        commands = dict.fromkeys(r.summary.get("command", "") for r in runs)
        items.append(
            f"<li><b>{html.escape(label)}</b>: training seed{'s' if len(runs) > 1 else ''} {html.escape(seeds)} "
            f"({len(runs)} run{'s' if len(runs) > 1 else ''}, {first.get('world_size', 1)} process(es) each); "
            f"data: {html.escape(first.get('data_source', ''))}; runs: {folders}; command"
            f"{'s' if len(commands) > 1 else ''} "
            + ", ".join(f"<code>{html.escape(c)}</code>" for c in commands) + "</li>")
    return "<ul>" + "".join(items) + "</ul>"


#: A report's extra section: HTML (figures written into the output folder) from the groups and that folder.
Section = Callable[[dict[str, list[RunRecord]], Path], str]


def write_report(runs: list[Path], out: Path | None = None, *, labels: list[str] | None = None,
                 title: str = "kdkit report", preamble: str = "", table: str | None = None,
                 sections: Sequence[Section] = ()) -> Path:
    """Write ``report.html`` with plots and a table comparing run folders.

    Args:
        runs: Run folders.
        out: Output folder (default ``report/`` beside the first run).
        labels: Group label of each run (default: its recipe name); runs sharing a label and differing only in
            their seed are pooled.
        title: Page title.
        preamble: Extra HTML placed before the table (e.g. the demo's verdict), already escaped.
        table: The page's table (HTML) in place of the default one (:func:`rows_table`), e.g. a benchmark's.
        sections: Makers of extra sections placed after the comparison, e.g. the deployed networks' predictions
            drawn over test images (:func:`kdkit.export.gallery.predictions_section`, which reads the networks).

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
    extra = "".join(section(groups, out) for section in sections)
    machine = records[0].summary.get("machine", {})
    machine_line = ", ".join(f"{k} {v}" for k, v in machine.items())
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:right}th{background:#f4f4f4}td:first-child,td:nth-child(2){text-align:left}"
             "img{max-width:100%}code{background:#f4f4f4;padding:1px 4px}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{preamble}"
            f"{table if table is not None else rows_table(rows)}"
            f"<h2>Learning curves</h2>{embed_png(curves)}<h2>Comparison</h2>{embed_png(comparison)}"
            f"{extra}{method_sections(groups)}<h2>Provenance</h2><p>Machine: {html.escape(machine_line)}</p>"
            f"{provenance(groups)}</body></html>")
    file = out / "report.html"
    atomic_write_text(file, page)
    return file
