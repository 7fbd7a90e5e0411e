"""Registries and error messages: bad value, closest choices first, the fix."""

from __future__ import annotations

import pytest

from kdkit.errors import KdkitError, closest
from kdkit.registry import Registry


def test_closest_puts_prefix_and_typo_matches_first() -> None:
    assert closest("resnet3", ["vgg8", "resnet32", "resnet32x4", "wrn_16_2"])[:2] == ["resnet32", "resnet32x4"]
    assert closest("cnn_studnt", ["cnn_teacher", "cnn_student", "vgg8"])[0] == "cnn_student"


def test_registry_miss_names_value_choices_and_fix() -> None:
    reg: Registry[int] = Registry("widget")
    reg.add("alpha", 1)
    reg.add("beta", 2)
    with pytest.raises(KdkitError) as info:
        reg.get("alpah", where="x.widget")
    text = str(info.value)
    assert "'alpah'" in text and text.index("alpha") < text.index("beta") and "fix:" in text
    assert text.startswith("x.widget:")


def test_registry_lists_and_describes() -> None:
    reg: Registry[object] = Registry("thing")

    @reg.register("one", help="the first")
    def one() -> None:
        """Unused."""

    assert reg.names() == ["one"] and "one" in reg and reg.describe("one") == "the first"
    assert reg.items() == [("one", one)]
