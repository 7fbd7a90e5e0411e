"""How well WAD's knowledge filters the unseen classes of a class-mismatch pool, for a recipe's representation.

Usage: ``.venv/bin/python scripts/wad_diagnostics.py RECIPE [key=value ...] [--run RUN_DIR]`` (e.g.
``recipes/class_mismatch/wad_contrastive.yaml`` or ``recipes/class_mismatch/wad.yaml
teacher.checkpoint=runs/bench_class_mismatch/teacher/model.safetensors``).

The pool's true classes are never given to training; this script recovers them from the raw dataset (matching each
pool image's bytes) only to report, on the unlabelled pool: the share of known-class images whose pseudo-label is
right, the mean weight of known-class and unseen-class images, and the AUROC of the weight separating the two (0.5:
the weights do not tell them apart). With ``--run RUN_DIR`` (a finished ``wad.rounds`` run of that recipe), also the
pool images its rounds promoted into the labelled set (read from the run's latest checkpoint): how many, how many of
an unseen class, and how many of the known ones carry the right label.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

from kdkit.build import plan
from kdkit.checkpoint import WEIGHTS, pointed, read_weights
from kdkit.data import UNLABELLED
from kdkit.data.registry import load_dataset
from kdkit.method import METHODS
from kdkit.recipe import load_recipe


def promoted_labels(run_dir: str) -> torch.Tensor:
    """Every training sample's label after the rounds of a finished run (its latest checkpoint's WAD state)."""
    folder = pointed(Path(run_dir) / "checkpoints", "latest")
    if folder is None:
        raise SystemExit(f"{run_dir}: no checkpoints/latest.json; give the folder of a finished wad.rounds run")
    tensors, _ = read_weights(folder / WEIGHTS)
    if "extra.wad_rounds.labels" not in tensors:
        raise SystemExit(f"{folder}: no WAD rounds state (extra.wad_rounds.labels); was the run's wad.rounds > 1?")
    return tensors["extra.wad_rounds.labels"]


def main(argv: list[str]) -> None:
    run_dir = None
    if "--run" in argv:
        at = argv.index("--run")
        run_dir, argv = argv[at + 1], argv[:at] + argv[at + 2:]
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
    print(f"before training: {run.facts}")
    print(f"pool: {int(is_known.sum())} known-class, {int((~is_known).sum())} unseen-class images")
    print(f"pseudo-labels right on known-class pool images: {100 * float(right[is_known].float().mean()):.1f} %")
    print(f"mean weight: known {float(weight[is_known].mean()):.4f}, unseen {float(weight[~is_known].mean()):.4f}")
    print(f"AUROC of the weight (known vs unseen): {roc_auc_score(is_known.numpy(), weight.numpy()):.3f}")
    if run_dir is not None:
        final = promoted_labels(run_dir)[unlabelled.cpu()]
        promoted = final != UNLABELLED
        labels = torch.tensor([relabel.get(int(t), -1) for t in truth])
        print(f"promoted by the rounds: {int(promoted.sum())} of {len(promoted)} pool images; "
              f"{int((promoted & ~is_known).sum())} of an unseen class "
              f"({100 * float((~is_known[promoted]).float().mean()):.1f} %; pool: "
              f"{100 * float((~is_known).float().mean()):.1f} %); "
              f"known ones labelled right: {100 * float((final == labels)[promoted & is_known].float().mean()):.1f} %")


if __name__ == "__main__":
    main(sys.argv[1:])
