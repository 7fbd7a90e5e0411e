"""What a sweep writes to its output folder, after every trial: ``sweep.json`` (every trial and the best),
``best.yaml`` (the winner as an ordinary recipe evaluated on the test split), ``report.md`` and ``value.png``."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import yaml

from kdkit.checkpoint import atomic_write_text


def trial_row(t: Any) -> dict[str, Any]:
    """What every trial loop records of a trial ``t``: number, state, value, run folder, seconds, resume count,
    error and finishing time (sweep and search add their own fields)."""
    wall = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start \
        else None
    return {"number": t.number, "state": t.state.name, "value": t.value, "run_dir": t.user_attrs.get("run_dir"),
            "train_seconds": t.user_attrs.get("train_seconds"),
            "wall_seconds": None if wall is None else round(wall, 2), "resumed": t.user_attrs.get("resumed", 0),
            "error": t.user_attrs.get("error"),
            "finished": t.datetime_complete.isoformat() if t.datetime_complete else None}


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """Every trial of ``study``: :func:`trial_row` plus its params and BOSS sources."""
    return [{**trial_row(t), "params": dict(t.params), "boss": t.user_attrs.get("boss")}
            for t in study.get_trials(deepcopy=False)]


def best_row(rows: list[dict[str, Any]], direction: str) -> dict[str, Any] | None:
    """The finished trial with the best value (the earliest among equals)."""
    done = [r for r in rows if r["state"] == "COMPLETE"]
    if not done:
        return None
    sign = -1 if direction == "maximize" else 1
    return min(done, key=lambda r: (sign * r["value"], r["number"]))


def best_recipe(trial_data: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The winning trial's recipe made an ordinary run: the base recipe's name (``_best``), output folder, progress,
    best metric and data split back (so ``kdkit run best.yaml`` evaluates on the test split)."""
    data = copy.deepcopy(trial_data)
    data["name"] = f"{base['name']}_best"
    data["output"] = copy.deepcopy(base["output"])
    data["data"].pop("validation", None)
    if "validation" in base["data"]:
        data["data"]["validation"] = copy.deepcopy(base["data"]["validation"])
    data["train"].pop("best_metric", None)
    if "best_metric" in base["train"]:
        data["train"]["best_metric"] = base["train"]["best_metric"]
    return data


def write_outputs(out: Path, header: dict[str, Any], study: Any, base: dict[str, Any]) -> dict[str, Any]:
    """Write ``sweep.json``, ``best.yaml`` (once a trial finished), ``report.md`` and ``value.png``; return the
    content of ``sweep.json``."""
    rows = trial_rows(study)
    best = best_row(rows, header["direction"])
    result = {**header, "complete": sum(r["state"] == "COMPLETE" for r in rows), "trials": rows, "best": best,
              "best_recipe": None}
    if best is not None:
        trial = study.trials[best["number"]]
        recipe = best_recipe(trial.user_attrs["recipe"], base)
        atomic_write_text(out / "best.yaml", f"# The best trial ({best['number']}) of sweep {header['study']!r} "
                          f"({header['objective']} {best['value']:.4g} on the validation split), evaluated on the "
                          f"test split: kdkit run {out / 'best.yaml'}\n" + yaml.safe_dump(recipe, sort_keys=False))
        result["best_recipe"] = str(out / "best.yaml")
    atomic_write_text(out / "sweep.json", json.dumps(result, indent=1))
    plotted = plot_values(out / "value.png", rows, header["objective"], header["direction"])
    atomic_write_text(out / "report.md", _report(result, plotted))
    return result


def plot_values(path: Path, rows: list[dict[str, Any]], objective: str, direction: str) -> bool:
    """Plot the value of each finished trial, in finishing order, and the best so far, to ``path`` (atomically);
    False when no trial finished."""
    done = sorted((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: r["finished"])
    if not done:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [r["value"] for r in done]
    pick = max if direction == "maximize" else min
    running = [pick(values[:i + 1]) for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(values) + 1), values, "o", label="trial")
    ax.step(range(1, len(values) + 1), running, where="post", label="best so far")
    ax.set_xlabel("finished trials")
    ax.set_ylabel(f"validation {objective}")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def _report(result: dict[str, Any], plotted: bool) -> str:
    keys = list(dict.fromkeys(k for r in result["trials"] for k in r["params"]))
    lines = [f"# Sweep {result['study']}", "",
             f"Recipe `{result['recipe']}`, {result['mode']} mode, sampler {result['sampler']}, "
             f"{result['direction']} validation {result['objective']} (a {result['validation']:.0%} class-balanced "
             f"split of the training set, seed {result['seed']}; the test split is never read by a trial). "
             f"{result['complete']}/{result['budget']} trials finished.", ""]
    best = result["best"]
    if best is not None:
        lines += [f"Best: trial {best['number']}, {result['objective']} {best['value']:.4f}, "
                  f"{best['params']}. Winner as a recipe (test split): `kdkit run {result['best_recipe']}`.", ""]
    lines += ["| trial | state | " + " | ".join(keys) + f" | {result['objective']} | train s | BOSS from |",
              "|---:|---|" + "---:|" * len(keys) + "---:|---:|---|"]
    for r in result["trials"]:
        cells = [_cell(r["params"].get(k)) for k in keys]
        boss = r["boss"] or {}
        source = f"init {boss.get('init')}, teachers {boss.get('teachers')}" if boss else ""
        lines.append(f"| {r['number']} | {r['state']} | " + " | ".join(cells) +
                     f" | {_cell(r['value'])} | {_cell(r['train_seconds'])} | {source} |")
    total = sum(r["train_seconds"] or 0 for r in result["trials"])
    lines += ["", f"Training time over all trials: {total:.1f} s."]
    if plotted:
        lines += ["", "![validation value per finished trial](value.png)"]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
