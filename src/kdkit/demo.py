"""The main job (``kdkit demo``): a real distillation, start to finish, in minutes on 2 CPU cores.

1. Train the CNN teacher on the whole training set (or reuse its finished run).
2. Train the CNN student on a small labelled subset from labels alone, and with Hinton KD from the
   teacher, for several seeds each (same subset, same budget).
3. Print a table (accuracy, parameters, latency, the gain KD brings) and write an HTML/PNG report.

Why a subset: with the full 60k labels this small student does not gain from KD in a short budget
(measured: 89.75 +- 0.37 with KD vs 90.07 +- 0.42 without, 5 epochs); where the student sees far fewer
labels than the teacher did, the teacher's soft labels carry knowledge the labels do not -- the
common real case of a large labelled pool for the teacher and a few labels for the deployed task.
"""

from __future__ import annotations

import html
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from kdkit.build import resolve_device
from kdkit.checkpoint import atomic_write_text
from kdkit.data import load_dataset
from kdkit.errors import KdkitError
from kdkit.export.source import open_run
from kdkit.hardware import choose_amp
from kdkit.parallel import Job, choose_jobs, run_jobs, threads_per_job
from kdkit.profile import latency_ms, machine_info
from kdkit.report import LATENCY_MEANING, deployed_latency, mean_std, write_report

# Budgets per dataset: overrides applied to the shipped recipes fashion_mnist/{teacher,student_ce,kd} ("kd": to the
# KD student's only). The Fashion-MNIST budget fits the whole demo, install included, in about 5 minutes on 2 cores:
# a 32k-parameter teacher (width 16: a quarter of the suite teacher's compute) for 2 epochs of all 60k images, and
# students for 20 epochs, evaluated every 5 (an evaluation of the 10k test images cost as much as an epoch of
# training on 3k), with evaluation batches of 256 (1.9x faster per image than 1000 on a CPU).
BUDGETS: dict[str, dict[str, list[str]]] = {
    "fashion_mnist": {
        "teacher": ["model.params.width=16", "train.epochs=2", "train.eval_batch_size=256"],
        "student": ["train.epochs=20", "train.eval_every=5", "train.eval_batch_size=256"],
        "kd": ["teacher.params.width=16"],
    },
    "digits": {
        "teacher": ["data.dataset=digits", "train.epochs=30", "train.batch_size=64", "data.augment.crop_padding=1"],
        "student": ["data.dataset=digits", "data.subset=150", "train.epochs=60", "train.batch_size=32",
                    "data.augment.crop_padding=1", "data.augment.hflip=false"],
        "kd": [],
    },
}
QUICK = {"teacher": ["train.epochs=1"], "student": ["train.epochs=2"]}


def choose_data(data: str, data_dir: str | None) -> tuple[str, str]:
    """Pick the dataset: Fashion-MNIST when its files are there, else digits -- saying so, never silently.

    A folder the user names (``--data-dir``) never falls back: without Fashion-MNIST there it is an error."""
    if data == "digits":
        if data_dir is not None:
            raise KdkitError("--data-dir names Fashion-MNIST's folder, but --data digits uses scikit-learn's "
                             "bundled digits", bad=data_dir, fix="drop --data-dir, or use --data fashion_mnist")
        return "digits", "scikit-learn's bundled digits (chosen with --data digits)"
    try:
        found = load_dataset("fashion_mnist", data_dir)
    except KdkitError as exc:
        if data == "fashion_mnist" or data_dir is not None:
            raise
        note = (f"Fashion-MNIST not found ({exc.message}); using scikit-learn's bundled digits instead. "
                "For the real demo: apt-get install dataset-fashion-mnist, or --data-dir DIR with the idx files.")
        print(f"note: {note}", file=sys.stderr)
        return "digits", note
    return "fashion_mnist", f"Fashion-MNIST from {found.source}"


