"""Benchmarks run end to end on a tiny budget (they reuse the real training path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdkit.bench.methods import method_recipes
from kdkit.cli import main

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST idx files not installed")


def test_every_method_recipe_is_in_the_suite() -> None:
    names = method_recipes()
    assert names[:2] == ["student_ce", "kd"] and "teacher" not in names and "sweep_kd" not in names
    assert {"dkd", "dist", "mlkd", "fitnets", "at", "pkd", "reviewkd", "crd", "rkd", "sp", "rcka", "pcka",
            "affinity", "kd_ls", "multilabel_kd"} <= set(names)


@pytest.mark.slow
@needs_fashion
def test_methods_bench_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "methods", "--quick", "--seeds", "1", "--methods", "student_ce,kd,reviewkd",
                 "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["student_ce", "kd", "reviewkd"]
    assert results["rows"][2]["extra_params"] > 0 and results["rows"][0]["vs_labels_only"] == 0
    assert (tmp_path / "report" / "comparison.png").is_file()
    assert "| reviewkd |" in capsys.readouterr().out


@pytest.mark.slow
@needs_fashion
def test_speed_bench_quick(tmp_path: Path) -> None:
    assert main(["bench", "speed", "fashion_mnist/kd", "train.batch_size=32", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "speed.json").read_text())
    assert {"a_ce_channels_last", "b_kd_contiguous", "c_kdkit_kd", "d_kdkit_kd_cached"} <= set(result["rows"])
    assert result["batch_size"] == 32 and all(row["median"] > 0 for row in result["rows"].values())
    assert result["ratios"]["c/b"]["spread"]["median"] > 0 and result["ratios"]["d/a"]["spread"]["median"] > 0
    assert "(d) kdkit KD step reading the teacher cache |" in (tmp_path / "results.md").read_text()


def test_speed_bench_needs_two_rounds_for_an_interval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "speed", "fashion_mnist/kd", "--rounds", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--rounds must be at least 2, got 1" in err and "fix:" in err
    assert not (tmp_path / "speed.json").exists()


@pytest.mark.slow
@needs_fashion
def test_speed_bench_takes_any_recipe(tmp_path: Path) -> None:
    # no teacher: the hand-written KD loop and the cached step do not apply, and say so
    assert main(["bench", "speed", "fashion_mnist/student_ce", "train.batch_size=32", "--quick",
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "speed.json").read_text())
    assert set(result["rows"]) == {"a_ce_contiguous", "a_ce_channels_last", "c_kdkit_kd", "c_kdkit_kd_bf16", "loader"}
    assert set(result["ratios"]) == {"c_bf16/c"} and "teacher_forward" not in result["limits"]["rows"]
    assert result["no_hand_written_distillation"] == "no teacher term"
    text = (tmp_path / "results.md").read_text()
    assert "c/b" not in text and "(c) kdkit step (the recipe's objective) |" in text


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["scenes_seg/cwd", "scenes_det/fitnets"])
def test_speed_bench_times_dense_recipes_against_a_loop_with_the_tasks_own_loss(recipe: str, tmp_path: Path) -> None:
    # the random teacher has the task's outputs (background included); the loops' supervised loss is the task's,
    # not CE, and (b) calls the recipe's own dense losses; (d) reads a cache of the teacher's dense outputs
    assert main(["bench", "speed", recipe, "train.batch_size=8", "data.params.train_scenes=64",
                 "data.params.test_scenes=16", "data.subset=null", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "speed.json").read_text())
    assert {"a_ce_contiguous", "a_ce_channels_last", "b_terms_contiguous", "b_terms_channels_last",
            "c_kdkit_kd"} <= set(result["rows"])
    assert "d_kdkit_kd_cached" in result["rows"]
    # kdkit's dense distillation step against the same losses in a hand-written loop
    assert result["ratios"]["c/b"]["what"].endswith("best hand-written loop with the recipe's losses")
    assert result["limits"]["rows"]["student_train"]["flops"] > 0


def test_rows_scored_by_different_metrics_name_their_metric_and_get_no_difference() -> None:
    from kdkit.bench.methods import format_table, same_metric

    base = {"method": "student_ce", "metric": "top1", "best": 44.7, "best_std": 0.6, "last": 44.7, "last_std": 0.6,
            "epoch_seconds": 4.0, "trained_params": 10, "deployed_params": 10, "deployed_flops": None,
            "latency_ms": None, "arch": "cnn_student", "dataset": "d", "epochs": 4, "train_samples": 100,
            "methods": []}
    kd = {**base, "method": "kd", "metric": "novel_acc", "best": 55.0}
    assert not same_metric(kd, base) and same_metric(kd, kd) and not same_metric(kd, None)
    rows = [{**base, "vs_labels_only": 0.0, "vs_kd": None}, {**kd, "vs_labels_only": None, "vs_kd": 0.0}]
    markdown = format_table({"rows": rows, "seeds": 3, "teacher": {}, "command": "c",
                             "machine": {"cpu": "c", "cores": 2, "torch": "2", "torch_threads": 1, "python": "3"}})
    lines = markdown.splitlines()
    assert "best (metric named in each cell)" in lines[0]
    assert lines[3].startswith("| kd | 55.00 ± 0.60 novel_acc | 44.70 ± 0.60 novel_acc | – | +0.00 |")
    assert lines[2].startswith("| student_ce | 44.70 ± 0.60 top1 |")


def test_the_benchmark_table_is_one_table_in_markdown_and_in_html() -> None:
    from kdkit.bench.methods import format_table, html_report_table

    row = {"method": "kd", "metric": "top1", "best": 88.5, "best_std": 0.4, "last": 88.1, "last_std": 0.5,
           "vs_labels_only": 1.25, "vs_kd": 0.0, "epoch_seconds": 4.2, "trained_params": 12050,
           "deployed_params": 12050, "deployed_flops": 1.5e6, "latency_ms": 0.19, "arch": "cnn_student",
           "dataset": "fashion_mnist", "epochs": 30, "train_samples": 3000, "methods": []}
    results = {"rows": [row], "seeds": 3, "teacher": {"arch": "cnn_teacher", "train_samples": 60000},
               "machine": {"cpu": "cpu", "cores": 2, "torch": "2", "torch_threads": 2, "python": "3.11"},
               "command": "kdkit bench methods"}
    markdown, page = format_table(results), html_report_table(results)
    cells = ["kd", "88.50 ± 0.40", "88.10 ± 0.50", "+1.25", "+0.00", "4.20", "12,050", "12,050", "1.50", "0.19"]
    assert "| " + " | ".join(cells) + " |" in markdown.splitlines()
    assert "latency (ms, deployed network, batch 1)" in markdown.splitlines()[0]
    assert page.count("<table>") == 1 and "|" not in page and "`" not in page  # rendered, no Markdown in the page
    assert "".join(f"<td>{c}</td>" for c in cells) in page and "<p>3 seeds per method;" in page
    assert "Command: <code>kdkit bench methods</code>" in page
