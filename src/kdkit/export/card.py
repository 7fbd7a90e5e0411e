"""``model_card.md``: what an export is, what it costs, what it was trained on and how well it does.

Accuracy is the run's (its summary), with every seed of the same configuration when the run's sibling folders hold
them (grouped as ``kdkit report`` groups runs: same label and configuration, another seed).
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import yaml

from kdkit._version import __version__
from kdkit.errors import KdkitError
from kdkit.export.formats import ExportFormat
from kdkit.export.source import DeployedRun
from kdkit.export.verify import Verification
from kdkit.method import active_methods
from kdkit.profile import count_flops, machine_info, used_parameters
from kdkit.report import RunRecord, best_of, group_runs, last_of, load_run, mean_std


def seed_runs(folder: Path) -> list[RunRecord]:
    """The finished runs beside ``folder`` (its parent's sub-folders) that differ from it only in their seed,
    itself included, in seed order."""
    records = []
    for sibling in sorted(p for p in folder.parent.iterdir() if (p / "summary.json").is_file()):
        try:
            records.append(load_run(sibling))
        except (KdkitError, ValueError, OSError):  # not a run folder, or a damaged one: not a seed of this run
            continue
    for runs in group_runs(records).values():
        if any(r.path.resolve() == folder.resolve() for r in runs):
            return sorted(runs, key=lambda r: (r.summary.get("seed") is None, r.summary.get("seed")))
    return []


def _accuracy(run: DeployedRun) -> list[str]:
    """The accuracy section: this run, and its seeds when there are several."""
    summary = run.summary
    metric = summary.get("metric", "top1")
    lines = ["## Accuracy", "",
             f"Test split of {summary.get('dataset')} ({summary.get('test_samples')} images), metric {metric} "
             "(the epoch with the best value is the `best` checkpoint).", ""]
    seeds = seed_runs(run.folder)
    if len(seeds) > 1:
        best = mean_std([best_of(r) for r in seeds])
        lines += [f"Over {len(seeds)} seeds: best {metric} **{best[0]:.2f} ± {best[1]:.2f}** (mean ± sample std).", "",
                  f"| seed | best {metric} | best epoch | last {metric} | run folder |", "|---|---|---|---|---|"]
        lines += [f"| {r.summary.get('seed')} | {best_of(r):.2f} | {r.summary.get('best_epoch')} | {last_of(r):.2f} | "
                  f"`{r.path}`{' (this export)' if r.path.resolve() == run.folder.resolve() else ''} |" for r in seeds]
    else:
        lines.append(f"One seed ({summary.get('seed')}; no sibling run folder holds another).")
    which = f"best {metric} {summary.get(f'best_{metric}')} (epoch {summary.get('best_epoch')})" \
        if run.checkpoint.name.startswith("epoch_") and summary.get("best_epoch") is not None else ""
    lines += ["", f"This export's checkpoint: `{run.checkpoint.name}`"
              + (f"; the run's {which}, last epoch {summary.get(f'last_{metric}')}." if which else ".")]
    return lines


def _training(run: DeployedRun) -> list[str]:
    """Data, teacher, method and budget."""
    summary, recipe = run.summary, run.recipe
    data = run.deployment.dataset
    lines = ["## Training", "",
             f"- Data: `{data.get('name')}` ({data.get('source')}); {summary.get('train_samples')} training images, "
             f"{summary.get('test_samples')} test images.",
             f"- Teacher: {summary.get('teacher_arch') or 'none (trained from the labels)'}"
             + "".join(f"; {name}: " + (f"recipe `{spec.recipe}`" if spec.recipe else f"checkpoint `{spec.checkpoint}`")
                       for name, spec in recipe.frozen_teachers().items()) + "."]
    terms = [f"{t.loss} (weight {t.weight}" + (f", bridge {t.bridge}" if t.bridge else "") + ")"
             for t in recipe.distill]
    methods = [m.name for m in active_methods(recipe)]
    lines.append(f"- Method: {', '.join(terms) or 'supervised only'}; supervised loss weight {recipe.train.ce_weight}"
                 + (f"; methods: {', '.join(methods)}" if methods else "") + ".")
    lines.append(f"- Budget: {recipe.train.epochs} epochs, batch {recipe.train.batch_size}, optimiser "
                 f"{recipe.train.optimizer.name}, seed {recipe.train.seed}; {summary.get('train_seconds')} s of "
                 f"training on {summary.get('device')}.")
    return lines


def model_card(run: DeployedRun, fmt: ExportFormat, path: Path, metadata: dict[str, Any], verification: Verification,
               latency: dict[int, dict[str, float]], digest: str) -> str:
    """The model card of an export (Markdown)."""
    deployment, summary = run.deployment, run.summary
    shape = deployment.input_shape
    params = used_parameters(run.network, shape)
    flops = count_flops(run.network, shape)
    export = metadata["export"]
    details = ", ".join(filter(None, [f"opset {export['opset']}" if export.get("opset") else "",
                                      f"batch {export['batch']}" if export.get("batch") else
                                      ("any batch" if fmt.takes_dynamic_batch else "")]))
    runtime = {"onnx": "ONNX Runtime", "torchscript": "TorchScript", "safetensors": "PyTorch eager (rebuilt)"}
    times = "; ".join(f"batch {b}: PyTorch eager {t['eager']:.3f} ms, {runtime.get(fmt.name, fmt.name)} "
                      f"{t['export']:.3f} ms" for b, t in latency.items())
    machine = machine_info()
    classes = ", ".join(deployment.classes)
    lines = [
        f"# Model card: {summary.get('name')}", "",
        *([run.recipe.description, ""] if run.recipe.description else []),
        f"Exported by kdkit {__version__} on {datetime.date.today().isoformat()} from `{run.folder}` "
        f"(checkpoint `{run.checkpoint.name}`).", "",
        "| | |", "|---|---|",
        f"| File | `{path.name}` ({fmt.name}{', ' + details if details else ''}), SHA-256 `{digest}` |",
        f"| Network | {metadata['run']['network']} |",
        f"| Task | {deployment.task}: {deployment.output} |",
        f"| Input | {deployment.preprocessing()} |",
        f"| Classes ({len(deployment.classes)}) | {classes} |",
        f"| Parameters | {params:,} (the modules the deployed network runs) |",
        f"| FLOPs | {flops / 1e6:.3f} M per image (a multiply-add counts 2) |",
        f"| Latency | {times} (ms per image, median; {machine['cpu']}, {machine['torch_threads']} threads) |",
        f"| Verified | {verification.line()} (`{fmt.name}` runtime vs PyTorch) |", "",
        *_accuracy(run), "",
        *_training(run), "",
        "## Recipe", "", "```yaml", yaml.safe_dump(run.recipe.to_dict(), sort_keys=False).rstrip(), "```", "",
        f"kdkit {__version__}, torch {machine['torch']}, Python {machine['python']}.", "",
    ]
    return "\n".join(lines)
