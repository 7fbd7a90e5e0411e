"""What a search writes after every trial: ``search.json`` (every trial, the best, the cost), ``best.yaml`` (the
winner as an ordinary recipe on the test split with the base recipe's epochs), ``report.md`` (the best distillers as
formulas, the explored tree or population, cost per trial and in total) and ``reward.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from kdkit.cache import read_manifest
from kdkit.checkpoint import atomic_write_text
from kdkit.grammar.space import BoundSpace
from kdkit.search.actions import Decisions, candidate_of
from kdkit.search.strategies import Tree, Tried
from kdkit.sweep.output import best_recipe, plot_values, trial_row

#: Best distillers listed in the report.
SHOWN = 10


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """Every trial: :func:`~kdkit.sweep.output.trial_row` plus its distiller (formula, core indices, weights)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        candidate = t.user_attrs.get("candidate") or {}
        rows.append({**trial_row(t), "formula": candidate.get("formula"), "cores": candidate.get("cores"),
                     "weights": candidate.get("weights")})
    return rows


def cost(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds per trial and in total, and the teacher's work: the distinct caches the trials read (one for a
    search whose trials share the teacher cache) with their teacher forwards (views x images) and build time."""
    seconds = [r["wall_seconds"] for r in rows if r["state"] == "COMPLETE" and r["wall_seconds"] is not None]
    caches: dict[str, dict[str, Any]] = {}
    for r in rows:
        summary = Path(r["run_dir"] or "", "summary.json")
        if r["state"] == "COMPLETE" and summary.is_file():
            info = json.loads(summary.read_text()).get("teacher_cache")
            if info is not None and info["key"] not in caches:
                manifest = read_manifest(Path(info["dir"]))
                views, images = manifest["views"], manifest["data"]["num_samples"]
                caches[info["key"]] = {"dir": info["dir"], "views": views, "images": images,
                                       "build_seconds": info["build_seconds"], "teacher_forwards": views * images,
                                       "megabytes": info["megabytes"]}
    return {"trials": len(seconds), "seconds_total": round(sum(seconds), 1),
            "seconds_per_trial": round(sum(seconds) / len(seconds), 1) if seconds else None,
            "teacher_caches": list(caches.values()),
            "teacher_forwards": sum(c["teacher_forwards"] for c in caches.values())}


def write_outputs(out: Path, header: dict[str, Any], study: Any, base: dict[str, Any],
                  space: BoundSpace) -> dict[str, Any]:
    """Write ``search.json``, ``best.yaml`` (once a trial finished), ``report.md`` and ``reward.png``; return the
    content of ``search.json``."""
    rows = trial_rows(study)
    done = [r for r in rows if r["state"] == "COMPLETE"]
    ranked = sorted(done, key=lambda r: (-r["value"], r["number"]))
    best = ranked[0] if ranked else None
    result = {**header, "complete": len(done), "trials": rows, "best": best, "best_recipe": None,
              "cost": cost(rows)}
    if best is not None:
        recipe = best_recipe(study.trials[best["number"]].user_attrs["recipe"], base)
        recipe["train"]["epochs"] = base["train"]["epochs"]  # the proxy's schedule was for scoring only
        recipe["train"]["schedule"] = base["train"]["schedule"]
        recipe["teacher"] = base["teacher"]  # the proxy's short teacher cache neither (the base's own, if any)
        recipe["description"] = f"distiller found by {header['strategy']} search: {best['formula']}"
        atomic_write_text(out / "best.yaml", f"# The best distiller ({best['formula']}) of search {header['study']!r}"
                          f" (trial {best['number']}, validation {header['objective']} {best['value']:.4g} after "
                          f"{header['proxy']['epochs']} proxy epochs), as a recipe on the test split with the base "
                          f"recipe's epochs: kdkit run {out / 'best.yaml'}\n" + yaml.safe_dump(recipe, sort_keys=False))
        result["best_recipe"] = str(out / "best.yaml")
    atomic_write_text(out / "search.json", json.dumps(result, indent=1))
    plotted = plot_values(out / "reward.png", rows, header["objective"], "maximize")
    atomic_write_text(out / "report.md", _report(result, ranked, plotted, explored(rows, space, header)))
    return result


def explored(rows: list[dict[str, Any]], space: BoundSpace, header: dict[str, Any]) -> list[str]:
    """Markdown lines on what the strategy explored: for MCTS the visits and mean normalised reward of the first
    decisions (number of terms, then the first term's tap pair and first transform); for the others, how often
    each component appears among the finished trials with its mean reward."""
    decisions = Decisions(space)
    history = [Tried(candidate_of(r, space), r["value"] if r["state"] == "COMPLETE" else None)
               for r in rows if r["cores"] is not None and r["state"] in ("COMPLETE", "FAIL")]
    if not history:
        return []
    tree = Tree(history, decisions)
    lines = ["| decision path (first levels) | visits | mean normalised reward |", "|---|---:|---:|"]
    depth = 3 if header["strategy"] == "mcts" else 2
    for path in sorted((p for p in tree.visits if 0 < len(p) <= depth), key=lambda p: (-tree.visits[p], p))[:24]:
        lines.append(f"| {' → '.join(path)} | {tree.visits[path]} | {tree.total[path] / tree.visits[path]:.2f} |")
    return lines


def _report(result: dict[str, Any], ranked: list[dict[str, Any]], plotted: bool, tree: list[str]) -> str:
    c = result["cost"]
    lines = [f"# Search {result['study']}", "",
             f"Space `{result['space']}` over recipe `{result['recipe']}`: {result['cores']} valid terms, "
             f"{result['space_size']:,} distillers. Strategy {result['strategy']}, seed {result['seed']}. Each "
             f"candidate is scored by validation {result['objective']} after {result['proxy']['epochs']} proxy "
             f"epochs (a {result['proxy']['validation']:.0%} class-balanced split of the training set; the test "
             f"split is never read by a trial). {result['complete']}/{result['budget']} trials finished.", ""]
    if ranked:
        lines += [f"Winner as a recipe (test split, the base recipe's epochs): `kdkit run {result['best_recipe']}`.",
                  "", "| rank | trial | distiller | validation | proxy s |", "|---:|---:|---|---:|---:|"]
        for i, r in enumerate(ranked[:SHOWN], 1):
            lines.append(f"| {i} | {r['number']} | {r['formula']} | {r['value']:.4f} | {r['wall_seconds']} |")
    failed = [r for r in result["trials"] if r["state"] == "FAIL"]
    if failed:
        lines += ["", f"{len(failed)} candidate(s) rejected:", ""]
        lines += [f"- trial {r['number']}: {r['formula']}: {(r['error'] or '').splitlines()[0][:200]}" for r in failed]
    lines += ["", "## Cost", "",
              f"{c['trials']} finished proxy trials, {c['seconds_total']} s in total, {c['seconds_per_trial']} s per "
              f"trial (wall clock, teacher cache build included in the first)."]
    for cache in c["teacher_caches"]:
        lines.append(f"Teacher cache `{cache['dir']}`: {cache['views']} views x {cache['images']} images = "
                     f"{cache['teacher_forwards']:,} teacher forwards (built once in {cache['build_seconds']} s, "
                     f"{cache['megabytes']} MiB).")
    if tree:
        lines += ["", "## Explored", "", *tree]
    if plotted:
        lines += ["", "![validation reward per finished trial](reward.png)"]
    return "\n".join(lines) + "\n"
