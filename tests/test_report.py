"""The HTML report's per-method sections (FM-KT cost table, TST policy plots), on synthetic run folders."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from kdkit.report import write_report


def fake_run(folder: Path, summary: dict) -> Path:
    folder.mkdir(parents=True)
    rows = [{"epoch": e, "test_top1": 50.0 + e, "train_loss": 1.0 / e} for e in (1, 2)]
    (folder / "metrics.json").write_text(json.dumps(rows))
    (folder / "summary.json").write_text(json.dumps({"name": folder.name, "best_top1": 52.0, "params": 10,
                                                     "seed": 0, "arch": "cnn_student", "train_samples": 100,
                                                     "epochs": 2, "train_seconds": 60.0, **summary}))
    return folder


def test_report_shows_fmkt_costs_and_tst_plots(tmp_path: Path) -> None:
    flow = {"deployed": "fmkt_n4", "eval_steps": 4, "variants": {
        "fmkt_n1": {"params": 900, "flops": 2_000_000, "latency_ms": 0.3, "top1": 80.5},
        "fmkt_n4": {"params": 900, "flops": 4_180_000, "latency_ms": 0.7, "top1": 81.25},
        "plain_theta": {"params": 1200, "flops": 2_390_000, "latency_ms": 0.2}}}
    fmkt = fake_run(tmp_path / "fmkt", {"flow": flow})
    tst = fake_run(tmp_path / "tst", {"tst_policy_seconds": 12.5, "tst_policy_phases": 2, "train_seconds": 60.0})
    plt.figure().savefig(tst / "tst_policy.png")
    plt.close("all")
    plain = fake_run(tmp_path / "kd", {})
    page = write_report([fmkt, tst, plain], tmp_path / "report").read_text()
    assert "FM-KT cost" in page and "fmkt_n4 (deployed)" in page and "81.25" in page and "4.18" in page
    assert "<td>plain_theta</td><td>–</td>" in page  # no accuracy without Theta
    assert "TST policy" in page and "12.5 s of 60.0 s" in page and page.count("data:image/png") == 3
    assert page.count("Method details") == 1
