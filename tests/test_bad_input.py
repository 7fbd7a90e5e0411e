"""Each bad input fails before training with exit code 2 and a message: bad value, choices, fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import write_recipe
from kdkit.cli import main
from kdkit.models import build_model


def run_cli(tmp_path: Path, recipe: dict, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    code = main(["run", str(path), *extra])
    err = capsys.readouterr().err
    assert not (Path(recipe["output"]["dir"]) / "checkpoints").exists(), "training must not have started"
    return code, err


def test_unknown_model(tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture[str]) -> None:
    tiny["model"]["arch"] = "cnn_studnt"
    code, err = run_cli(tmp_path, tiny, capsys)
    assert code == 2
    assert "model.arch: unknown model 'cnn_studnt'; valid choices: cnn_student, det_student, cnn_teacher" in err
    assert "fix:" in err


def test_unknown_tap_path(tmp_path: Path, tiny_kd: dict, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_kd["distill"][0]["student"] = "stage9"
    code, err = run_cli(tmp_path, tiny_kd, capsys)
    assert code == 2
    assert "distill.0.student: tap 'stage9'" in err and "valid choices: stage1" in err.replace("logits, ", "")


def test_shapes_that_need_a_bridge(tmp_path: Path, tiny_kd: dict, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_kd["distill"] = [{"loss": "mse", "student": "stage2", "teacher": "stage2"}]
    code, err = run_cli(tmp_path, tiny_kd, capsys)
    assert code == 2
    assert "cannot compare student tap 'stage2' with teacher tap 'stage2'" in err
    assert "(16, 2, 2) differs from teacher shape (64, 2, 2)" in err and "bridge: conv1x1" in err
    tiny_kd["distill"][0]["bridge"] = "conv1x1"
    assert main(["validate", str(write_recipe(tmp_path / "ok.yaml", tiny_kd))]) == 0


def test_spatial_mismatch_suggests_the_bridge_that_maps_it(tmp_path: Path, tiny_kd: dict,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    # student stage1 (8, 4, 4) against teacher stage2 (64, 2, 2): conv1x1 keeps H, W and cannot map it
    tiny_kd["distill"] = [{"loss": "mse", "student": "stage1", "teacher": "stage2"}]
    code, err = run_cli(tmp_path, tiny_kd, capsys)
    assert code == 2 and "(8, 4, 4) differs from teacher shape (64, 2, 2)" in err
    assert "valid choices: convreg, linear" in err and "fix: use `bridge: convreg` (or linear)" in err, err
    assert "conv1x1" not in err
    tiny_kd["distill"][0]["bridge"] = "convreg"  # ...and the suggestion works
    assert main(["validate", str(write_recipe(tmp_path / "ok.yaml", tiny_kd))]) == 0


def test_unknown_loss(tmp_path: Path, tiny_kd: dict, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_kd["distill"][0]["loss"] = "kdd"
    code, err = run_cli(tmp_path, tiny_kd, capsys)
    assert code == 2 and "distill.0.loss: unknown loss 'kdd'; valid choices: kd" in err


def test_unknown_loss_parameter(tmp_path: Path, tiny_kd: dict, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_kd["distill"][0]["temprature"] = 2
    code, err = run_cli(tmp_path, tiny_kd, capsys)
    assert code == 2 and "loss 'kd' has no parameter 'temprature'; valid choices: temperature" in err


def test_unknown_recipe_key(tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture[str]) -> None:
    tiny["train"]["optimiser"] = {"lr": 0.1}
    code, err = run_cli(tmp_path, tiny, capsys)
    assert code == 2 and "train.optimiser: unknown key 'optimiser'; valid choices: optimizer" in err


def test_missing_dataset_files(tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture[str]) -> None:
    tiny["data"] = {"dataset": "fashion_mnist", "root": str(tmp_path / "nowhere")}
    code, err = run_cli(tmp_path, tiny, capsys)
    assert code == 2 and "data.root: fashion_mnist folder" in err and "nowhere" in err and "apt-get install" in err
    (tmp_path / "empty").mkdir()
    tiny["data"]["root"] = str(tmp_path / "empty")
    code, err = run_cli(tmp_path, tiny, capsys)
    assert code == 2 and "train-images-idx3-ubyte" in err and "empty" in err


def test_truncated_checkpoint(tmp_path: Path, tiny_kd: dict, teacher_file: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(teacher_file.read_bytes()[:-500])
    tiny_kd["teacher"]["checkpoint"] = str(broken)
    code, err = run_cli(tmp_path, tiny_kd, capsys)
    assert code == 2 and "broken.safetensors" in err and "truncated or corrupt" in err


def test_checkpoint_of_another_architecture(tmp_path: Path, tiny_kd: dict, capsys: pytest.CaptureFixture[str]) -> None:
    other = build_model("cnn_student", num_classes=10, in_channels=1, image_size=8)
    path = tmp_path / "student.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    tiny_kd["teacher"]["checkpoint"] = str(path)
    code, err = run_cli(tmp_path, tiny_kd, capsys)
    assert code == 2 and "does not fit SmallCNN" in err and "shape mismatch" in err


def test_torch_pickle_checkpoint_never_runs_code(tmp_path: Path, tiny_kd: dict,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"weight": Evil()}, path)
    tiny_kd["teacher"]["checkpoint"] = str(path)
    code, err = run_cli(tmp_path, tiny_kd, capsys)
    assert code == 2 and "truncated or corrupt" in err


def test_several_problems_reported_at_once(tmp_path: Path, tiny_kd: dict, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_kd["distill"] = [{"loss": "kdd"}, {"loss": "kd", "teacher": "stage7"}]
    tiny_kd["model"]["params"] = {"widht": 4}
    code, err = run_cli(tmp_path, tiny_kd, capsys)
    assert code == 2 and "3 problem(s)" in err
    assert "unknown loss 'kdd'" in err and "distill.1.teacher: tap 'stage7'" in err
    assert "model.params.widht: model 'cnn_student' has no parameter 'widht'; valid choices: width" in err
