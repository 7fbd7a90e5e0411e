"""PCKA against a per-channel, per-patch loop computation of the patch Gram CKA, plus property tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdkit.losses.pcka import PCKALoss, pcka_loss


def centred_cka(k: np.ndarray, ll: np.ndarray, centered: bool) -> float:
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n if centered else np.eye(n)
    kc, lc = h @ k @ h, h @ ll @ h
    return float(np.sum(kc * lc) / np.sqrt(np.sum(kc * kc) * np.sum(lc * lc)))


def pcka_reference(s: np.ndarray, t: np.ndarray, ph: int, pw: int, centered: bool) -> float:
    """Per channel: one vector per patch position (its values for every image), Gram over positions, CKA."""
    b, c, h, w = s.shape
    sims = []
    for ch in range(c):
        rows_s, rows_t = [], []
        for u in range(h // ph):
            for v in range(w // pw):
                rows_s.append(np.concatenate([s[i, ch, u * ph:(u + 1) * ph, v * pw:(v + 1) * pw].ravel()
                                              for i in range(b)]))
                rows_t.append(np.concatenate([t[i, ch, u * ph:(u + 1) * ph, v * pw:(v + 1) * pw].ravel()
                                              for i in range(b)]))
        n = len(rows_s)
        k = np.array([[rows_s[i] @ rows_s[j] for j in range(n)] for i in range(n)])
        ll = np.array([[rows_t[i] @ rows_t[j] for j in range(n)] for i in range(n)])
        sims.append(centred_cka(k, ll, centered))
    return 1.0 - float(np.mean(sims))


def maps(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64)
    return t + torch.randn(*shape, generator=g, dtype=torch.float64), t


@pytest.mark.parametrize("centered", [True, False])
def test_pcka_matches_loop_reference(centered: bool) -> None:
    s, t = maps((2, 3, 8, 12), seed=0)
    got = pcka_loss(s, t, patch_size=4, centered=centered).item()
    assert got == pytest.approx(pcka_reference(s.numpy(), t.numpy(), 4, 4, centered), rel=1e-9)


def test_pcka_resizes_remainders_up_to_the_next_multiple() -> None:
    s, t = maps((2, 2, 10, 13), seed=1)
    rs = F.interpolate(s, size=(12, 16), mode="bilinear", align_corners=False)
    rt = F.interpolate(t, size=(12, 16), mode="bilinear", align_corners=False)
    expected = pcka_reference(rs.numpy(), rt.numpy(), 4, 4, True)
    assert pcka_loss(s, t, patch_size=4).item() == pytest.approx(expected, rel=1e-9)


def test_pcka_short_side_is_one_patch() -> None:
    s, t = maps((2, 2, 3, 16), seed=2)  # H = 3 < patch 4: patches are 3 x 4, a 1 x 4 grid
    assert pcka_loss(s, t, patch_size=4).item() == pytest.approx(pcka_reference(s.numpy(), t.numpy(), 3, 4, True),
                                                                 rel=1e-9)


def test_pcka_too_few_patches_is_an_error() -> None:
    s, t = maps((2, 2, 8, 8), seed=3)
    with pytest.raises(ValueError, match="smaller patch_size"):
        pcka_loss(s, t, patch_size=16)  # one patch
    with pytest.raises(ValueError, match="smaller patch_size"):
        pcka_loss(s, t, patch_size=8)  # one patch again
    s2, t2 = maps((2, 2, 4, 8), seed=4)  # two patches: centred CKA would be identically 1
    with pytest.raises(ValueError):
        pcka_loss(s2, t2, patch_size=4)
    assert pcka_loss(s2, t2, patch_size=4, centered=False).item() > 0


def test_pcka_zero_at_identity_and_channel_scale_invariant() -> None:
    s, t = maps((3, 4, 8, 8), seed=5)
    assert pcka_loss(t, t.clone(), patch_size=4).item() == pytest.approx(0.0, abs=1e-9)
    scales = torch.tensor([0.5, 2.0, 7.0, 0.1], dtype=torch.float64).view(1, 4, 1, 1)
    assert pcka_loss(s * scales, t, patch_size=4).item() == pytest.approx(pcka_loss(s, t, patch_size=4).item(),
                                                                           rel=1e-9)


def test_pcka_invariant_to_batch_permutation() -> None:
    s, t = maps((4, 2, 8, 8), seed=6)
    perm = torch.tensor([2, 0, 3, 1])
    assert pcka_loss(s[perm], t[perm], patch_size=4).item() == pytest.approx(pcka_loss(s, t, patch_size=4).item(),
                                                                             rel=1e-9)


def test_pcka_finite_gradients() -> None:
    s, t = maps((2, 3, 8, 8), seed=7)
    s = s.float().requires_grad_(True)
    loss = pcka_loss(s, t.float(), patch_size=4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_pcka_bfloat16() -> None:
    s, t = maps((2, 3, 8, 8), seed=8)
    got = pcka_loss(s.bfloat16(), t.bfloat16(), patch_size=4)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got)
    assert got.float().item() == pytest.approx(pcka_loss(s.float(), t.float(), patch_size=4).item(), abs=0.02)


def test_pcka_module_shapes_and_bad_params() -> None:
    s, t = maps((2, 3, 8, 8), seed=9)
    labels = torch.zeros(2, dtype=torch.long)
    assert PCKALoss(patch_size=4)(s, t, labels).item() == pytest.approx(pcka_loss(s, t, 4).item())
    module = PCKALoss(patch_size=4)
    assert module.check_shapes((3, 8, 8), (3, 8, 8)) is None
    assert "3 and 5 channels" in (module.check_shapes((3, 8, 8), (5, 8, 8)) or "")
    assert "spatial" in (module.check_shapes((3, 8, 8), (3, 4, 4)) or "")
    assert "(C, H, W)" in (module.check_shapes((3,), (3,)) or "")
    assert "smaller patch_size" in (PCKALoss().check_shapes((3, 8, 8), (3, 8, 8)) or "")
    with pytest.raises(ValueError, match="patch_size"):
        PCKALoss(patch_size=0)
    with pytest.raises(ValueError, match="same shape"):
        pcka_loss(s, t[:, :2], 4)
