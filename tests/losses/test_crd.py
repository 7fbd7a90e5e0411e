"""CRD: NCE against the reference probability-space formula; memories; training through kdkit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdkit.checkpoint import pointed
from kdkit.losses.crd import CRDLoss, nce_loss
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe


def nce_reference(scores: torch.Tensor, z: float, temperature: float, n_data: int, eps: float = 1e-7) -> float:
    """RepDistiller's ContrastLoss on P = exp(s/T)/Z, written per element (its eps, 1e-7, unless given)."""
    b, k1 = scores.shape
    m, pn = k1 - 1, 1.0 / n_data
    total = 0.0
    for i in range(b):
        p = [math.exp(v / temperature) / z for v in scores[i].tolist()]
        total += math.log(p[0] / (p[0] + m * pn + eps))
        total += sum(math.log(m * pn / (q + m * pn + eps)) for q in p[1:])
    return -total / b


def test_nce_matches_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(4, 9, generator=gen, dtype=torch.float64) * 2 - 1
    z = 3.5e3
    got = nce_loss(scores, torch.tensor(math.log(z)), 0.07, 500).item()
    assert got == pytest.approx(nce_reference(scores, z, 0.07, 500), rel=1e-5)


def test_nce_is_float64_exact() -> None:
    # Without the reference's eps the two are the same formula: float64 scores agree to ~1e-15, where float32
    # scores / 0.07 would be off by ~1e-6.
    scores = torch.rand(4, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    got = nce_loss(scores, torch.tensor(math.log(3.5e3), dtype=torch.float64), 0.07, 500)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(nce_reference(scores, 3.5e3, 0.07, 500, eps=0.0), rel=1e-12, abs=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("memory", ["queue", "bank"])
def test_crd_trains_heads_and_updates_memory(memory: str, dtype: torch.dtype) -> None:
    # float64 inputs meet the float32 heads and memories: computed in float64, stored state keeps its precision
    torch.manual_seed(0)
    loss = CRDLoss(num_negatives=16, memory=memory)
    loss.setup((12,), (20,), num_samples=64)
    s, t = torch.randn(8, 12, dtype=dtype, requires_grad=True), torch.randn(8, 20, dtype=dtype)
    before = loss.memory_t.clone()
    value = loss(s, t, torch.zeros(8), index=torch.arange(8))
    value.backward()
    assert value.dtype == dtype and torch.isfinite(value) and value.item() > 0
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert loss.embed_s.weight.grad is not None and loss.embed_t.weight.grad is not None
    assert loss.embed_s.weight.grad.dtype == torch.float32 and loss.memory_t.dtype == torch.float32
    assert not torch.equal(before, loss.memory_t)
    assert torch.isfinite(loss.log_z).all()
    if memory == "bank":
        assert loss.memory_t.shape == (64, 128)
    else:
        assert loss.memory_t.shape == (16, 128) and int(loss.queue_ptr) == 8


@pytest.mark.slow
def test_crd_prefers_aligned_pairs() -> None:
    """Student features that determine the teacher's give a lower loss after the heads train a little."""
    torch.manual_seed(0)
    loss = CRDLoss(num_negatives=32, feat_dim=16)
    loss.setup((8,), (8,), num_samples=256)
    opt = torch.optim.Adam(loss.parameters(), lr=0.01)
    data = torch.randn(256, 8)
    for step in range(60):
        idx = torch.randint(0, 256, (32,))
        value = loss(data[idx], data[idx] * 2 + 1, torch.zeros(32), index=idx)
        opt.zero_grad()
        value.backward()
        opt.step()
        if step == 0:
            first = value.item()
    assert value.item() < first


def test_crd_bad_parameters() -> None:
    with pytest.raises(ValueError):
        CRDLoss(temperature=0)
    with pytest.raises(ValueError, match="below the dataset size"):
        CRDLoss(num_negatives=100, memory="bank").setup((4,), (4,), num_samples=50)


def crd_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """CRD's buffers in the run's latest checkpoint."""
    weights = load_file(str(pointed(run_dir / "checkpoints", "latest") / "model.safetensors"))
    return {k.rsplit(".", 1)[1]: v for k, v in weights.items() if k.startswith("objective.losses.crd.")}


@pytest.mark.slow
def test_crd_recipe_runs_and_resumes_with_its_state(tiny_kd: dict) -> None:
    tiny_kd["distill"].append({"loss": "crd", "weight": 0.8, "num_negatives": 64})
    recipe = recipe_from_dict(tiny_kd, ["train.epochs=1"])
    run_recipe(recipe)
    first = crd_state(recipe.run_dir)
    assert torch.isfinite(first["log_z"]).all()  # Z estimated on the first batch
    resumed = run_recipe(recipe_from_dict(tiny_kd, ["train.epochs=2"]), resume=True)
    assert resumed["epochs"] == 2
    second = crd_state(recipe.run_dir)
    # Z is estimated once, on the first batch: a resumed run keeps the saved one (a lost state re-estimates it)
    assert torch.equal(second["log_z"], first["log_z"])
    assert not torch.equal(second["memory_s"], first["memory_s"])  # ...and keeps filling the saved queue
