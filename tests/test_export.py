"""kdkit export / predict / load_deployed: what a finished run deploys, written, reloaded and run as PyTorch runs it.

Tiny run folders (one epoch on 100 digits) are trained once per module; every export is also checked here with the
runtime called directly (onnxruntime, torch.jit.load, build_model + safetensors), not only through kdkit's own
verification.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import TINY
from kdkit.build import DataShape, plan_deployed
from kdkit.checkpoint import pointed
from kdkit.cli import main
from kdkit.data import load_dataset, normalize
from kdkit.data.loader import make_loaders
from kdkit.deployment import DEPLOY_FILE, SAMPLES_FILE, read_deployment
from kdkit.errors import KdkitError
from kdkit.export import FORMATS, export_run, load_deployed, open_run
from kdkit.models import build_model
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe

onnx = pytest.importorskip("onnx")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")  # called directly below
ort = pytest.importorskip("onnxruntime")

TEACHER = {"arch": "cnn_teacher"}
#: The runs exported below: the CNN pair's student, a CIFAR-zoo student, a timm student, FM-KT (logit variant,
#: a transformer meta-encoder; feature variant), a student trained with a training-only bridge (FitNets), and a
#: peer (resnet8) deployed from a deep-mutual-learning pair.
CASES: dict[str, dict[str, Any]] = {
    "cnn": {},
    "resnet8": {"model": {"arch": "resnet8"}},
    "timm": {"model": {"arch": "timm:test_efficientnet"}},
    "fmkt_logit": {"teacher": TEACHER, "train": {"ce_weight": 0.0}, "distill": [
        {"loss": "fmkt", "student": "stage2", "teacher": "logits", "bridge": "flow", "metric": "kd",
         "bridge_params": {"steps": 2, "eval_steps": 3, "head": "flatten", "encoder": "transformer"}}]},
    "fmkt_feature": {"teacher": TEACHER, "distill": [
        {"loss": "fmkt_feature", "student": "stage1", "teacher": "stage1", "bridge": "flow_feature",
         "bridge_params": {"steps": 2, "eval_steps": 3}}]},
    "fitnets": {"teacher": TEACHER, "distill": [
        {"loss": "fitnets", "student": "stage1", "teacher": "stage1", "bridge": "convreg", "weight": 1.0},
        {"loss": "kd", "temperature": 4}]},
    "dml": {"peers": {"peer": {"arch": "resnet8"}}, "deploy": "peer", "distill": [
        {"loss": "kd", "name": "from_peer", "student": "model.logits", "teacher": "peer.logits", "temperature": 1},
        {"loss": "kd", "name": "from_model", "student": "peer.logits", "teacher": "model.logits", "temperature": 1}]},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny networks run fastest on one thread; with two, a busy 2-core machine makes them ~7x slower (measured:
    an FM-KT run 139 s instead of 20 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else \
            copy.deepcopy(value)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``runs(name)``: the finished run folder of case ``name``, trained on first use. A teacher's weights file is
    deleted once its student is trained: exporting a student never reads its teacher."""
    root = tmp_path_factory.mktemp("runs")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            recipe = merged(TINY, {"name": name, "data": {"subset": 100}, "train": {"epochs": 1},
                                   "output": {"dir": str(root / name)}})
            recipe = merged(recipe, CASES[name])
            teacher_file = root / f"{name}_teacher.safetensors"
            if "teacher" in recipe:
                torch.manual_seed(123)
                teacher = build_model("cnn_teacher", num_classes=10, in_channels=1, image_size=8)
                save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(teacher_file))
                recipe["teacher"]["checkpoint"] = str(teacher_file)
            run_recipe(recipe_from_dict(recipe))
            teacher_file.unlink(missing_ok=True)
            done[name] = root / name
        return done[name]

    return get