def run_demo(out: Path, data: str = "auto", data_dir: str | None = None, seeds: int = 3, quick: bool = False,
             overwrite: bool = False, amp: str = "auto", jobs_requested: int | None = None) -> dict[str, Any]:
    """Run the demo and return its results (also written to ``out/results.json`` and ``out/report/``).

    Args:
        out: Output folder (one run folder per model and seed, plus the report).
        data: ``auto``, ``fashion_mnist`` or ``digits``.
        data_dir: Folder with the Fashion-MNIST idx files (default: the Debian package's location).
        seeds: Student seeds per method.
        quick: A tiny budget (smoke tests).
        overwrite: Retrain students even when finished runs of the same recipe exist.
        amp: ``train.amp`` of every run. ``auto`` is decided here, once, and the recipes get the mode it picks
            (``off`` or ``bf16``): where bf16 is not native their recipes are the shipped ones, digests included,
            so finished runs are reused.
        jobs_requested: Runs trained at once (``--jobs``; default: :func:`kdkit.parallel.choose_jobs`).
    """
    if seeds < 1:
        raise KdkitError(f"--seeds must be at least 1, got {seeds}", fix="use --seeds 2 or more for a mean ± std")
    dataset, data_note = choose_data(data, data_dir)
    budget = BUDGETS[dataset]
    root = [f"data.root={data_dir}"] if data_dir and dataset == "fashion_mnist" else []
    quick_t, quick_s = (QUICK["teacher"], QUICK["student"]) if quick else ([], [])
    precision = choose_amp(amp, resolve_device("auto"))
    shared = [*root, f"train.amp={precision.amp}"]  # every run's
    print(f"kdkit demo: {data_note}; output in {out}; {precision.describe()}")

    student_names = (("student (labels only)", "student_ce"), ("student + KD", "kd"))
    # the teacher first (it is the longest and the KD students wait for it), the labels-only students beside it
    jobs = [Job("teacher", "fashion_mnist/teacher", (*budget["teacher"], *shared, *quick_t,
                                                      f"output.dir={out}/teacher"))]
    for _, name in student_names:
        for seed in range(seeds):
            extra = (f"teacher.checkpoint={out}/teacher", "teacher.recipe=null", *budget["kd"]) if name == "kd" else ()
            jobs.append(Job(f"{name}_seed{seed}", f"fashion_mnist/{name}",
                            (*budget["student"], *shared, *quick_s, *extra, f"train.seed={seed}",
                             f"output.dir={out}/{name}_seed{seed}"),
                            after=("teacher",) if name == "kd" else (), overwrite=overwrite))
    workers = choose_jobs(jobs_requested, resolve_device("auto").type)
    if workers > 1:
        print(f"kdkit demo: {len(jobs)} runs, {workers} at a time ({threads_per_job(workers)} "
              "torch thread(s) each; --jobs 1 for one at a time)")
    summaries = run_jobs(jobs, workers, on_done=_announce)
    if workers > 1:  # each run timed its network while another run trained beside it: time them again, alone
        for job in jobs:
            summaries[job.key] = remeasure_latency(out / job.key)
    teacher_summary = summaries["teacher"]
    runs = {label: [summaries[f"{name}_seed{seed}"] for seed in range(seeds)] for label, name in student_names}
    folders = [out / job.key for job in jobs]  # each job's output.dir
    labels = ["teacher", *(label for label, _ in student_names for _ in range(seeds))]
    results = _results(teacher_summary, runs, data_note, seeds, quick)
    results["amp"] = precision.to_dict()
    table = format_table(results)
    print(table)
    # the table below is the report's own (rendered from the same runs); the Markdown one is for the terminal
    preamble = (f"<p>{html.escape(data_note)}.</p><p>{html.escape(results['verdict'])}</p>"
                f"<p>{html.escape(gain_line(results))}</p>"
                f"<p>Reproduce: <code>{html.escape(' '.join(sys.argv) or 'kdkit demo')}</code></p>")
    report = write_report(folders, out / "report", labels=labels, title="kdkit demo: Hinton KD on a labelled subset",
                          preamble=preamble)
    results["report"] = str(report)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out / "results.md", table + "\n")
    print(f"\n{results['verdict']}\nreport: {report}")
    return results


