"""The command line: ls, validate, report; exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_recipe
from kdkit.cli import main


@pytest.mark.parametrize("what,expected", [("models", "resnet32x4"), ("losses", "kd"), ("datasets", "fashion_mnist"),
                                           ("bridges", "conv1x1"), ("recipes", "fashion_mnist/kd")])
def test_ls(what: str, expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", what]) == 0
    assert expected in capsys.readouterr().out


def test_ls_taps_shows_shapes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", "taps", "resnet8", "--dataset", "cifar10"]) == 0
    out = capsys.readouterr().out
    assert "penultimate" in out and "(64,)" in out and "layer3" in out


def test_validate_schema_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--schema"]) == 0
    assert '"Recipe"' in capsys.readouterr().out or "properties" in capsys.readouterr().out


def test_validate_reports_bad_recipe_and_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "fashion_mnist/kd", "model.arch=resnet3"]) == 2
    assert "unknown model 'resnet3'; valid choices: resnet32" in capsys.readouterr().err


def test_report_compares_run_folders(tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture[str]) -> None:

    folders = []
    for seed in (0, 1):
        recipe = {**tiny, "train": {**tiny["train"], "epochs": 1, "seed": seed},
                  "output": {"dir": str(tmp_path / f"run{seed}"), "progress": False}}
        assert main(["run", str(write_recipe(tmp_path / f"r{seed}.yaml", recipe))]) == 0
        folders.append(str(tmp_path / f"run{seed}"))
    assert main(["report", *folders, "--out", str(tmp_path / "report")]) == 0
    assert "report:" in capsys.readouterr().out
    assert (tmp_path / "report" / "report.html").is_file() and (tmp_path / "report" / "curves.png").is_file()
    assert main(["report", str(tmp_path)]) == 2  # not a run folder
    assert "not a kdkit run folder" in capsys.readouterr().err
