"""Validate the keyword parameters a recipe passes to a factory, against the factory's signature."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import ConfigDict, ValidationError, create_model

from kdkit.errors import KdkitError, RecipeErrors


def accepted_params(factory: Callable[..., Any], skip: Iterable[str] = ()) -> dict[str, inspect.Parameter]:
    """The keyword parameters of ``factory`` (``__init__`` for classes), minus ``skip``."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    params = inspect.signature(target).parameters
    return {
        name: p for name, p in params.items()
        if name not in ("self", *skip) and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def check_params(factory: Callable[..., Any], params: dict[str, Any], *, skip: Iterable[str] = (),
                 where: str, what: str) -> dict[str, Any]:
    """Type-check ``params`` against ``factory``'s signature; unknown names are errors.

    Args:
        factory: A function or class.
        params: What the recipe gave.
        skip: Parameters filled in by kdkit itself (not settable from the recipe).
        where: Recipe location for messages.
        what: Human name of the factory ("loss 'kd'").

    Returns:
        The validated (coerced) parameters.

    Raises:
        RecipeErrors: Every unknown or ill-typed parameter.
    """
    accepted = accepted_params(factory, skip)
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target)
    except Exception:
        hints = {}
    errors = [
        KdkitError(f"{what} has no parameter {key!r}", choices=list(accepted), bad=key,
                   fix="remove it or correct its spelling", where=f"{where}.{key}")
        for key in params if key not in accepted
    ]
    fields = {
        name: (hints.get(name, Any), ... if p.default is inspect.Parameter.empty else p.default)
        for name, p in accepted.items()
    }
    schema = create_model(f"Params_{getattr(factory, '__name__', 'factory')}",
                          __config__=ConfigDict(arbitrary_types_allowed=True), **fields)  # type: ignore[call-overload]
    known = {k: v for k, v in params.items() if k in accepted}
    try:
        validated = schema.model_validate(known)
    except ValidationError as exc:
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "missing":
                errors.append(KdkitError(f"{what} needs parameter {key!r}", fix=f"add `{key}:`",
                                         where=f"{where}.{key}"))
            else:
                errors.append(KdkitError(f"{what}: {err['msg']} (got {err.get('input')!r})",
                                         fix="see the docstring (`kdkit ls` lists names)", where=f"{where}.{key}"))
        validated = None
    if errors:
        raise RecipeErrors(errors) if len(errors) > 1 else errors[0]
    assert validated is not None
    return {k: getattr(validated, k) for k in known}