def remeasure_latency(folder: Path) -> dict[str, Any]:
    """Time a finished run's deployed network again (:func:`kdkit.profile.latency_ms`, this process's threads) and
    record it in its ``summary.json`` with ``latency_note``; return the updated summary."""
    run = open_run(folder)
    summary = dict(run.summary)
    latency = latency_ms(run.network, run.deployment.input_shape)
    summary["latency_ms"] = latency
    summary.setdefault("deployed", {})["latency_ms"] = latency
    summary["latency_note"] = "measured again after training, with no other run beside it"
    atomic_write_text(folder / "summary.json", json.dumps(summary, indent=1))
    return summary


def _announce(job: Job, summary: dict[str, Any], seconds: float) -> None:
    metric = summary.get("metric", "top1")
    print(f"kdkit demo: {job.key} done in {seconds:.0f} s: best {metric} {summary[f'best_{metric}']:.2f}, "
          f"last {summary[f'last_{metric}']:.2f}", flush=True)


def _results(teacher: dict[str, Any], runs: dict[str, list[dict[str, Any]]], data_note: str, seeds: int,
             quick: bool) -> dict[str, Any]:
    ce, kd = runs["student (labels only)"], runs["student + KD"]
    gains = [k["best_top1"] - c["best_top1"] for k, c in zip(kd, ce, strict=True)]
    gain_last = [k["last_top1"] - c["last_top1"] for k, c in zip(kd, ce, strict=True)]
    wins = sum(g > 0 for g in gains)
    mean_gain = statistics.fmean(gains)
    verdict = (f"KD {'beats' if mean_gain > 0 else 'does not beat'} the labels-only student: "
               f"{mean_gain:+.2f} points best top-1 ({statistics.fmean(gain_last):+.2f} last), "
               f"higher on {wins}/{len(gains)} seeds.")
    rows = [("teacher", [teacher]), *list(runs.items())]
    table_rows = []
    for label, summaries in rows:
        best = mean_std([s["best_top1"] for s in summaries])
        last = mean_std([s["last_top1"] for s in summaries])
        first = summaries[0]
        table_rows.append({
            "model": label, "arch": first["arch"], "params": first["params"],
            "latency_ms": deployed_latency(summaries),
            "train_images": first["train_samples"], "epochs": first["epochs"], "seeds": len(summaries),
            "best_top1": best[0], "best_top1_std": best[1], "last_top1": last[0], "last_top1_std": last[1],
        })
    return {"data": data_note, "seeds": seeds, "quick": quick, "rows": table_rows, "kd_gain_best": gains,
            "kd_gain_last": gain_last, "verdict": verdict, "machine": machine_info(),
            "command": " ".join(sys.argv)}


def gain_line(results: dict[str, Any]) -> str:
    """The KD gain over the labels-only student, paired by seed (best top-1)."""
    gains = results["kd_gain_best"]
    mean, std = mean_std(gains)
    return (f"KD gain (paired by seed, best top-1): {mean:+.2f} ± {std:.2f} points; per seed: "
            + ", ".join(f"{g:+.2f}" for g in gains))


def format_table(results: dict[str, Any]) -> str:
    """The results as a Markdown table (printed, saved to results.md, pasted into the README)."""
    lines = [f"| model | arch | params | latency / image ({LATENCY_MEANING}) | train images | epochs | "
             "best top-1 (%) | last top-1 (%) | seeds |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        spread = lambda m, s, n: f"{m:.2f} ± {s:.2f}" if n > 1 else f"{m:.2f}"  # noqa: E731
        lines.append(f"| {r['model']} | {r['arch']} | {r['params']:,} | {r['latency_ms']:.3f} ms | "
                     f"{r['train_images']:,} | {r['epochs']} | {spread(r['best_top1'], r['best_top1_std'], r['seeds'])}"
                     f" | {spread(r['last_top1'], r['last_top1_std'], r['seeds'])} | {r['seeds']} |")
    lines.append("")
    lines.append(gain_line(results))
    m = results["machine"]
    lines.append(f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
                 f"python {m['python']}; data: {results['data']}")
    return "\n".join(lines)
