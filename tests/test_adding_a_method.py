"""docs/adding-a-method.md: its complete example, installed as a plugin through an entry point, works."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_recipe

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding-a-method.md"


def install_example(site: Path) -> None:
    """Write the doc's example as module ``fm_example`` plus the metadata of an installed distribution that
    declares it in the ``kdkit.plugins`` entry-point group (what ``pip install`` of a user's package leaves)."""
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert code is not None, "the doc lost its example"
    site.mkdir()
    (site / "fm_example.py").write_text(code.group(1))
    info = site / "fm_example-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fm-example\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[kdkit.plugins]\nfunction_matching = fm_example\n")


def kdkit(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "kdkit", *args], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_the_documented_method_installs_validates_and_trains(tmp_path: Path, tiny_kd: dict) -> None:
    site = tmp_path / "site"
    install_example(site)
    tiny_kd["train"]["ce_weight"] = 0.0
    tiny_kd["distill"] = [{"loss": "kd", "temperature": 1}]
    tiny_kd["function_matching"] = {"alpha": 1.0}
    good = write_recipe(tmp_path / "fm.yaml", tiny_kd)
    done = kdkit(site, "run", str(good), "--quiet")
    assert done.returncode == 0, done.stderr
    assert "method function_matching" in done.stdout
    assert (Path(tiny_kd["output"]["dir"]) / "summary.json").is_file()

    # its checks run at validation: a CE weight on mixed images is refused with the reason, exit code 2
    tiny_kd["train"]["ce_weight"] = 0.5
    tiny_kd["function_matching"] = {"alpha": -1}
    bad = write_recipe(tmp_path / "bad.yaml", tiny_kd)
    refused = kdkit(site, "validate", str(bad))
    assert refused.returncode == 2
    assert "function_matching.alpha" in refused.stderr and "greater than 0" in refused.stderr
    tiny_kd["function_matching"] = {"alpha": 1.0}
    refused = kdkit(site, "validate", str(write_recipe(tmp_path / "bad2.yaml", tiny_kd)))
    assert refused.returncode == 2 and "set train.ce_weight: 0" in refused.stderr
