"""Parameter bounds declared in a signature: what check_params and direct calls say about a bad value."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest
from annotated_types import Ge, Gt, Interval, MinLen

from kdkit.errors import KdkitError
from kdkit.params import check_params, enforce_bounds


def factory(*, temperature: Annotated[float, Gt(0)] = 4.0, ratio: Annotated[float, Interval(ge=0, lt=1)] = 0.5,
            scale: Annotated[float, Gt(0)] | None = None, mode: Literal["a", "b"] = "a",
            temps: Annotated[tuple[Annotated[float, Gt(0)], ...], MinLen(1)] = (2.0, 4.0),
            steps: list[Annotated[int, Ge(1)]] | None = None) -> dict:
    """A factory with one parameter of each kind of bound."""
    return {"temperature": temperature, "ratio": ratio}


@pytest.mark.parametrize(("params", "message", "fix"), [
    ({"temperature": -1}, "temperature must be > 0 (got -1)", "set temperature to a value > 0 (default 4.0)"),
    ({"ratio": 1.0}, "ratio must be in [0, 1) (got 1.0)", "set ratio to a value in [0, 1) (default 0.5)"),
    ({"scale": 0}, "scale must be > 0 (or null) (got 0)", "set scale to a value > 0, or null (default null)"),
    ({"mode": "c"}, "mode must be one of 'a', 'b' (got 'c')", "set mode to one of 'a', 'b' (default 'a')"),
    ({"temps": [2, -3]}, "temps[1] must be > 0 (got -3)",
     "set temps to a list of at least 1 item(s), each > 0 (default [2.0, 4.0])"),
    ({"temps": []}, "temps must have at least 1 item(s) (got [])", "set temps to a list of at least 1 item(s)"),
    ({"steps": [1, 0]}, "steps[1] must be >= 1 (got 0)", "set steps to a list with each item >= 1, or null"),
])
def test_bound_violation_names_parameter_range_value_and_fix(params: dict, message: str, fix: str) -> None:
    name = next(iter(params))
    with pytest.raises(KdkitError) as info:
        check_params(factory, params, where="distill.0", what="loss 'x'")
    text = str(info.value)
    assert text.startswith(f"distill.0.{name}: loss 'x': {message}; fix: {fix}"), text
    with pytest.raises(KdkitError) as direct:  # a direct call of the registered factory says the same
        enforce_bounds(factory, what="loss 'x'")(**params)
    assert str(direct.value).startswith(f"loss 'x': {message}; fix: {fix}"), str(direct.value)


def test_type_errors_keep_pydantic_wording_and_valid_values_pass() -> None:
    with pytest.raises(KdkitError, match=r"temperature should be a valid number.*\(got 'hot'\)"):
        check_params(factory, {"temperature": "hot"}, where="distill.0", what="loss 'x'")
    assert check_params(factory, {"temperature": 2, "scale": None, "temps": [1, 2]}, where="w", what="x") == \
        {"temperature": 2.0, "scale": None, "temps": (1.0, 2.0)}
    assert enforce_bounds(factory, what="x")(temperature=0.5) == {"temperature": 0.5, "ratio": 0.5}
