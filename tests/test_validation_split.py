"""``data.validation``: a run evaluates on a held-out part of its training split and never reads the test split
(what ``kdkit sweep`` scores its trials on)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from kdkit import build
from kdkit.data import hold_out, load_dataset
from kdkit.data.loader import BatchLoader
from kdkit.errors import KdkitError
from kdkit.recipe import recipe_from_dict
from kdkit.runner import run_recipe

MARK = 7  # every test image is this one flat grey value, which no digits training image is


def marked_digits(*args: Any, **kwargs: Any) -> Any:
    """digits whose test split is flat MARK images: any test image read later is recognisable."""
    from dataclasses import replace

    data = load_dataset(*args, **kwargs)
    assert not bool((data.train_images == MARK).flatten(1).all(1).any())
    return replace(data, test_images=torch.full_like(data.test_images, MARK))


def reads_test_images(images: torch.Tensor) -> bool:
    return bool((images == MARK).flatten(1).all(1).any())


def test_hold_out_is_class_balanced_disjoint_and_deterministic() -> None:
    data = load_dataset("digits")
    a, b, c = hold_out(data, 0.2, 0), hold_out(data, 0.2, 0), hold_out(data, 0.2, 1)
    n = round(len(data.train_labels) * 0.2)
    assert len(a.test_labels) == n and len(a.train_labels) == len(data.train_labels) - n
    assert torch.equal(a.test_images, b.test_images) and not torch.equal(a.test_images, c.test_images)
    counts = torch.bincount(a.test_labels, minlength=10)
    assert int(counts.max() - counts.min()) <= 1
    # the two parts together are exactly the training images, each once
    joined = torch.cat([a.train_images, a.test_images]).flatten(1)
    assert sorted(map(bytes, joined.numpy())) == sorted(map(bytes, data.train_images.flatten(1).numpy()))


def test_a_fraction_leaving_a_class_without_images_is_refused() -> None:
    with pytest.raises(KdkitError, match=r"data\.validation\.fraction"):
        hold_out(load_dataset("digits"), 0.001, 0)


@pytest.mark.slow
@pytest.mark.parametrize("validation", [True, False])
def test_a_run_with_a_validation_split_never_reads_the_test_split(
        tiny: dict, monkeypatch: pytest.MonkeyPatch, validation: bool) -> None:
    loaded: list[torch.Tensor] = []
    real_init = BatchLoader.__init__

    def spy(self: BatchLoader, images: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        loaded.append(images)
        real_init(self, images, *args, **kwargs)

    monkeypatch.setattr(build, "load_dataset", marked_digits)
    monkeypatch.setattr(BatchLoader, "__init__", spy)
    tiny["train"]["epochs"] = 1
    if validation:
        tiny["data"]["validation"] = {"fraction": 0.2, "seed": 0}
    recipe = recipe_from_dict(tiny)
    summary = run_recipe(recipe)
    samples = load_file(str(Path(tiny["output"]["dir"]) / "deploy_samples.safetensors"))["images"]
    touched = any(reads_test_images(images) for images in loaded) or reads_test_images(samples)
    # the control run (no validation) does read the marked test split: the spy would see a leak
    assert touched is not validation
    assert summary["test_samples"] == (40 if validation else 360)
    assert json.loads((recipe.run_dir / "summary.json").read_text())["recipe_digest"] == recipe.digest()
