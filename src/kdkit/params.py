"""Validate the keyword parameters a recipe passes to a factory, against the factory's signature.

A parameter's valid range is declared where the parameter is, as typed bounds in the signature::

    def __init__(self, *, temperature: Annotated[float, Gt(0)] = 4.0, resize: Literal["student", "smaller"] = ...)

(``Gt``, ``Ge``, ``Lt``, ``Le``, ``Interval``, ``MinLen`` from :mod:`annotated_types`). :func:`check_params`
checks recipe values against them with pydantic, and :func:`enforce_bounds` -- applied by ``register_loss``
and ``register_bridge`` -- checks them when Python code constructs a loss or calls a bridge factory directly,
so the bound is written once and both paths report it in the same words.
"""

from __future__ import annotations

import functools
import inspect
import json
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, TypeVar

from annotated_types import Ge, GroupedMetadata, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from pydantic_core import PydanticUndefined

from kdkit.errors import KdkitError, RecipeErrors
from kdkit.schema import boolean_for_number

F = TypeVar("F", bound=Callable[..., Any])

#: pydantic error types that a declared bound (numeric range, choices, length) raises.
_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "literal_error",
                 "too_short", "too_long"}


@dataclass(frozen=True)
class Range:
    """A numeric range declared by ``Gt``/``Ge``/``Lt``/``Le``/``Interval`` metadata.

    Attributes:
        low: Lower bound, or ``None``.
        low_open: The lower bound is excluded (``Gt``).
        high: Upper bound, or ``None``.
        high_open: The upper bound is excluded (``Lt``).
    """

    low: float | None = None
    low_open: bool = False
    high: float | None = None
    high_open: bool = False

    def __contains__(self, value: Any) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"{'<' if self.high_open else '<='} {self.high}"


def _arms(hint: Any) -> tuple[list[Any], bool]:
    """The non-``None`` members of a union (or ``[hint]``) and whether ``None`` is allowed."""
    if typing.get_origin(hint) in (typing.Union, UnionType):
        args = typing.get_args(hint)
        return [a for a in args if a is not NoneType], NoneType in args
    return [hint], False


def _metadata(hint: Any) -> tuple[Any, list[Any]]:
    """``(inner type, flat list of Annotated metadata)``; grouped metadata (``Interval``) is expanded."""
    if typing.get_origin(hint) is not Annotated:
        return hint, []
    flat: list[Any] = []
    for item in hint.__metadata__:
        flat.extend(item if isinstance(item, GroupedMetadata) else [item])
    return hint.__origin__, flat


