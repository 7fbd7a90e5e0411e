"""How well WAD's knowledge filters the unseen classes of a class-mismatch pool, for a recipe's representation.

Usage: ``.venv/bin/python scripts/wad_diagnostics.py RECIPE [key=value ...]`` (e.g.
``recipes/class_mismatch/wad_contrastive.yaml`` or ``recipes/class_mismatch/wad.yaml
teacher.checkpoint=runs/bench_class_mismatch/teacher/model.safetensors``).

The pool's true classes are never given to training; this script recovers them from the raw dataset (matching each
pool image's bytes) only to report, on the unlabelled pool: the share of known-class images whose pseudo-label is
right, the mean weight of known-class and unseen-class images, and the AUROC of the weight separating the two (0.5:
the weights do not tell them apart).
"""

from __future__ import annotations

import sys

import torch
from sklearn.metrics import roc_auc_score

from kdkit.build import plan
from kdkit.data import UNLABELLED
from kdkit.data.registry import load_dataset
from kdkit.method import METHODS
from kdkit.recipe import load_recipe


def main(argv: list[str]) -> None:
    recipe = load_recipe(argv[0], argv[1:])
    built = plan(recipe, training=True)
    run = METHODS.get("wad").attach(built, None)
    loss = built.objective.terms[0].loss
    data = built.data
    raw = load_dataset(recipe.data.dataset, recipe.data.root, **recipe.data.params)
    truth_of = {bytes(img.numpy().tobytes()): int(label) for img, label in zip(raw.train_images, raw.train_labels,
                                                                              strict=True)}
    known = recipe.data.setting.params.get("known") or tuple(range(round(0.6 * raw.num_classes)))
    unlabelled = (data.train_labels == UNLABELLED).nonzero().squeeze(1)
    truth = torch.tensor([truth_of[bytes(data.train_images[i].numpy().tobytes())] for i in unlabelled.tolist()])
    is_known = torch.isin(truth, torch.tensor(known))
    relabel = {old: new for new, old in enumerate(known)}
    right = torch.tensor([relabel.get(int(t), -1) for t in truth]) == loss.pseudo[unlabelled].cpu()
    weight = loss.weight[unlabelled].cpu()
    print(f"recipe {argv[0]} {' '.join(argv[1:])}")
    print(f"summary: {run.summary(None)}")
    print(f"pool: {int(is_known.sum())} known-class, {int((~is_known).sum())} unseen-class images")
    print(f"pseudo-labels right on known-class pool images: {100 * float(right[is_known].float().mean()):.1f} %")
    print(f"mean weight: known {float(weight[is_known].mean()):.4f}, unseen {float(weight[~is_known].mean()):.4f}")
    print(f"AUROC of the weight (known vs unseen): {roc_auc_score(is_known.numpy(), weight.numpy()):.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
