"""ImageData validation, subset and the dataset registry."""

from __future__ import annotations

import pytest
import torch

from kdkit.data import DATASETS, ImageData, load_dataset, subset
from kdkit.errors import KdkitError


def make_data(n_per_class: tuple[int, ...] = (10, 20, 30), channels: int = 1) -> ImageData:
    labels = torch.cat([torch.full((n,), k, dtype=torch.int64) for k, n in enumerate(n_per_class)])
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, channels, 4, 4).clone()
    return ImageData(name="toy", train_images=images, train_labels=labels, test_images=images[:5],
                     test_labels=labels[:5], classes=tuple(f"k{i}" for i in range(len(n_per_class))),
                     mean=(0.5,) * channels, std=(0.25,) * channels, source="memory")


def test_properties_and_repr() -> None:
    data = make_data(channels=3)
    assert (data.num_classes, data.in_channels, data.image_size) == (3, 3, 4)
    assert "toy" in repr(data) and "(60, 3, 4, 4)" in repr(data)


def test_validation_errors() -> None:
    good = make_data()
    kw = {"name": "bad", "train_images": good.train_images, "train_labels": good.train_labels,
          "test_images": good.test_images, "test_labels": good.test_labels, "classes": good.classes,
          "mean": good.mean, "std": good.std, "source": "x"}
    with pytest.raises(KdkitError, match="uint8"):
        ImageData(**{**kw, "train_images": good.train_images.float()})
    with pytest.raises(KdkitError, match="int64"):
        ImageData(**{**kw, "train_labels": good.train_labels.int()})
    with pytest.raises(KdkitError, match="labels"):
        ImageData(**{**kw, "train_labels": good.train_labels[:-1]})
    with pytest.raises(KdkitError, match="square"):
        ImageData(**{**kw, "train_images": good.train_images[:, :, :3], "test_images": good.test_images[:, :, :3]})
    with pytest.raises(KdkitError, match="channels"):
        ImageData(**{**kw, "mean": (0.1, 0.2)})
    with pytest.raises(KdkitError, match="classes"):
        ImageData(**{**kw, "classes": ("a", "b")})
    non_contig = good.train_images.transpose(2, 3)
    assert ImageData(**{**kw, "train_images": non_contig}).train_images.is_contiguous()


def test_subset_balanced_and_deterministic() -> None:
    data = make_data((10, 20, 30))
    s = subset(data, 12, seed=3)
    assert torch.bincount(s.train_labels).tolist() == [4, 4, 4]
    assert torch.equal(s.train_images, subset(data, 12, seed=3).train_images)
    assert not torch.equal(s.train_images, subset(data, 12, seed=4).train_images)
    assert s.test_images is data.test_images and "subset" in s.name and "12" in s.source
    # images stay paired with their labels and in original order
    idx = s.train_images[:, 0, 0, 0].long()
    assert torch.equal(data.train_labels[idx], s.train_labels) and torch.all(idx.diff() > 0)
    # remainder: counts differ by at most one
    assert sorted(torch.bincount(subset(data, 14, seed=0).train_labels).tolist()) == [4, 5, 5]
    # a small class gives all it has; the others make up the rest
    assert torch.bincount(subset(data, 45, seed=0).train_labels).tolist() == [10, 17, 18]
    assert len(subset(data, 60, seed=0).train_labels) == 60


def test_subset_bad_n() -> None:
    data = make_data()
    for n in (61, 2, 0):
        with pytest.raises(KdkitError, match="subset size"):
            subset(data, n, seed=0)


def test_registry() -> None:
    assert {"fashion_mnist", "mnist", "digits", "cifar10", "cifar100", "image_folder"} <= set(DATASETS.names())
    with pytest.raises(KdkitError, match="unknown dataset") as info:
        load_dataset("fashion_mnst")
    assert info.value.choices[0] == "fashion_mnist" and info.value.where == "data.dataset"