def _element(hint: Any) -> Any:
    """The item type of ``tuple[X, ...]`` or ``list[X]``, else ``None``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if (origin is list and args) or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        return args[0]
    return None


def value_range(hint: Any) -> Range | None:
    """The numeric range a type hint declares (``Annotated[float, Gt(0)]`` -> ``> 0``), or ``None``.

    ``Optional[...]`` hints are looked through (``None`` is then also valid).
    """
    arms, _ = _arms(hint)
    if len(arms) != 1:
        return None
    low = high = None
    low_open = high_open = False
    for item in _metadata(arms[0])[1]:
        if isinstance(item, Gt):
            low, low_open = item.gt, True
        elif isinstance(item, Ge):
            low, low_open = item.ge, False
        elif isinstance(item, Lt):
            high, high_open = item.lt, True
        elif isinstance(item, Le):
            high, high_open = item.le, False
    if low is None and high is None:
        return None
    return Range(low, low_open, high, high_open)  # type: ignore[arg-type]


def bound_problem(name: str, hint: Any, value: Any) -> str | None:
    """Why ``value`` breaks the bounds ``hint`` declares, naming ``name``, the bound and the value; else ``None``.

    Checks numeric ranges, ``Literal`` choices, ``MinLen``/``MaxLen``, and the elements of ``tuple[X, ...]`` /
    ``list[X]``. Values of another type are left to the type check (pydantic's, in :func:`check_params`).
    """
    arms, optional = _arms(hint)
    if value is None or len(arms) != 1:  # None, or which member of a union applies, is a type question
        return None
    or_null = " (or null)" if optional else ""
    inner, meta = _metadata(arms[0])
    if typing.get_origin(inner) is Literal:
        choices = typing.get_args(inner)
        if value in choices:
            return None
        return f"{name} must be one of {', '.join(repr(c) for c in choices)}{or_null} (got {value!r})"
    bounds = value_range(arms[0])
    try:
        if bounds is not None and not isinstance(value, bool) and value not in bounds:
            return f"{name} must be {bounds}{or_null} (got {value!r})"
        for item in meta:
            if isinstance(item, MinLen) and len(value) < item.min_length:
                return f"{name} must have at least {item.min_length} item(s) (got {list(value)!r})"
            if isinstance(item, MaxLen) and len(value) > item.max_length:
                return f"{name} must have at most {item.max_length} item(s) (got {list(value)!r})"
    except TypeError:  # not comparable / not sized: a type error, reported by the type check
        return None
    element = _element(inner)
    if element is not None and isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            problem = bound_problem(f"{name}[{i}]", element, item)
            if problem:
                return problem
    return None


@functools.cache
def _type_hints(target: Callable[..., Any]) -> dict[str, Any]:
    """``target``'s resolved type hints, ``Annotated`` metadata kept (cached: signatures do not change)."""
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception:  # unresolvable annotations: validate types loosely rather than refuse the factory
        return {}


def describe_bounds(hint: Any) -> str | None:
    """What the bounds of a type hint allow, as a phrase: ``a value > 0``, ``one of 'a', 'b'``,
    ``a list of at least 1 item(s), each > 0`` (``, or null`` for an optional one); ``None`` without bounds."""
    arms, optional = _arms(hint)
    if len(arms) != 1:
        return None
    inner, meta = _metadata(arms[0])
    bounds = value_range(arms[0])
    text: str | None = None
    if typing.get_origin(inner) is Literal:
        text = "one of " + ", ".join(repr(c) for c in typing.get_args(inner))
    elif bounds is not None:
        text = f"a value {bounds}"
    else:
        sizes = [f"at least {m.min_length} item(s)" for m in meta if isinstance(m, MinLen)]
        sizes += [f"at most {m.max_length} item(s)" for m in meta if isinstance(m, MaxLen)]
        item_type = _element(inner)
        element = describe_bounds(item_type) if item_type is not None else None
        if sizes or element:
            text = "a list" + (" of " + " and ".join(sizes) if sizes else "")
            if element:
                text += (", each " if sizes else " with each item ") + element.removeprefix("a value ")
    return f"{text}, or null" if text and optional else text


def _fix_for(name: str, hint: Any, default: Any) -> str:
    """The fix of a bound violation: what the parameter allows, and its default as a recipe writes it."""
    if default is inspect.Parameter.empty:
        shown = ""
    elif default is None:
        shown = " (default null)"
    else:
        shown = f" (default {list(default) if isinstance(default, tuple) else default!r})"
    allowed = describe_bounds(hint)
    return f"set {name} to {allowed}{shown}" if allowed else f"see the docstring (`kdkit ls` lists names){shown}"


def check_bounds(factory: Callable[..., Any], values: dict[str, Any], *, what: str, where: str | None = None) -> None:
    """Check ``values`` against the bounds declared in ``factory``'s signature (the types are not checked).

    Args:
        factory: A function or class (its ``__init__``).
        values: Parameter values by name (others in the signature are ignored).
        what: Human name of the factory ("loss 'kd'").
        where: Recipe location prefix for messages, if any.

    Raises:
        KdkitError: The first value out of its declared bounds (a ``ValueError``), naming the parameter, the
            valid range and the value.
    """
    target = factory.__init__ if inspect.isclass(factory) else factory
    hints = _type_hints(target)
    for name, value in values.items():
        problem = bound_problem(name, hints[name], value) if name in hints else None
        if problem:
            default = inspect.signature(target).parameters[name].default
            raise KdkitError(f"{what}: {problem}", fix=_fix_for(name, hints[name], default),
                             where=f"{where}.{name}" if where else None)


def enforce_bounds(factory: F, what: str) -> F:
    """Make ``factory`` check its declared bounds on every call (:func:`check_bounds`).

    A class gets its ``__init__`` wrapped in place; a function is wrapped. The signature (and its type hints)
    stay visible to :func:`check_params` through ``__wrapped__``.

    Args:
        factory: A loss class or a bridge factory.
        what: Human name for messages ("loss 'kd'").

    Returns:
        ``factory`` (a class) or the checking wrapper (a function).
    """
    func = factory.__init__ if inspect.isclass(factory) else factory
    if getattr(func, "__kdkit_bounds__", None) is not None:
        return factory
    signature = inspect.signature(func)

    @functools.wraps(func)
    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            arguments = signature.bind(*args, **kwargs).arguments
        except TypeError:
            return func(*args, **kwargs)  # let the call raise Python's own message
        check_bounds(func, arguments, what=what)
        return func(*args, **kwargs)

    checked.__kdkit_bounds__ = what  # type: ignore[attr-defined]
    if inspect.isclass(factory):
        factory.__init__ = checked  # type: ignore[misc]
        return factory
    return checked  # type: ignore[return-value]


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
    """Type-check ``params`` against ``factory``'s signature, bounds included; unknown names are errors.

    Args:
        factory: A function or class.
        params: What the recipe gave.
        skip: Parameters filled in by kdkit itself (not settable from the recipe).
        where: Recipe location for messages.
        what: Human name of the factory ("loss 'kd'").

    Returns:
        The validated (coerced) parameters.

    Raises:
        RecipeErrors: Every unknown, ill-typed or out-of-bounds parameter. A bound violation says the
            parameter, its valid range or choices, the value given and the default.
    """
    accepted = accepted_params(factory, skip)
    target = factory.__init__ if inspect.isclass(factory) else factory
    hints = _type_hints(target)
    errors = [
        KdkitError(f"{what} has no parameter {key!r}", choices=list(accepted), bad=key,
                   fix="remove it or correct its spelling", where=f"{where}.{key}")
        for key in params if key not in accepted
    ]
    fields = {
        name: (hints.get(name, Any), ... if p.default is inspect.Parameter.empty else p.default)
        for name, p in accepted.items()
    }
    # Numbers are finite and never booleans (pydantic's lax mode reads `true` as 1): the recipe's own rules.
    schema = create_model(f"Params_{getattr(factory, '__name__', 'factory')}",
                          __config__=ConfigDict(arbitrary_types_allowed=True, allow_inf_nan=False),
                          **fields)  # type: ignore[call-overload]
    known = {k: v for k, v in params.items() if k in accepted}
    booleans = [name for name, value in known.items() if boolean_for_number(
        value, [_metadata(arm)[0] for arm in _arms(_metadata(hints.get(name, Any))[0])[0]])]
    errors += [KdkitError(f"{what}: {name} should be a number, got the boolean {str(known[name]).lower()}",
                          fix=_fix_for(name, hints[name], accepted[name].default), where=f"{where}.{name}")
               for name in booleans]
    known = {k: v for k, v in known.items() if k not in booleans}
    try:
        validated = schema.model_validate(known)
    except ValidationError as exc:
        reported: set[str] = set()
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            name = str(err["loc"][0]) if err["loc"] else key
            if name in reported:  # a union (e.g. `float | None`) yields one error per member
                continue
            if err["type"] == "missing":
                errors.append(KdkitError(f"{what} needs parameter {key!r}", fix=f"add `{key}:`",
                                         where=f"{where}.{key}"))
                continue
            default = accepted[name].default if name in accepted else inspect.Parameter.empty
            # The declared bound, in the words direct construction uses (pydantic's message lacks the range).
            problem = bound_problem(name, hints[name], known[name]) \
                if err["type"] in _BOUND_ERRORS and name in hints and name in known else None
            if problem:
                reported.add(name)
                errors.append(KdkitError(f"{what}: {problem}", fix=_fix_for(name, hints[name], default),
                                         where=f"{where}.{name}"))
                continue
            msg = err["msg"]
            msg = f"{key} should{msg[len('Input should'):]}" if msg.startswith("Input should") else f"{key}: {msg}"
            errors.append(KdkitError(f"{what}: {msg} (got {err.get('input')!r})",
                                     fix="see the docstring (`kdkit ls` lists names)", where=f"{where}.{key}"))
        validated = None
    if errors:
        raise RecipeErrors(errors) if len(errors) > 1 else errors[0]
    assert validated is not None
    return {k: getattr(validated, k) for k in known}


def with_defaults(factory: Callable[..., Any], params: dict[str, Any], *, skip: Iterable[str] = (), where: str,
                  what: str) -> dict[str, Any]:
    """Every parameter ``factory`` is called with: the validated ``params`` and the declared default of the others.

    Args:
        factory: A function or class.
        params: What the recipe gave (checked by :func:`check_params`).
        skip: Parameters filled in by kdkit itself.
        where: Recipe location for messages.
        what: Human name of the factory.

    Returns:
        ``{name: value}`` in signature order, as plain data (tuples as lists).

    Raises:
        RecipeErrors: What :func:`check_params` raises.
    """
    given = check_params(factory, params, skip=skip, where=where, what=what)
    resolved = {name: given.get(name, p.default)
                for name, p in accepted_params(factory, skip).items() if name in given or p.default is not p.empty}
    return {name: _plain(value) for name, value in resolved.items()}


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists (how a recipe writes it, and what YAML can store)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class ParamInfo:
    """One settable parameter, as ``kdkit ls KIND NAME`` shows it.

    Attributes:
        name: Parameter name (the recipe key).
        type: Its type, as text (``float``, ``bool``, ``list[int] | None``).
        default: Its default as a recipe writes it (``null``, ``true``, ``[2, 3]``), or ``None`` when required.
        bounds: What its declared bounds allow (``a value > 0``, ``one of 'queue', 'bank'``), or ``None``.
        doc: Its description (the docstring's ``Args:`` entry or the field's description), or ``""``.
    """

    name: str
    type: str
    default: str | None
    bounds: str | None
    doc: str


def type_name(hint: Any) -> str:
    """A type hint as text: bounds and ``Annotated`` metadata left out (:func:`describe_bounds` says them)."""
    if hint is NoneType or hint is None:
        return "None"
    if typing.get_origin(hint) is Annotated:
        return type_name(hint.__origin__)
    if typing.get_origin(hint) in (typing.Union, UnionType):
        return " | ".join(type_name(arm) for arm in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return " | ".join(sorted({type(c).__name__ for c in typing.get_args(hint)}))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple, dict, set) and args:
        inner = [type_name(a) for a in args if a is not Ellipsis]
        return f"{'list' if origin is tuple else origin.__name__}[{', '.join(inner)}]"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def recipe_value(value: Any) -> str:
    """``value`` as a recipe (YAML) writes it: ``null``, ``true``, ``4.0``, ``[2, 3]``, ``queue``."""
    if isinstance(value, str):
        return value
    return json.dumps(_plain(value), default=str)


def docstring_args(doc: str | None) -> dict[str, str]:
    """The entries of a Google-style docstring's ``Args:`` section, ``{name: text}`` (continuation lines joined)."""
    found: dict[str, str] = {}
    lines = inspect.cleandoc(doc or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return found
    indent, current = None, None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:  # the next section
            break
        indent = depth if indent is None else indent
        name, colon, text = line.strip().partition(":")
        if depth == indent and colon and name.isidentifier():
            current = name
            found[name] = text.strip()
        elif current is not None:
            found[current] += " " + line.strip()
    return found


def describe_params(factory: Callable[..., Any], skip: Iterable[str] = (), doc: str | None = None) -> list[ParamInfo]:
    """The settable parameters of ``factory`` (``__init__`` for classes), from its signature and docstring.

    Args:
        factory: A loss class, bridge or model factory.
        skip: Parameters filled in by kdkit itself.
        doc: Docstring whose ``Args:`` section describes them (default: the factory's).
    """
    target = factory.__init__ if inspect.isclass(factory) else factory
    hints = _type_hints(target)
    texts = docstring_args(doc if doc is not None else factory.__doc__)
    infos = []
    for name, p in accepted_params(factory, skip).items():
        hint = hints.get(name, Any)
        default = None if p.default is p.empty else recipe_value(p.default)
        infos.append(ParamInfo(name, type_name(hint), default, describe_bounds(hint), texts.get(name, "")))
    return infos


def describe_fields(model: type[BaseModel]) -> list[ParamInfo]:
    """The fields of a pydantic recipe section (a method's ``spec``), as :class:`ParamInfo`."""
    infos = []
    for name, field in model.model_fields.items():
        hint = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
        if field.default_factory is not None:
            default: str | None = recipe_value(field.default_factory())  # type: ignore[call-arg]
        else:
            default = None if field.default is PydanticUndefined else recipe_value(field.default)
        infos.append(ParamInfo(name, type_name(field.annotation), default, describe_bounds(hint),
                               field.description or ""))
    return infos
