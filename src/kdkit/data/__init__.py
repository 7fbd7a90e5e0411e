"""Datasets held in memory as uint8 tensors, and batched tensor augmentation.

Importing this package registers every reader: ``fashion_mnist``, ``mnist``, ``digits``, ``cifar10``,
``cifar100`` and ``image_folder``. Load one with :func:`load_dataset`.
"""

from __future__ import annotations

from kdkit.data import cifar, digits, folder, idx  # noqa: F401 - imported to register the readers
from kdkit.data.augment import AugmentConfig, normalize, random_crop, random_hflip
from kdkit.data.base import ImageData, subset
from kdkit.data.idx import read_idx, write_idx
from kdkit.data.registry import DATASETS, load_dataset, register_dataset

__all__ = [
    "DATASETS",
    "AugmentConfig",
    "ImageData",
    "load_dataset",
    "normalize",
    "random_crop",
    "random_hflip",
    "read_idx",
    "register_dataset",
    "subset",
    "write_idx",
]
