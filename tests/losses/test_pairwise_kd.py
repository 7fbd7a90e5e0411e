"""Pair-wise KD against a loop transcription of the official pooling and similarity code, plus property tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdkit.losses.pairwise_kd import PairwiseKDLoss, pairwise_kd_loss, pool_nodes


def max_pool_ceil(f: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """Max over ``kh x kw`` windows with that stride, the last partial window kept (ceil_mode)."""
    n, c, h, w = f.shape
    rows, cols = math.ceil(h / kh), math.ceil(w / kw)
    out = np.empty((n, c, rows, cols))
    for r in range(rows):
        for q in range(cols):
            out[:, :, r, q] = f[:, :, r * kh:(r + 1) * kh, q * kw:(q + 1) * kw].max(axis=(2, 3))
    return out


def pairwise_reference(f_s: np.ndarray, f_t: np.ndarray, scale: float) -> float:
    """1/N sum_n 1/M^2 sum_ij (cos_s(i, j) - cos_t(i, j))^2 over the pooled nodes, norms + 1e-8 as the official."""
    kh, kw = max(1, int(f_t.shape[2] * scale)), max(1, int(f_t.shape[3] * scale))
    total = 0.0
    nodes_s, nodes_t = max_pool_ceil(f_s, kh, kw), max_pool_ceil(f_t, kh, kw)
    for ns, nt in zip(nodes_s, nodes_t, strict=True):
        vs, vt = ns.reshape(ns.shape[0], -1).T, nt.reshape(nt.shape[0], -1).T  # (M, C)
        m = len(vs)
        for i in range(m):
            for j in range(m):
                cs = vs[i] @ vs[j] / ((np.linalg.norm(vs[i]) + 1e-8) * (np.linalg.norm(vs[j]) + 1e-8))
                ct = vt[i] @ vt[j] / ((np.linalg.norm(vt[i]) + 1e-8) * (np.linalg.norm(vt[j]) + 1e-8))
                total += (cs - ct) ** 2 / m**2
    return total / len(f_s)


@pytest.mark.parametrize(("shape", "scale", "nodes"),
                         [((8, 8), 0.5, 4), ((7, 7), 0.5, 9), ((12, 12), 0.25, 16), ((6, 6), 1 / 6, 36)])
def test_pairwise_matches_the_official_computation(shape: tuple[int, int], scale: float, nodes: int) -> None:
    gen = torch.Generator().manual_seed(0)
    f_s = torch.randn(2, 3, *shape, generator=gen, dtype=torch.float64)
    f_t = torch.randn(2, 5, *shape, generator=gen, dtype=torch.float64)  # widths may differ
    assert pool_nodes(f_t, scale).shape[2] * pool_nodes(f_t, scale).shape[3] == nodes
    got = pairwise_kd_loss(f_s, f_t, scale).item()
    assert got == pytest.approx(pairwise_reference(f_s.numpy(), f_t.numpy(), scale), rel=1e-10)
    assert pairwise_kd_loss(f_s, f_t, scale, detach_norm=False).item() == pytest.approx(got, rel=1e-12)


def test_zero_when_the_node_geometry_agrees() -> None:
    gen = torch.Generator().manual_seed(1)
    f = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64).relu()
    # a permutation and duplication of channels and a positive scale keep every cosine: nothing to distil
    other = torch.cat([f[:, [2, 0, 3, 1]], f[:, :2] * 0], dim=1) * 7.0
    assert pairwise_kd_loss(f, f.clone(), 1 / 8).item() == pytest.approx(0.0, abs=1e-12)
    assert pairwise_kd_loss(f, other, 1 / 8).item() == pytest.approx(0.0, abs=1e-12)
    assert pairwise_kd_loss(f, torch.randn(2, 6, 8, 8, generator=gen, dtype=torch.float64), 1 / 8).item() > 1e-3


def test_detach_norm_changes_the_gradient_not_the_value() -> None:
    gen = torch.Generator().manual_seed(2)
    f_t = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    grads = []
    for detach in (True, False):
        f_s = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64,
                          requires_grad=True)
        pairwise_kd_loss(f_s, f_t, 0.5, detach_norm=detach).backward()
        grads.append(f_s.grad)
    assert not torch.allclose(grads[0], grads[1])
    # the paper's cosine gradient is orthogonal to each node vector (a cosine ignores a node's length)
    nodes = torch.randn(1, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    pairwise_kd_loss(nodes, torch.randn(1, 3, 2, 2, dtype=torch.float64), 0.5, detach_norm=False).backward()
    radial = (nodes.grad * nodes.detach()).sum(1)
    assert nodes.grad.abs().max() > 1e-3  # up to the norms' 1e-8 epsilon
    torch.testing.assert_close(radial, torch.zeros_like(radial), atol=1e-7, rtol=0)


def test_precision_gradients_and_shapes() -> None:
    f_s, f_t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    assert pairwise_kd_loss(f_s.double(), f_t.double()).dtype == torch.float64
    assert pairwise_kd_loss(f_s.bfloat16(), f_t.bfloat16()).dtype == torch.float32
    dead = torch.zeros(2, 3, 4, 4, requires_grad=True)  # all-zero nodes (dead ReLUs): the norm's epsilon
    pairwise_kd_loss(dead, f_t, detach_norm=False).backward()
    assert torch.isfinite(dead.grad).all()
    assert PairwiseKDLoss(scale=0.25)(f_s, f_t, torch.zeros(2)).item() == pairwise_kd_loss(f_s, f_t, 0.25).item()
    assert PairwiseKDLoss().check_shapes((3, 4, 4), (5, 4, 4)) is None
    assert "map size" in PairwiseKDLoss().check_shapes((3, 4, 4), (5, 2, 2))
    with pytest.raises(ValueError, match="one N, H and W"):
        pairwise_kd_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 5, 5))
