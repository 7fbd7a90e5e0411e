"""Settings: data scenarios built from a dataset, deterministic by seed (``data.setting:`` in a recipe).

One module per setting, each registering itself in :data:`SETTINGS`: ``semi_supervised``, ``class_mismatch``,
``long_tailed``, ``novel_classes``, ``few_classes``, ``pruned``, ``shifted``, ``two_modalities``,
``class_incremental``. Unlabelled
training samples carry :data:`kdkit.data.base.UNLABELLED`. See ``docs/settings.md``.
"""

from kdkit.data.settings import (  # noqa: F401 - each module registers its setting
    class_incremental,
    class_mismatch,
    few_classes,
    long_tailed,
    novel_classes,
    pruned,
    semi_supervised,
    shifted,
    two_modalities,
)
from kdkit.data.settings.registry import FILLED, SETTINGS, Setting, apply_setting, check_setting, register_setting

__all__ = ["FILLED", "SETTINGS", "Setting", "apply_setting", "check_setting", "register_setting"]
