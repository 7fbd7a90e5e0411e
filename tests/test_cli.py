"""The command line: ls, validate, report; exit codes."""

from __future__ import annotations

import pytest

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
