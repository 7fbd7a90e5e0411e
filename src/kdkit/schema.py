"""The base of every recipe schema section (the recipe's own and the ones methods declare)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A recipe section: unknown keys are errors and a validated section is immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)