def first_test_images(count: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("digits")
    return data.test_images[:count], data.test_labels[:count]


def pytorch_outputs(run_dir: Path, images: torch.Tensor) -> torch.Tensor:
    run = open_run(run_dir)
    with torch.inference_mode():
        return run.network(normalize(images, run.deployment.mean, run.deployment.std))


def run_file(path: Path, x: torch.Tensor, recipe: dict[str, Any]) -> torch.Tensor:
    """Run an export with its runtime called directly (not through kdkit's format code)."""
    if path.suffix == ".onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        fixed = session.get_inputs()[0].shape[0] == 1
        parts = x.split(1) if fixed else [x]
        return torch.cat([torch.from_numpy(session.run(None, {"images": p.numpy()})[0]) for p in parts])
    if path.suffix == ".pt":
        with torch.inference_mode():
            return torch.jit.load(str(path))(x)
    model = build_model(recipe["model"]["arch"], num_classes=10, in_channels=1, image_size=8).eval()
    model.load_state_dict(load_file(str(path)))
    with torch.inference_mode():
        return model(x)


# -- export -> reload -> the same outputs -------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("case", list(CASES))
def test_export_reloads_with_the_outputs_pytorch_computes(runs: Any, case: str, fmt: str, tmp_path: Path) -> None:
    run_dir = runs(case)
    result = export_run(run_dir, fmt, out=tmp_path, timing_batches=())
    assert result.verification.ok and result.verification.agreement == 100.0
    assert result.path == tmp_path / f"model{FORMATS.get(fmt).suffix}" and result.card.is_file()
    images, _ = first_test_images()
    run = open_run(run_dir)
    x = normalize(images, run.deployment.mean, run.deployment.std)
    torch.testing.assert_close(run_file(result.path, x, run.recipe.to_dict()), pytorch_outputs(run_dir, images),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["cnn", "fmkt_logit", "fmkt_feature"])
def test_safetensors_export_reloads_through_kdkit(runs: Any, case: str, tmp_path: Path) -> None:
    result = export_run(runs(case), "safetensors", out=tmp_path, timing_batches=())
    exported = FORMATS.get("safetensors").load(result.path)
    images, _ = first_test_images()
    run = open_run(runs(case))
    x = normalize(images, run.deployment.mean, run.deployment.std)
    torch.testing.assert_close(exported(x), pytorch_outputs(runs(case), images), atol=0, rtol=0)


@pytest.mark.slow
def test_the_fmkt_export_runs_the_chain_and_not_the_students_classifier(runs: Any, tmp_path: Path) -> None:
    run = open_run(runs("fmkt_logit"))
    images, _ = first_test_images()
    x = normalize(images, run.deployment.mean, run.deployment.std)
    with torch.inference_mode():
        plain = run.student.model(x)
    exported = run_file(export_run(runs("fmkt_logit"), "onnx", out=tmp_path, timing_batches=()).path, x, {})
    assert (exported - plain).abs().max() > 1e-3  # the chain's ensemble, not the plain classifier's logits
    bridge = run.student.bridges["fmkt"]
    assert run.student.deploy_term == "fmkt" and bridge.eval_steps == 3  # the recipe's fixed inference steps
    assert "then FlowBridge(steps=2, eval_steps=3" in json.loads(
        onnx.load(str(tmp_path / "model.onnx")).metadata_props[0].value)["run"]["network"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["fmkt_logit", "fmkt_feature", "fitnets"])
def test_the_export_computes_what_the_trained_student_predicts(runs: Any, case: str, tmp_path: Path) -> None:
    run_dir = runs(case)
    run = open_run(run_dir)
    full = plan_deployed(run.recipe, DataShape(10, 1, 8))  # every bridge, as in training
    checkpoint = load_file(str(pointed(run_dir / "checkpoints", "best") / "model.safetensors"))
    full.load_state_dict({k: v for k, v in checkpoint.items() if k in full.state_dict()}, strict=True)
    data = load_dataset("digits")
    x = normalize(data.test_images, run.deployment.mean, run.deployment.std)
    with torch.inference_mode():
        expected = full.eval().predict(x)
        full.remove_hooks()  # the feature chain is a hook on the model: without it, the plain student
        plain = full.model(x)
    exported = run_file(export_run(run_dir, "onnx", out=tmp_path, timing_batches=()).path, x, {})
    torch.testing.assert_close(exported, expected, atol=1e-4, rtol=1e-4)
    assert (exported - plain).abs().max() > 1e-3 if case.startswith("fmkt") else True  # the chain is deployed
    # and it scores what the run reported for its best epoch (up to a near-tie flipped by another memory layout)
    top1 = 100.0 * float((exported.argmax(1) == data.test_labels).float().mean())
    assert abs(top1 - json.loads((run_dir / "summary.json").read_text())["best_top1"]) <= 100.0 / 360 + 1e-9


@pytest.mark.slow
@pytest.mark.parametrize(("case", "arch", "trained_with", "network"), [
    ("fitnets", "cnn_student", "bridges.fitnets.", "cnn_student"),
    ("dml", "resnet8", "model.model.", "resnet8 (member 'peer' of peers model, peer)")])
def test_what_only_training_used_is_not_exported(runs: Any, case: str, arch: str, trained_with: str, network: str,
                                                 tmp_path: Path) -> None:
    run_dir = runs(case)
    checkpoint = load_file(str(pointed(run_dir / "checkpoints", "best") / "model.safetensors"))
    assert any(k.startswith(trained_with) for k in checkpoint)  # FitNets' regressor; the peer that taught
    path = export_run(run_dir, "safetensors", out=tmp_path, timing_batches=()).path
    weights = load_file(str(path))
    plain = build_model(arch, num_classes=10, in_channels=1, image_size=8)
    assert set(weights) == set(plain.state_dict())  # no bridge, no `model.` prefix: the network's own state dict
    images, _ = first_test_images()
    x = normalize(images, *read_mean_std(run_dir))
    torch.testing.assert_close(run_file(path, x, {"model": {"arch": arch}}), pytorch_outputs(run_dir, images))
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["kdkit"])["run"]["network"] == network


