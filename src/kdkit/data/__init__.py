"""Datasets held in memory as uint8 tensors, and batched tensor augmentation.

Importing this package registers every reader: ``fashion_mnist``, ``mnist``, ``digits``, ``cifar10``,
``cifar100``, ``image_folder``, ``fashion_mnist_scenes`` (:mod:`kdkit.data.scenes`: canvases of several
real Fashion-MNIST objects with multi-label, mask and box targets), and the readers of users' dense data in the
standard formats with the same targets (:mod:`kdkit.data.dense`): ``coco``, ``voc`` and ``mask_folder``.
Load one with :func:`load_dataset`.
Settings (:mod:`kdkit.data.settings`) turn a dataset into a data scenario: few labels, a long tail, novel classes...
"""

from __future__ import annotations

from kdkit.data import (  # noqa: F401 - imported to register them
    cifar,
    coco,
    digits,
    folder,
    idx,
    mask_folder,
    scenes,
    settings,
    voc,
)
from kdkit.data.augment import AugmentConfig, normalize, random_crop, random_hflip
from kdkit.data.base import UNLABELLED, ImageData, hold_out, subset
from kdkit.data.idx import read_idx, write_idx
from kdkit.data.loader import map_images
from kdkit.data.registry import DATASETS, load_dataset, register_dataset
from kdkit.data.settings import SETTINGS, apply_setting, register_setting

__all__ = [
    "DATASETS",
    "SETTINGS",
    "UNLABELLED",
    "AugmentConfig",
    "ImageData",
    "apply_setting",
    "hold_out",
    "load_dataset",
    "map_images",
    "normalize",
    "random_crop",
    "random_hflip",
    "read_idx",
    "register_dataset",
    "register_setting",
    "subset",
    "write_idx",
]
