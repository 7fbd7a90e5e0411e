"""What the report pools and how it shows it: groups by what differs besides the seed, one table, one latency per
model, one colour per model in every plot, bar axes from 0, the seeds each row pools."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from kdkit.report import group_runs, load_run, write_report


def fake_run(folder: Path, *, name: str = "kd", seed: int = 0, world_size: int = 1, best: float = 88.0,
             latency_ms: float = 0.5, **train: Any) -> Path:
    """A finished run folder: its ``recipe.yaml`` (name, ``train`` with the seed and ``train``, output), summary
    and two epochs of metrics."""
    folder.mkdir(parents=True)
    recipe = {"name": name, "model": {"arch": "cnn_student"},
              "train": {"epochs": 10, "batch_size": 64, "seed": seed, "threads": None, **train},
              "output": {"dir": str(folder), "progress": True}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    rows = [{"epoch": e, "test_top1": best - 2 + e, "train_loss": 1.0 / e} for e in (1, 2)]
    (folder / "metrics.json").write_text(json.dumps(rows))
    (folder / "summary.json").write_text(json.dumps({
        "name": name, "metric": "top1", "best_top1": best, "seed": seed, "world_size": world_size,
        "arch": "cnn_student", "params": 12050, "train_samples": 3000, "epochs": recipe["train"]["epochs"],
        "train_seconds": 60.0, "latency_ms": latency_ms, "command": "kdkit run kd.yaml",
        "data_source": "Fashion-MNIST (split seed 0)"}))
    return folder


def test_runs_are_pooled_only_when_they_differ_in_their_seed(tmp_path: Path) -> None:
    folders = [
        fake_run(tmp_path / "a0", seed=0), fake_run(tmp_path / "a1", seed=1, threads=2),  # threads: same results
        fake_run(tmp_path / "long", epochs=30, best=90.0),
        fake_run(tmp_path / "ddp", world_size=2),  # two processes: twice the effective batch
        fake_run(tmp_path / "ce", name="student_ce"),
    ]
    groups = group_runs([load_run(f) for f in folders])
    assert list(groups) == ["kd (train.epochs=10, world_size=1)", "kd (train.epochs=30, world_size=1)",
                            "kd (train.epochs=10, world_size=2)", "student_ce"]
    assert [[r.path.name for r in runs] for runs in groups.values()] == [["a0", "a1"], ["long"], ["ddp"], ["ce"]]
    page = write_report(folders, tmp_path / "report").read_text()
    assert "<td>kd (train.epochs=30, world_size=1)</td>" in page and "<td>0, 1</td>" in page


def test_runs_are_grouped_by_the_precision_they_used_not_the_one_they_asked_for(tmp_path: Path) -> None:
    def run(folder: str, seed: int, amp: str, used: str | None) -> Path:
        path = fake_run(tmp_path / folder, seed=seed, amp=amp)
        if used is not None:  # what a run of train.amp: auto stores: the mode it picked on its machine
            summary = json.loads((path / "summary.json").read_text())
            summary["amp"] = {"requested": amp, "amp": used, "reason": "auto: test"}
            (path / "summary.json").write_text(json.dumps(summary))
        return path

    folders = [run("off", 0, "off", None), run("auto_fp32", 1, "auto", "off"), run("auto_bf16", 2, "auto", "bf16")]
    groups = group_runs([load_run(f) for f in folders])
    assert [[r.path.name for r in runs] for runs in groups.values()] == [["off", "auto_fp32"], ["auto_bf16"]]
    assert list(groups)[1] == "kd (train.amp=bf16)"


def test_many_differences_are_cut_short_and_stay_distinct(tmp_path: Path) -> None:
    base = {"epochs": 10, "batch_size": 64, "lr": 0.1, "momentum": 0.9, "nesterov": False}
    other = {"epochs": 20, "batch_size": 32, "lr": 0.2, "momentum": 0.8, "nesterov": True}
    groups = group_runs([load_run(fake_run(tmp_path / "a", **base)), load_run(fake_run(tmp_path / "b", **other))])
    first, second = groups
    assert first.startswith("kd (train.epochs=10, train.batch_size=64, train.lr=0.1, +2 more, config ")
    assert second.startswith("kd (train.epochs=20, train.batch_size=32, train.lr=0.2, +2 more, config ")
    assert first[-9:] != second[-9:]  # the configs' digests tell them apart


def test_the_page_has_one_table_one_latency_per_model_and_the_seeds_it_pools(tmp_path: Path) -> None:
    folders = [fake_run(tmp_path / f"kd{s}", seed=s, latency_ms=latency)
               for s, latency in ((3, 1.0), (4, 3.0), (5, 2.5))]
    folders.append(fake_run(tmp_path / "ce", name="student_ce", seed=7))
    page = write_report(folders, tmp_path / "report", preamble="<p>verdict</p>").read_text()
    assert page.count("<table") == 1 and "|---" not in page and "<pre>" not in page
    assert "latency / image (deployed network, batch 1)" in page
    assert "<td>2.500 ms</td>" in page  # the median over the seeds, not the first seed's 1.000
    assert "1.000 ms" not in page and "3.000 ms" not in page
    assert "<b>kd</b>: training seeds 3, 4, 5 (3 runs" in page and "<b>student_ce</b>: training seed 7 (1 run" in page
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert [row["seeds"] for row in summary] == [[3, 4, 5], [7]]


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """Every figure the report saves, in order."""
    saved: list[Figure] = []
    original = Figure.savefig

    def keep(self: Figure, *args: Any, **kwargs: Any) -> None:
        saved.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return saved


def test_each_model_has_one_colour_in_every_plot_and_bars_start_at_zero(tmp_path: Path,
                                                                        figures: list[Figure]) -> None:
    folders = [fake_run(tmp_path / name, name=name, best=best) for name, best in (("teacher", 91.0), ("ce", 86.0),
                                                                                  ("kd", 88.0))]
    write_report(folders, tmp_path / "report")
    curves, comparison = figures
    line_colour = {line.get_label(): to_rgba(line.get_color()) for line in curves.axes[0].get_lines()}
    assert len(set(line_colour.values())) == 3
    bars = comparison.axes[0]
    solid, hatched = bars.patches[:3], bars.patches[3:6]  # best epoch, then last epoch, one bar per model
    for model, best_bar, last_bar in zip(("teacher", "ce", "kd"), solid, hatched, strict=True):
        assert to_rgba(best_bar.get_facecolor()) == line_colour[model]
        assert to_rgba(last_bar.get_edgecolor()) == line_colour[model] and last_bar.get_hatch()
    assert bars.get_ylim()[0] == 0.0 and bars.get_ylim()[1] == 100.0  # 91 + room, capped at 100 %


def test_a_caller_table_replaces_the_default_one(tmp_path: Path) -> None:
    page = write_report([fake_run(tmp_path / "kd")], tmp_path / "report", table="<table><tr><td>mine</td></tr></table>")
    assert page.read_text().count("<table") == 1 and "<td>mine</td>" in page.read_text()
