"""Recipes never run code they name unless the user trusts them (issue: `os:system` through model.arch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_recipe
from kdkit.cli import main


@pytest.fixture(autouse=True)
def untrusted(monkeypatch: pytest.MonkeyPatch) -> None:
    # set (not deleted) so that monkeypatch restores it after the test, also when --trust-code changed it
    monkeypatch.setenv("KDKIT_TRUST_CODE", "0")


@pytest.mark.parametrize("side", ["model", "teacher"])
def test_a_recipe_cannot_run_a_command_even_under_validate(side: str, tiny_kd: dict, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    pwned = tmp_path / "pwned"
    tiny_kd[side] = {"arch": "os:system", "params": {"command": f"touch {pwned}"},
                     **({"checkpoint": tiny_kd["teacher"]["checkpoint"]} if side == "teacher" else {})}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_kd)
    for trust in ([], ["--trust-code"]):  # trusted or not: a builtin is not a model factory
        assert main([*trust, "validate", str(recipe)]) == 2
        assert not pwned.exists()
    err = capsys.readouterr().err
    assert "--trust-code" in err and "not a model factory" in err


def test_an_untrusted_import_path_is_never_imported(tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "user_models.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n\n"
        "def make(num_classes, in_channels, image_size):\n"
        "    from kdkit.models import build_model\n"
        "    return build_model('cnn_student', num_classes=num_classes, in_channels=in_channels,\n"
        "                       image_size=image_size)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    tiny["model"] = {"arch": "user_models:make"}
    recipe = write_recipe(tmp_path / "r.yaml", tiny)
    assert main(["validate", str(recipe)]) == 2
    assert not marker.exists()  # importing a module runs it: refused before the import
    assert "trust" in capsys.readouterr().err
    assert main(["validate", str(recipe), "--trust-code"]) == 0  # the explicit opt-in, anywhere on the line
    assert marker.exists()
