"""The zero-setup digits dataset."""

from __future__ import annotations

import pytest
import torch

from kdkit.data import load_dataset
from kdkit.errors import KdkitError


def test_digits_default() -> None:
    data = load_dataset("digits")
    assert data.train_images.shape == (1437, 1, 8, 8) and data.test_images.shape == (360, 1, 8, 8)
    assert data.train_images.dtype == torch.uint8 and int(data.train_images.max()) == 255
    assert data.classes == tuple(str(i) for i in range(10))
    # stratified: each class has ~20% of its samples in the test split
    train_counts = torch.bincount(data.train_labels, minlength=10)
    test_counts = torch.bincount(data.test_labels, minlength=10)
    frac = test_counts.double() / (train_counts + test_counts).double()
    assert torch.all((frac - 0.2).abs() < 0.01)
    # values are round(v * 255 / 16) for integer v in 0..16
    allowed = {round(v * 255 / 16) for v in range(17)}
    assert set(data.train_images.unique().tolist()) <= allowed
    assert 0 < data.mean[0] < 1 and 0 < data.std[0] < 1


def test_digits_deterministic_and_seeded() -> None:
    a, b = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(a.train_labels, b.train_labels) and torch.equal(a.test_images, b.test_images)
    c = load_dataset("digits", seed=1, test_fraction=0.5)
    assert c.test_images.shape[0] > 850 and not torch.equal(a.test_labels[:50], c.test_labels[:50])


def test_digits_resized() -> None:
    data = load_dataset("digits", image_size=28)
    assert data.train_images.shape == (1437, 1, 28, 28) and data.image_size == 28
    assert data.train_images.dtype == torch.uint8


def test_digits_rejects_root_and_bad_params() -> None:
    with pytest.raises(KdkitError, match="needs no root"):
        load_dataset("digits", root="/tmp")
    with pytest.raises(KdkitError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.5)
    with pytest.raises(KdkitError, match="image_sise") as info:
        load_dataset("digits", image_sise=28)
    assert info.value.choices[0] == "image_size"
