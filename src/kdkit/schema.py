"""The base of every recipe schema section (the recipe's own and the ones methods declare)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class Strict(BaseModel):
    """A recipe section: unknown keys are errors and a validated section is immutable. Numbers are finite
    (``lr=.inf`` is refused) and never booleans (YAML's ``true`` is not ``1`` epoch)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if boolean_for_number(value, get_args(annotation) or (annotation,)):
                raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
        return value


def boolean_for_number(value: Any, accepted: Iterable[Any]) -> bool:
    """Whether ``value`` is a boolean given where the accepted types (a union's arms) hold a number but no
    ``bool``: pydantic's lax mode would read ``true`` as ``1``, which a recipe never means."""
    arms = set(accepted)
    return isinstance(value, bool) and bool not in arms and bool({int, float} & arms)


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true/false (any case) are booleans.

    YAML 1.1 (PyYAML's default) also reads ``on``/``off``/``yes``/``no`` as booleans, so ``train.amp: off``
    arrived as ``False`` and was refused as "not 'off'". Here they stay strings; where a boolean is expected,
    the schema converts them (pydantic accepts on/off/yes/no), so both kinds of key work.
    """


_BOOL = "tag:yaml.org,2002:bool"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def read_yaml(text: str) -> Any:
    """Parse YAML safely (no code runs) with YAML 1.2 booleans (see :class:`_Yaml12Loader`).

    Raises:
        yaml.YAMLError: The text is not valid YAML.
    """
    return yaml.load(text, Loader=_Yaml12Loader)
