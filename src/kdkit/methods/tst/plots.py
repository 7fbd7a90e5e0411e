"""TST's visual analysis: the learned probabilities and magnitudes over epochs, and samples the policy makes.

The paper plots how the probabilities and magnitudes of the operations move during distillation;
:func:`plot_policy` draws the same from a run's ``tst_policy.jsonl``. :func:`plot_samples` shows
training images next to several draws of the policy's augmentation of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from kdkit.methods.tst.policy import AugmentPolicy, batch_generator


def read_policy_log(path: Path) -> list[dict]:
    """Rows of ``tst_policy.jsonl``, one per epoch (the last row of an epoch wins: a resumed run may
    have written one twice)."""
    rows: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[int(row["epoch"])] = row
    return [rows[e] for e in sorted(rows)]


def plot_policy(log: Path, out: Path, policy_epochs: list[int] | None = None) -> Path:
    """Two panels (probabilities; magnitudes) of every operation against the epoch; policy phases are
    marked with vertical lines. Returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_policy_log(log)
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, kind in zip(axes, ("probabilities", "magnitudes"), strict=True):
        names = list(rows[0][kind]) if rows else []
        cmap = plt.get_cmap("tab20")
        for i, name in enumerate(names):
            ax.plot(epochs, [r[kind][name] for r in rows], marker=".", label=name, color=cmap(i % 20))
        for e in policy_epochs or []:
            ax.axvline(e, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("epoch (dotted: policy trained at the start of that epoch)")
        ax.set_ylabel("probability" if kind == "probabilities" else "magnitude (fraction of AutoAugment's max)")
        ax.set_title(f"learned {kind}")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2, loc="best")
    axes[1].legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@torch.no_grad()
def plot_samples(policy: AugmentPolicy, x: Tensor, out: Path, seed: int = 0, draws: int = 3) -> Path:
    """A grid: each row is one training image (normalised batch ``x``), then ``draws`` augmentations
    of it by the policy (each draw picks its own operations). Returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, std = policy.mean.to(x.device), policy.std.to(x.device)
    columns = [x] + [policy(x, batch_generator(seed, -1, d, stream=99)) for d in range(draws)]
    images = [(c.float() * std + mean).clamp(0, 1).cpu() for c in columns]
    n = x.shape[0]
    fig, axes = plt.subplots(n, draws + 1, figsize=(1.6 * (draws + 1), 1.6 * n), squeeze=False)
    for i in range(n):
        for j, batch in enumerate(images):
            img = batch[i].permute(1, 2, 0).numpy()
            ax = axes[i][j]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("original" if j == 0 else f"policy draw {j}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
