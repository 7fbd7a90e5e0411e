"""The README's promises: its library example runs, CI runs its test command, its table is current."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from kdkit.cli import build_parser
from kdkit.demo import BUDGETS, format_table
from kdkit.models import build_model, count_parameters
from kdkit.recipe import find_recipe, load_recipe
from kdkit.report import mean_std

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.mark.slow
def test_library_example_runs_seeded_from_a_trained_teacher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    block = README.split("## Library", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md#library", "exec"), {})
    printed = capsys.readouterr().out
    figures = re.search(r"teacher ([\d.]+)%, student best top1 ([\d.]+)%", printed)
    assert figures is not None and "'hint'" in printed
    # seeded: a second run prints the same figures, and the trained teacher is far above chance (10 %)
    exec(compile(code, "README.md#library", "exec"), {})
    assert re.search(r"teacher [\d.]+%, student best top1 [\d.]+%", capsys.readouterr().out).group(0) == \
        figures.group(0)
    assert float(figures.group(1)) > 80 and float(figures.group(2)) > 50


def test_ci_runs_exactly_the_readme_test_command() -> None:
    commands = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    test_command = [line for line in commands.splitlines() if line and not line.startswith("#")][1]
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def parse_demo_table(table: str) -> dict[str, Any]:
    """The demo's ``results`` (what :func:`kdkit.demo.format_table` formats) read back from its Markdown table."""
    def number(text: str) -> tuple[float, float]:
        mean, _, std = text.partition(" ± ")
        return float(mean), float(std or 0)

    rows = []
    for line in table.splitlines()[2:]:
        if not line.startswith("| "):
            break
        cells = (c.strip() for c in line.strip("|").split("|"))
        model, arch, params, latency, images, epochs, best, last, seeds = cells
        (best_m, best_s), (last_m, last_s) = number(best), number(last)
        rows.append({"model": model, "arch": arch, "params": int(params.replace(",", "")),
                     "latency_ms": float(latency.removesuffix(" ms")), "train_images": int(images.replace(",", "")),
                     "epochs": int(epochs), "seeds": int(seeds), "best_top1": best_m, "best_top1_std": best_s,
                     "last_top1": last_m, "last_top1_std": last_s})
    gains = [float(g) for g in re.search(r"per seed: (.*)", table).group(1).split(", ")]
    machine = re.search(r"Machine: (.*), (\d+) cores, torch (\S+) \((\d+) threads\), python (\S+); data: (.*)",
                        table)
    return {"rows": rows, "kd_gain_best": gains, "data": machine.group(6),
            "machine": {"cpu": machine.group(1), "cores": int(machine.group(2)), "torch": machine.group(3),
                        "torch_threads": int(machine.group(4)), "python": machine.group(5)}}


def test_results_table_is_the_demo_output() -> None:
    """The README's table is what `kdkit demo` prints for the demo as it is now: format_table's exact text, the
    networks, parameter counts, training images and epochs of the shipped recipes it runs, a row per seed count it
    runs by default, and numbers that agree (the gain line is the per-seed gains; their mean is the difference of
    the two students' means)."""
    block = README.split("<!-- results:begin -->", 1)[1].split("<!-- results:end -->", 1)[0]
    intro, table = block.strip().split("\n\n", 1)
    assert "`kdkit demo`" in intro  # the command that regenerates it is printed beside it
    results = parse_demo_table(table)
    assert format_table(results) == table.strip()
    assert results["data"].startswith("Fashion-MNIST")
    rows = {r["model"]: r for r in results["rows"]}
    assert list(rows) == ["teacher", "student (labels only)", "student + KD"]
    seeds = build_parser().parse_args(["demo"]).seeds
    for label, name, budget in (("teacher", "teacher", "teacher"), ("student (labels only)", "student_ce", "student"),
                                ("student + KD", "kd", "student")):
        recipe = load_recipe(find_recipe(f"fashion_mnist/{name}"), BUDGETS["fashion_mnist"][budget])
        row = rows[label]
        model = build_model(recipe.model.arch, num_classes=10, in_channels=1, image_size=28, params=recipe.model.params)
        assert (row["arch"], row["params"], row["epochs"]) == (recipe.model.arch, count_parameters(model),
                                                               recipe.train.epochs), label
        assert row["train_images"] == (recipe.data.subset or 60_000), label  # Fashion-MNIST's 60,000 by default
        assert row["seeds"] == (1 if label == "teacher" else seeds), label
    assert len(results["kd_gain_best"]) == seeds
    difference = rows["student + KD"]["best_top1"] - rows["student (labels only)"]["best_top1"]
    assert mean_std(results["kd_gain_best"])[0] == pytest.approx(difference, abs=0.011)  # both rounded to 0.01
