"""DistributedDataParallel on CPU: two processes under torchrun train, and write the same metric format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_recipe
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe


def torchrun_two(tmp_path: Path, recipe: dict) -> subprocess.CompletedProcess[str]:
    """``kdkit run`` of ``recipe`` in two torchrun processes (one thread each); asserts it succeeded."""
    path = write_recipe(tmp_path / "ddp.yaml", recipe)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kdkit", "run", str(path), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_two_process_ddp_trains_and_matches_single_process_format(tmp_path: Path, tiny_kd: dict) -> None:
    tiny_kd["train"]["epochs"] = 4
    tiny_kd["train"]["ce_weight"] = 1.0  # the teacher here is random: let the labels drive learning
    tiny_kd["train"]["batch_size"] = 16  # x2 processes = the single-process global batch of 32
    tiny_kd["train"]["threads"] = 1
    tiny_kd["output"]["dir"] = str(tmp_path / "ddp")
    torchrun_two(tmp_path, tiny_kd)

    single = recipe_from_dict(tiny_kd, [f"output.dir={tmp_path / 'single'}", "train.batch_size=32"])
    run_recipe(single)
    ddp_rows = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    one_rows = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert [list(r) for r in ddp_rows] == [list(r) for r in one_rows]
    header = lambda run: (tmp_path / run / "metrics.csv").read_text().splitlines()[0]  # noqa: E731
    assert header("ddp") == header("single")
    assert len(ddp_rows) == 4 and ddp_rows[-1]["step"] == 4 * (200 // 32)
    ddp_top1, one_top1 = ddp_rows[-1]["test_top1"], one_rows[-1]["test_top1"]
    assert ddp_top1 > 40.0, ddp_rows  # it learned (10 classes: chance is 10%)
    # same global batch and schedule; only BatchNorm statistics (per-rank batches of 16) differ
    assert abs(ddp_top1 - one_top1) < 15.0, (ddp_top1, one_top1)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2
    # only rank 0 wrote: one set of checkpoints, no stray temp folders
    assert not list((tmp_path / "ddp" / "checkpoints").glob(".*tmp*"))


@pytest.mark.slow
def test_two_process_ddp_reads_one_cache_built_by_rank_0(tmp_path: Path, tiny_kd: dict) -> None:
    tiny_kd["train"].update({"epochs": 2, "batch_size": 16, "threads": 1})
    tiny_kd["teacher"]["cache"] = {"views": 2, "dir": str(tmp_path / "cache")}
    tiny_kd["output"]["dir"] = str(tmp_path / "ddp")
    proc = torchrun_two(tmp_path, tiny_kd)
    assert proc.stderr.count("teacher cache: running the teacher") == 1  # built once, by rank 0
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["teacher_cache"]["views"] == 2
    assert not list(tmp_path.glob("cache.partial-*"))


@pytest.mark.slow
def test_two_process_ddp_trains_every_peer(tmp_path: Path, tiny: dict) -> None:
    # deep mutual learning under DDP: one wrapped module holds both peers, so both are trained and saved
    tiny["peers"] = {"peer": {"arch": "cnn_student", "params": {"width": 4}}}
    tiny["distill"] = [{"loss": "kd", "teacher": "peer.logits", "temperature": 1},
                       {"loss": "kd", "name": "kd_peer", "student": "peer.logits", "teacher": "model.logits",
                        "temperature": 1}]
    tiny["train"].update({"epochs": 2, "batch_size": 16, "threads": 1})
    tiny["output"]["dir"] = str(tmp_path / "ddp")
    torchrun_two(tmp_path, tiny)
    from safetensors.torch import load_file

    from kdkit.checkpoint import pointed
    from kdkit.models import build_model

    weights = load_file(str(pointed(tmp_path / "ddp" / "checkpoints", "latest") / "model.safetensors"))
    fresh = build_model("cnn_student", num_classes=10, in_channels=1, image_size=8, params={"width": 4})
    trained = {k.removeprefix("model.peer."): v for k, v in weights.items() if k.startswith("model.peer.")}
    assert trained.keys() == fresh.state_dict().keys()
    rows = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert "train_ce@peer" in rows[-1] and "train_kd_peer" in rows[-1]


INTERRUPT_AT = '''
import os, signal, sys
from kdkit.engine import Interrupted
from kdkit.recipe import load_recipe
from kdkit.runner import run_recipe

def interrupt(engine, event):  # every rank gets SIGINT at the same step, as from Ctrl-C on torchrun
    if event == "step" and engine.global_step == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGINT)

try:
    run_recipe(load_recipe(sys.argv[1]), callbacks=[interrupt])
except Interrupted:
    sys.exit(130)
'''


@pytest.mark.slow
def test_two_process_ddp_resumed_mid_epoch_keeps_every_ranks_training_sums(tmp_path: Path, tiny_kd: dict) -> None:
    # Issue #10: a mid-epoch checkpoint held rank 0's partial sums, which every rank restored, so the resumed
    # epoch's train_* metrics counted rank 0's first steps twice and rank 1's never.
    tiny_kd["train"].update({"epochs": 2, "batch_size": 4, "threads": 1})  # 25 steps per epoch on 2 ranks
    tiny_kd["output"]["dir"] = str(tmp_path / "straight")
    torchrun_two(tmp_path, tiny_kd)
    tiny_kd["output"]["dir"] = str(tmp_path / "broken")
    path = write_recipe(tmp_path / "broken.yaml", tiny_kd)
    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPT_AT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(path), "28"]  # epoch 2, step 3: the ranks agree to stop at the next sync point, step 10
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode != 0, proc.stderr[-4000:]
    from kdkit.checkpoint import pointed, read_state

    folder = pointed(tmp_path / "broken" / "checkpoints", "latest")
    assert folder is not None and folder.name == "epoch_0001_step_00010", proc.stderr[-4000:]
    assert read_state(folder)["partial"]["count"] == 2 * 10  # both ranks' steps
    resumed = subprocess.run([*cmd[:6], "-m", "kdkit", "run", str(path), "--quiet", "--resume"], capture_output=True,
                             text=True, timeout=300, env=env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    rows = {run: json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("straight", "broken")}
    for key in ("train_loss", "train_kd", "train_ce", "train_top1", "test_top1"):
        assert [r[key] for r in rows["broken"]] == pytest.approx([r[key] for r in rows["straight"]], rel=1e-5), key