def read_mean_std(run_dir: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    deployment = read_deployment(run_dir)
    assert deployment is not None
    return deployment.mean, deployment.std


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_dynamic_batch_takes_any_batch_and_the_default_one_image(runs: Any, fmt: str, tmp_path: Path) -> None:
    fixed = export_run(runs("cnn"), fmt, out=tmp_path / "fixed", timing_batches=())
    dynamic = export_run(runs("cnn"), fmt, out=tmp_path / "dynamic", dynamic_batch=True, timing_batches=())
    assert FORMATS.get(fmt).load(fixed.path).batch == 1 and FORMATS.get(fmt).load(dynamic.path).batch is None
    assert fixed.metadata["export"]["batch"] == 1 and dynamic.metadata["export"]["batch"] is None
    images, _ = first_test_images(5)
    x = normalize(images, *read_mean_std(runs("cnn")))
    if fmt == "onnx":
        with pytest.raises(Exception, match=r"(?i)dimension|shape"):
            ort.InferenceSession(str(fixed.path)).run(None, {"images": x.numpy()})
        out = ort.InferenceSession(str(dynamic.path)).run(None, {"images": x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(out), pytorch_outputs(runs("cnn"), images), atol=1e-4, rtol=1e-4)


# -- metadata and deploy.json -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_run_folder_and_every_export_record_the_preprocessing(runs: Any, tmp_path: Path) -> None:
    run_dir = runs("cnn")
    data = load_dataset("digits")
    recorded = json.loads((run_dir / DEPLOY_FILE).read_text())
    assert recorded["classes"] == [str(i) for i in range(10)] and recorded["task"] == "classification"
    assert (recorded["channels"], recorded["size"], recorded["probabilities"]) == (1, 8, "softmax")
    assert recorded["mean"] == list(data.mean) and recorded["std"] == list(data.std)
    assert recorded["dataset"]["name"] == "digits" and recorded["dataset"]["test_samples"] == 360
    samples = load_file(str(run_dir / SAMPLES_FILE))  # what exports are verified on
    assert torch.equal(samples["images"], data.test_images[:64])
    assert torch.equal(samples["labels"], data.test_labels[:64])
    stored = {}
    onnx_path = export_run(run_dir, "onnx", out=tmp_path, timing_batches=()).path
    stored["onnx"] = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}["kdkit"]
    extra = {"kdkit.json": ""}
    torch.jit.load(str(export_run(run_dir, "torchscript", out=tmp_path, timing_batches=()).path), _extra_files=extra)
    stored["torchscript"] = extra["kdkit.json"]
    with safe_open(str(export_run(run_dir, "safetensors", out=tmp_path, timing_batches=()).path), "pt") as f:
        stored["safetensors"] = f.metadata()["kdkit"]
    for fmt, text in stored.items():
        metadata = json.loads(text)
        assert metadata["deployment"] == recorded, fmt
        assert metadata["export"]["format"] == fmt and metadata["recipe"] == yaml.safe_load(
            (run_dir / "recipe.yaml").read_text())
        assert "(pixels / 255 - mean) / std" in metadata["input"]["preprocessing"]


@pytest.mark.slow
def test_a_run_folder_without_deploy_json_gets_one_and_says_so(runs: Any, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old"
    shutil.copytree(runs("cnn"), old)
    recorded, samples = (old / DEPLOY_FILE).read_text(), load_file(str(old / SAMPLES_FILE))
    (old / DEPLOY_FILE).unlink()
    (old / SAMPLES_FILE).unlink()
    assert main(["export", str(old), "--format", "torchscript"]) == 0
    assert f"did not record {DEPLOY_FILE}; recorded it now from its recipe's data" in capsys.readouterr().err
    assert json.loads((old / DEPLOY_FILE).read_text()) == json.loads(recorded)
    again = load_file(str(old / SAMPLES_FILE))
    assert all(torch.equal(again[k], samples[k]) for k in ("images", "labels"))


@pytest.mark.slow
def test_a_run_folder_is_all_an_export_needs(runs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from kdkit.data import DATASETS

    def gone(**_: Any) -> None:
        raise KdkitError("the dataset is not on this machine")

    monkeypatch.setitem(DATASETS._entries, "digits", gone)  # neither data nor teacher (deleted after training)
    assert main(["export", str(runs("fmkt_feature")), "--out", str(tmp_path)]) == 0
    assert "top-1 agreement 100.0 % on 64 test images" in capsys.readouterr().out
    copied = tmp_path / "copied"
    shutil.copytree(runs("cnn"), copied)
    (copied / SAMPLES_FILE).unlink()
    assert main(["export", str(copied)]) == 2
    assert f"has {DEPLOY_FILE} but no {SAMPLES_FILE}" in capsys.readouterr().err


# -- the CLI, the model card, latency -----------------------------------------------------------------------------

@pytest.mark.slow
def test_export_command_prints_the_verification_and_writes_the_card(runs: Any, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "fitnets_seed0"
    shutil.copytree(runs("fitnets"), run_dir)
    sibling = tmp_path / "fitnets_seed1"  # another seed of the same recipe, as `kdkit bench` lays runs out
    shutil.copytree(run_dir, sibling)
    recipe = yaml.safe_load((sibling / "recipe.yaml").read_text())
    recipe["train"]["seed"] = 1
    (sibling / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    summary = json.loads((sibling / "summary.json").read_text())
    summary.update(seed=1, best_top1=summary["best_top1"] + 2.0)
    (sibling / "summary.json").write_text(json.dumps(summary))
    assert main(["export", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"export: {run_dir / 'export' / 'model.onnx'} (onnx, cnn_student)" in out
    assert "verified against PyTorch: max abs diff" in out and "top-1 agreement 100.0 % on 64 test images" in out
    assert "latency at batch 1: PyTorch eager" in out
    card = (run_dir / "export" / "model_card.md").read_text()
    best = json.loads((run_dir / "summary.json").read_text())["best_top1"]
    for expected in ["| Network | cnn_student |", "| Classes (10) | 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 |", "| Parameters |",
                     "| FLOPs |", "| Latency | batch 1: PyTorch eager", "Teacher: cnn_teacher",
                     "fitnets (weight 1.0, bridge convreg), kd (weight 1.0)", "Over 2 seeds: best top1 "
                     f"**{best + 1.0:.2f} ± {2 / np.sqrt(2):.2f}**", "```yaml", "digits", "kdkit "]:
        assert expected in card, expected


@pytest.mark.slow
def test_bench_export_prints_the_latency_table(runs: Any, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import kdkit.bench.export as bench

    monkeypatch.setattr(bench, "BATCHES", (1, 4))
    monkeypatch.setattr(bench, "REPEATS", 3)
    assert main(["bench", "export", str(runs("cnn")), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| runtime | batch 1 | batch 4 |" in out and "| PyTorch eager |" in out and "| ONNX Runtime |" in out
    assert "median of 3 timed runs; torch threads 1" in out and "verified: max abs diff" in out
    assert main(["bench", "export", str(runs("cnn")), "--threads", "0"]) == 2


# -- predict and load_deployed ------------------------------------------------------------------------------------

def write_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)  # the mode follows the array: (H, W) uint8 L, uint16 I;16, (H, W, 4) RGBA
    return path


@pytest.mark.slow
@pytest.mark.parametrize("source", ["run", "onnx"])
def test_predict_on_image_files_gives_the_classes_of_the_in_memory_evaluation(
        runs: Any, source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = runs("fmkt_feature")
    data = load_dataset("digits")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(40):
        write_png(folder / f"{i:03d}.png", data.test_images[i, 0].numpy())
    run = open_run(run_dir)
    _, test = make_loaders(data, batch_size=32, eval_batch_size=40)
    x, _, _ = next(test.epoch(0))
    with torch.inference_mode():
        expected = [data.classes[int(c)] for c in run.network(x).argmax(1)]
    target = run_dir if source == "run" else export_run(run_dir, "onnx", out=tmp_path, timing_batches=()).path
    capsys.readouterr()
    assert main(["predict", str(target), str(folder), "--top-k", "3"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("predict: ") and "probabilities by softmax over the classes" in lines[0]
    got = [line.split(": ", 1)[1].split(" ")[0] for line in lines[1:]]
    assert got == expected and not captured.err  # PNG files of the right size: nothing converted
    first = [float(v.split(" ")[1]) for v in lines[1].split(": ", 1)[1].split(", ")]
    assert len(first) == 3 and first == sorted(first, reverse=True) and 0 < sum(first) <= 1.0 + 1e-6


@pytest.mark.slow
def test_a_multilabel_run_predicts_each_class_on_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from kdkit.data import DATASETS
    from test_tasks import multilabel_digits

    monkeypatch.setitem(DATASETS._entries, "digits_multilabel", multilabel_digits)  # a test-only dataset
    recipe = merged(TINY, {"task": "multilabel", "data": {"dataset": "digits_multilabel", "subset": 100},
                           "model": {"params": {"head": "queries"}}, "train": {"epochs": 1},
                           "output": {"dir": str(tmp_path / "run")}})
    run_recipe(recipe_from_dict(recipe))
    assert read_deployment(tmp_path / "run").probabilities == "sigmoid"
    path = export_run(tmp_path / "run", "onnx", out=tmp_path / "export", timing_batches=()).path
    pixels = load_dataset("digits").test_images[:2]
    for i in range(2):
        write_png(tmp_path / f"{i}.png", pixels[i, 0].numpy())
    capsys.readouterr()
    assert main(["predict", str(path), str(tmp_path / "0.png"), str(tmp_path / "1.png"), "--top-k", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "probabilities by sigmoid, each class on its own" in lines[0]
    expected = torch.sigmoid(pytorch_outputs(tmp_path / "run", pixels))
    for line, probs in zip(lines[1:], expected, strict=True):
        shown = {name: float(p) for name, p in (item.split(" ") for item in line.split(": ", 1)[1].split(", "))}
        assert shown == pytest.approx({str(c): float(p) for c, p in enumerate(probs)}, abs=1e-4)


@pytest.mark.slow
def test_predict_converts_safe_images_and_says_so(runs: Any, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    digit = load_dataset("digits").test_images[0, 0].numpy()
    rgb = write_png(tmp_path / "big_rgb.png", np.repeat(np.kron(digit, np.ones((2, 2), np.uint8))[:, :, None], 3, 2))
    assert main(["predict", str(runs("cnn")), str(rgb), "--top-k", "20"]) == 0
    captured = capsys.readouterr()
    assert "RGB converted to grayscale" in captured.err and "resized from 16x16 to 8x8" in captured.err
    assert "--top-k 20 is more than the 10 classes: showing all of them" in captured.err
    assert len(captured.out.splitlines()[1].split(", ")) == 10


@pytest.mark.slow
@pytest.mark.parametrize(("pixels", "message"), [
    (np.zeros((8, 10), np.uint8), "is 10x8, not square"),
    (np.zeros((8, 8, 4), np.uint8), "has transparent pixels (100% of them)"),
    (np.zeros((8, 8), np.uint16), "16-bit or float"),
])
def test_predict_refuses_images_it_cannot_convert_safely(runs: Any, tmp_path: Path, pixels: np.ndarray, message: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = write_png(tmp_path / "bad.png", pixels)
    assert main(["predict", str(runs("cnn")), str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "fix: " in err and str(path) in err


@pytest.mark.slow
def test_load_deployed_takes_raw_images(runs: Any) -> None:
    net = load_deployed(runs("fmkt_logit"))
    assert isinstance(net, torch.nn.Module) and not net.training and net.classes == [str(i) for i in range(10)]
    images, _ = first_test_images(6)
    expected = pytorch_outputs(runs("fmkt_logit"), images)
    with torch.inference_mode():
        torch.testing.assert_close(net(images), expected)
        torch.testing.assert_close(net(images.float() / 255), expected)
        torch.testing.assert_close(net(images[0]), expected[:1])
    with pytest.raises(KdkitError, match=r"values in \[0, 1\]; these span \[0, 255\]"):
        net(images.float())
    with pytest.raises(KdkitError, match=r"the network takes \(B, 1, 8, 8\)"):
        net(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


# -- bad input ----------------------------------------------------------------------------------------------------

def unfinished(tmp_path: Path, checkpoint: bool) -> Path:
    """A run folder whose training did not finish (with or without an epoch checkpoint)."""
    folder = tmp_path / "unfinished"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(merged(TINY, {"output": {"dir": str(folder)}})))
    if checkpoint:
        (folder / "checkpoints" / "epoch_0001").mkdir()
        (folder / "checkpoints" / "latest.json").write_text(json.dumps({"dir": "epoch_0001"}))
    return folder


@pytest.mark.parametrize("checkpoint", [False, True])
def test_a_run_without_a_finished_checkpoint_exits_2(tmp_path: Path, checkpoint: bool,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    folder = unfinished(tmp_path, checkpoint)
    assert main(["export", str(folder), "--format", "torchscript"]) == 2
    err = capsys.readouterr().err
    state = "its last checkpoint, epoch_0001, is from an unfinished run" if checkpoint else "it has no checkpoint"
    assert f"has no finished checkpoint: {state}" in err and "fix: finish the run first" in err
    assert main(["export", str(tmp_path)]) == 2
    assert "is not a kdkit run folder (no recipe.yaml)" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "onxx"], "unknown export format 'onxx'; valid choices: onnx,"),
    (["--format", "torchscrpt"], "unknown export format 'torchscrpt'; valid choices: torchscript,"),
    (["--opset", "99"], "--opset 99 is outside what torch's ONNX exporter writes (7..20); fix: use --opset between 7 "
                        "and 20"),
    (["--format", "torchscript", "--opset", "17"], "--opset applies to onnx exports, not torchscript"),
    (["--format", "safetensors", "--dynamic-batch"], "--dynamic-batch applies to onnx, torchscript exports"),
    (["--checkpoint", "bset"], "unknown checkpoint 'bset'; valid choices: best, latest"),
])
def test_bad_options_exit_2_before_the_run_is_read(tmp_path: Path, args: list[str], message: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    folder = unfinished(tmp_path, checkpoint=False)  # never read: the options are checked first
    assert main(["export", str(folder), *args]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_extra_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert main(["export", str(tmp_path)]) == 2
    assert "--format onnx needs the package(s) onnxruntime, which are not installed; fix: pip install " \
           "'kdkit[export]' (installs onnx, onnxruntime)" in capsys.readouterr().err
    model = tmp_path / "model.onnx"
    model.write_bytes(b"")
    assert main(["predict", str(model), str(model)]) == 2
    assert "pip install 'kdkit[export]'" in capsys.readouterr().err


@pytest.mark.slow
def test_an_opset_the_exporter_cannot_meet_exits_2(runs: Any, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(runs("fmkt_logit")), "--opset", "11", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--opset: --opset 11: the exporter cannot write this network at that opset" in err
    assert "Support for this operator was added in version 13" in err
    assert "fix: use the newer opset the error names" in err
    assert not list(tmp_path.iterdir())  # nothing left behind


@pytest.mark.slow
def test_out_with_another_suffix_exits_2(runs: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(runs("cnn")), "--format", "torchscript", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "does not end with '.pt', the suffix of torchscript exports" in capsys.readouterr().err


@pytest.mark.slow
def test_an_export_that_computes_something_else_exits_1_and_says_where(
        runs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fmt = FORMATS.get("torchscript")
    load = type(fmt).load

    def off_at_image_3(self: Any, path: Path) -> Any:
        exported = load(self, path)
        run, calls = exported.run, []

        def wrong(x: torch.Tensor) -> torch.Tensor:  # the file takes one image at a time: call i is image i
            out = run(x).clone()
            if len(calls) == 3:
                out[0, 7] += 0.5
            calls.append(1)
            return out

        exported.run = wrong
        return exported

    monkeypatch.setattr(type(fmt), "load", off_at_image_3)
    assert main(["export", str(runs("cnn")), "--format", "torchscript", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "does not compute what PyTorch does: largest difference at test image #3, output 7 ('7')" in err
    assert "max abs diff 0.5 (tolerance" in err and "model.pt.unverified" in err
    assert (tmp_path / "model.pt.unverified").is_file() and not (tmp_path / "model.pt").exists()


# -- the pieces ---------------------------------------------------------------------------------------------------

def test_the_deployed_network_needs_neither_teacher_weights_nor_teacher_recipe() -> None:
    import kdkit.methods  # noqa: F401 - the flow bridge

    recipe = recipe_from_dict(merged(TINY, {
        "teacher": {"arch": "cnn_teacher", "recipe": "no/such/teacher.yaml"}, "distill": [
            {"loss": "fmkt", "student": "stage2", "teacher": "logits", "bridge": "flow", "bridge_params": {"steps": 2}},
            {"loss": "fitnets", "student": "stage1", "teacher": "stage1", "bridge": "convreg"}]}))
    student = plan_deployed(recipe, DataShape(10, 1, 8))
    assert set(student.bridges) == {"fmkt", "fitnets"} and not any(p.is_meta for p in student.parameters())
    deployed = student.deployment()
    assert list(deployed.bridges) == ["fmkt"] and deployed.deploy_term == "fmkt"
    assert {k.split(".")[0] for k in deployed.state_dict()} == {"model", "bridges"}
    assert not any(k.startswith("bridges.fitnets") for k in deployed.state_dict())
    x = torch.randn(3, 1, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(deployed.eval().predict(x), student.eval().predict(x))


@pytest.mark.parametrize(("theta", "kept"), [(False, ["fmkt", "ff"]), (True, ["ff"])])
def test_deployment_keeps_the_bridges_predict_runs(theta: bool, kept: list[str]) -> None:
    from kdkit.bridges import BRIDGES
    from kdkit.distill import Student

    torch.manual_seed(0)
    model = build_model("cnn_student", num_classes=10, in_channels=1, image_size=8)
    bridges = {"fmkt": BRIDGES.get("flow")((16, 2, 2), (10,), steps=2, eval_steps=2, theta=theta),  # Theta: plain
               "ff": BRIDGES.get("flow_feature")((8, 4, 4), None, steps=2, eval_steps=2),  # rewrites stage1
               "hint": BRIDGES.get("conv1x1")((8, 4, 4), (32, 4, 4))}  # a loss's only
    student = Student(model, {"fmkt": "stage2", "ff": "stage1", "hint": "stage1"}, bridges).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.inference_mode():
        expected = student.predict(x)
        deployed = student.deployment().eval()
        torch.testing.assert_close(deployed.predict(x), expected)
    assert sorted(deployed.bridges) == sorted(kept) and deployed.deployed_terms() == kept
