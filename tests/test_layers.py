"""The layer rules of pyproject.toml's ``[tool.importlinter]`` hold for this checkout's source."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# `python -m importlinter.cli` exits 0 without checking anything (the module has no __main__ block), so the
# command is called explicitly; this works wherever the package is installed, script folder or not.
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


@pytest.mark.skipif(importlib.util.find_spec("importlinter") is None,
                    reason="import-linter is not installed (it is in the `dev` extra: pip install -e '.[dev]')")
def test_import_contracts_hold() -> None:
    # The checkout's src first: an installed kdkit (e.g. an editable install of another worktree) must not be
    # the one that is analysed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", LINT, "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    declared = (ROOT / "pyproject.toml").read_text().count("[[tool.importlinter.contracts]]")
    kept = re.search(r"Contracts: (\d+) kept, 0 broken", output)
    assert declared > 0 and kept is not None and int(kept.group(1)) == declared, output  # none skipped
