"""FGD against a transcription of the official code's loops (and the paper's mask), and its properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdkit.errors import KdkitError
from kdkit.losses import LOSSES
from kdkit.losses.fgd import box_masks


def official_masks(boxes: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official code's mask loop (yzd-v/FGD fgd.py), boxes given in pixels of a 1 x 1 image."""
    fg = torch.zeros(len(boxes), h, w, dtype=torch.float64)
    bg = torch.ones(len(boxes), h, w, dtype=torch.float64)
    for i, image in enumerate(boxes):
        real = image[image[:, 4] >= 0]
        wmin, wmax = torch.floor(real[:, 0] * w).int(), torch.ceil(real[:, 2] * w).int()
        hmin, hmax = torch.floor(real[:, 1] * h).int(), torch.ceil(real[:, 3] * h).int()
        area = 1.0 / (hmax + 1 - hmin).double() / (wmax + 1 - wmin).double()
        for j in range(len(real)):
            region = fg[i][wmin[j]:wmax[j] + 1, hmin[j]:hmax[j] + 1]
            fg[i][wmin[j]:wmax[j] + 1, hmin[j]:hmax[j] + 1] = torch.maximum(region, area[j].double())
        bg[i] = torch.where(fg[i] > 0, 0.0, 1.0)
        if bg[i].sum():
            bg[i] /= bg[i].sum()
    return fg, bg


def paper_masks(boxes: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's masks, cell by cell: a cell is in a box when it overlaps it."""
    fg = torch.zeros(len(boxes), h, w, dtype=torch.float64)
    for i, image in enumerate(boxes):
        for x0, y0, x1, y1, label in image.tolist():
            if label < 0:
                continue
            rows = [r for r in range(h) if r < y1 * h and r + 1 > y0 * h]
            cols = [c for c in range(w) if c < x1 * w and c + 1 > x0 * w]
            for r in rows:
                for c in cols:
                    fg[i, r, c] = max(fg[i, r, c], 1.0 / (len(rows) * len(cols)))
    bg = (fg == 0).double()
    return fg, bg / bg.sum((1, 2), keepdim=True).clamp(min=1)


BOXES = torch.tensor([[[0.10, 0.20, 0.55, 0.40, 1.0], [0.3, 0.3, 0.9, 0.95, 0.0], [0, 0, 0, 0, -1]],
                      [[0.0, 0.0, 1.0, 1.0, 2.0], [0, 0, 0, 0, -1], [0, 0, 0, 0, -1]]], dtype=torch.float64)


@pytest.mark.parametrize(("layout", "reference"), [("paper", paper_masks), ("official", official_masks)])
def test_masks_match_the_paper_and_the_official_loop(layout: str, reference) -> None:
    fg, bg = box_masks(BOXES, 8, 8, layout)
    ref_fg, ref_bg = reference(BOXES, 8, 8)
    torch.testing.assert_close(fg, ref_fg)
    torch.testing.assert_close(bg, ref_bg)
    assert not torch.equal(box_masks(BOXES, 8, 8, "paper")[0], box_masks(BOXES, 8, 8, "official")[0])


def official_fgd(fgd, s: torch.Tensor, t: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The official FeatureLoss.forward transcribed (sqrt-weighted MSE sums), with this loss's modules."""
    s = fgd.align[0](s)
    n, c, h, w = s.shape

    def att(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = x.abs()
        sp = (h * w * F.softmax((v.mean(1, keepdim=True) / fgd.temperature).view(n, -1), dim=1)).view(n, h, w)
        ch = c * F.softmax(v.mean(2).mean(2) / fgd.temperature, dim=1)
        return sp, ch

    st, ct = att(t)
    ss, cs = att(s)
    fg, bg = official_masks(boxes, h, w)
    mse = torch.nn.MSELoss(reduction="sum")
    ft = t * st.unsqueeze(1).sqrt() * ct[..., None, None].sqrt()
    fs = s * st.unsqueeze(1).sqrt() * ct[..., None, None].sqrt()
    fg_l = mse(fs * fg.unsqueeze(1).sqrt(), ft * fg.unsqueeze(1).sqrt()) / n
    bg_l = mse(fs * bg.unsqueeze(1).sqrt(), ft * bg.unsqueeze(1).sqrt()) / n
    at_l = (cs - ct).abs().sum() / n + (ss - st).abs().sum() / n

    def gc(block, x: torch.Tensor) -> torch.Tensor:
        mask = F.softmax(block.key(x).view(n, 1, h * w), dim=2).unsqueeze(-1)
        context = torch.matmul(x.view(n, c, h * w).unsqueeze(1), mask).view(n, c, 1, 1)
        return x + block.transform(context)

    rel = mse(gc(fgd.global_s[0], s), gc(fgd.global_t[0], t)) / n
    return fgd.alpha * fg_l + fgd.beta * bg_l + fgd.gamma * at_l + fgd.lambda_ * rel


def test_fgd_equals_the_official_computation_in_float64() -> None:
    torch.manual_seed(0)
    fgd = LOSSES.get("fgd")(box_mask="official", alpha=1.0, beta=0.5, gamma=0.3, lambda_=0.2)
    fgd.setup((4, 8, 8), (6, 8, 8), num_samples=10)
    fgd.double()
    for module in (fgd.global_s[0].transform[-1], fgd.global_t[0].transform[-1]):  # non-zero, so R is exercised
        torch.nn.init.normal_(module.weight)
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 6, 8, 8, generator=gen, dtype=torch.float64)
    value = fgd(s, t, BOXES)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, official_fgd(fgd, s, t, BOXES), rtol=1e-12, atol=1e-12)
    value.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_fgd_is_zero_for_identical_maps_and_sums_the_levels() -> None:
    fgd = LOSSES.get("fgd")()
    fgd.setup([(4, 8, 8), (4, 4, 4)], [(4, 8, 8), (4, 4, 4)], num_samples=10)
    gen = torch.Generator().manual_seed(2)
    maps = [torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)]
    boxes = BOXES.float()
    assert fgd(maps, maps, boxes).abs().item() < 1e-9  # same widths: no align; R starts as the identity
    other = [m + 1.0 for m in maps]
    both = fgd(other, maps, boxes)
    assert both.item() == pytest.approx(fgd.level(0, other[0], maps[0], boxes).item()
                                        + fgd.level(1, other[1], maps[1], boxes).item(), rel=1e-6)
    assert both > 0 and math.isfinite(both.item())


def test_fgd_needs_detection_targets() -> None:
    fgd = LOSSES.get("fgd")()
    fgd.setup((4, 4, 4), (4, 4, 4), num_samples=1)
    with pytest.raises(KdkitError, match="task: detection"):
        fgd(torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([1, 2]))
