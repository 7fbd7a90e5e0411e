"""The main job, on a tiny budget: table, results, report with plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdkit.cli import main


@pytest.mark.slow
def test_quick_demo_writes_table_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from kdkit import hardware

    fake = tmp_path / "cpuinfo"
    fake.write_text("flags\t\t: fpu sse2 avx fma avx2\n")  # no native bf16: `--amp auto` picks fp32
    monkeypatch.setattr(hardware, "CPUINFO", fake)
    out = tmp_path / "demo"
    assert main(["demo", "--data", "digits", "--quick", "--seeds", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| teacher | cnn_teacher |" in printed and "KD gain (paired by seed" in printed
    assert "precision: fp32 (auto: this CPU has no AMX/AVX512-BF16" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["amp"]["requested"] == "auto" and results["amp"]["amp"] == "off"
    # auto resolved to `off` leaves the shipped recipes as they were (train.amp: off, their digests unchanged)
    assert json.loads((out / "teacher" / "summary.json").read_text())["amp"]["reason"] == "train.amp: off"
    assert [r["model"] for r in results["rows"]] == ["teacher", "student (labels only)", "student + KD"]
    assert len(results["kd_gain_best"]) == 2 and "digits" in results["data"]
    report = out / "report"
    assert (report / "curves.png").stat().st_size > 1000 and (report / "comparison.png").stat().st_size > 1000
    html = (report / "report.html").read_text()
    assert "data:image/png;base64" in html and "student + KD" in html
    # one rendered table (the printed Markdown one is not pasted in), with the latencies the printed table shows
    assert html.count("<table") == 1 and "|---" not in html and "<pre>" not in html
    for row in results["rows"]:
        assert f"<td>{row['model']}</td>" in html and f"{row['latency_ms']:.3f} ms" in html
        assert f"{row['latency_ms']:.3f} ms" in printed
    # provenance: the training seeds each row pools
    assert "<b>student + KD</b>: training seeds 0, 1 (2 runs" in html and "<b>teacher</b>: training seed 0" in html
    # a second run reuses every finished run (same recipes) instead of retraining: no run's metrics are rewritten
    finished = {path: path.stat().st_mtime_ns for path in out.glob("*/metrics.json")}
    assert len(finished) == 5  # the teacher and 2 seeds x 2 students
    assert main(["demo", "--data", "digits", "--quick", "--seeds", "2", "--out", str(out)]) == 0
    assert {path: path.stat().st_mtime_ns for path in out.glob("*/metrics.json")} == finished


def test_bad_seed_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--seeds", "0"]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err


def test_a_data_dir_the_user_names_never_falls_back_to_digits(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert main(["demo", "--data-dir", str(missing), "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "digits" not in err.split("fix:")[0].lower()
    assert not (tmp_path / "demo").exists()  # nothing trained
    assert main(["demo", "--data", "digits", "--data-dir", str(missing), "--out", str(tmp_path / "d")]) == 2
    assert "drop --data-dir" in capsys.readouterr().err
