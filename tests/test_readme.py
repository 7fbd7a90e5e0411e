"""The README's promises: its library example runs, CI runs its test command, its table is current."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_library_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    block = README.split("## Library", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md#library", "exec"), {})
    out = capsys.readouterr().out
    assert "best top1 " in out and "'hint'" in out


def test_ci_runs_exactly_the_readme_test_command() -> None:
    commands = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    test_command = [line for line in commands.splitlines() if line and not line.startswith("#")][1]
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_results_table_is_the_demo_output() -> None:
    table = README.split("<!-- results:begin -->", 1)[1].split("<!-- results:end -->", 1)[0]
    assert "| teacher | cnn_teacher |" in table and "KD gain (paired by seed" in table
    assert "kdkit demo" in table  # the command that regenerates it is printed beside it
