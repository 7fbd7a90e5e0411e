"""``kdkit ls KIND NAME``: one registered component in full -- its summary, parameters, defaults and bounds.

Everything shown is read from what the component declares: the registered one-line help, the docstring (and the
paper citation of the function it points to), the typed signature or recipe section (types, defaults, declared
bounds) and each parameter's ``Args:`` entry. Nothing here names a component.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable
from typing import Any

from kdkit.params import ParamInfo, describe_fields, describe_params

#: Google-style docstring sections left out of the description (the parameters are listed from the signature).
_HIDDEN_SECTIONS = {"Args:", "Returns:", "Raises:", "Yields:"}


def docstring_body(doc: str | None) -> str:
    """``doc`` without its ``Args:``/``Returns:``/``Raises:`` sections, dedented and stripped."""
    kept: list[str] = []
    hiding = False
    for line in inspect.cleandoc(doc or "").splitlines():
        if line and not line[0].isspace():  # a top-level line starts or ends a section
            hiding = line.strip() in _HIDDEN_SECTIONS
        if not hiding:
            kept.append(line)
    return "\n".join(kept).strip()


def cited_summary(obj: Any) -> str | None:
    """The first paragraph of the function ``obj``'s docstring points to (``see :func:`kd_loss```): for a loss,
    the paper it implements. ``None`` when it points to none."""
    found = re.search(r":func:`~?([\w.]+)`", inspect.cleandoc(obj.__doc__ or ""))
    if found is None:
        return None
    target = getattr(sys.modules[obj.__module__], found.group(1).rsplit(".", 1)[-1], None)
    if target is None or not target.__doc__:
        return None
    return " ".join(inspect.cleandoc(target.__doc__).split("\n\n")[0].split())


def param_lines(params: list[ParamInfo], heading: str) -> list[str]:
    """``heading`` and one entry per parameter: ``name: type = default (bounds)``, then its description."""
    if not params:
        return [f"{heading}: none"]
    lines = [f"{heading}:"]
    for p in params:
        default = "required" if p.default is None else f"= {p.default}"
        bounds = f"  ({p.bounds})" if p.bounds else ""
        lines.append(f"  {p.name}: {p.type} {default}{bounds}")
        if p.doc:
            lines.append(f"      {p.doc}")
    return lines


def _head(kind: str, name: str, help_line: str, doc: str | None, cited: str | None = None) -> list[str]:
    """The title line (registered help), the cited paper and the docstring (its summary once, if it is the help)."""
    lines = [f"{kind} {name!r}: {help_line}".rstrip(": ")]
    if cited:
        lines.append(f"implements: {cited}")
    body = docstring_body(doc)
    first, _, rest = body.partition("\n\n")
    if " ".join(first.split()) == help_line:
        body = rest.strip()
    return [*lines, "", body, ""] if body else [*lines, ""]


def describe_loss(name: str) -> str:
    """A registered loss: help, paper, docstring, taps it reads, and its recipe parameters."""
    from kdkit.losses import LOSSES

    cls = LOSSES.get(name)
    teacher = f"teacher tap {cls.default_teacher_tap!r}" if cls.needs_teacher else "no teacher"
    lines = _head("loss", name, LOSSES.describe(name), cls.__doc__, cited_summary(cls))
    lines.append(f"reads (unless the term says): student tap {cls.default_student_tap!r}, {teacher}"
                 + (f"; needs `bridge: {cls.requires_bridge}`" if cls.requires_bridge else ""))
    return "\n".join(lines + param_lines(describe_params(cls), "parameters (keys of the distill term)"))


def describe_bridge(name: str) -> str:
    """A registered bridge: help, docstring, the shapes it maps, and its ``bridge_params``."""
    from kdkit.bridges import BRIDGES, FUSING_BRIDGES, SHAPE_PARAMS, SHAPE_RULES

    factory = BRIDGES.get(name)
    lines = _head("bridge", name, BRIDGES.describe(name), factory.__doc__)
    rule = SHAPE_RULES.get(name)
    if rule is not None:
        lines.append(f"maps: {' '.join(inspect.cleandoc(rule.__doc__ or '').split())}")
    if name in FUSING_BRIDGES:
        lines.append("fuses all taps of a multi-tap term in one module")
    return "\n".join(lines + param_lines(describe_params(factory, SHAPE_PARAMS), "parameters (bridge_params)"))


def describe_method(name: str) -> str:
    """A registered method: docstring, and its recipe section's fields (or that it has none)."""
    from kdkit.method import METHODS

    method = METHODS.get(name)
    lines = _head("method", name, METHODS.describe(name), type(method).__doc__)
    if method.spec is None:
        return "\n".join([*lines, "recipe section: none (recognised from the recipe's terms)"])
    lines += [f"recipe section `{method.section}:`", docstring_body(method.spec.__doc__), ""]
    return "\n".join(lines + param_lines(describe_fields(method.spec), f"fields of `{method.section}:`"))


def describe_model(name: str) -> str:
    """A registered model: docstring and its ``model.params``."""
    from kdkit.models import FIXED_PARAMS, MODELS

    factory = MODELS.get(name)
    lines = _head("model", name, MODELS.describe(name), factory.__doc__)
    return "\n".join(lines + param_lines(describe_params(factory, FIXED_PARAMS), "parameters (model.params)"))


def describe_dataset(name: str) -> str:
    """A registered dataset reader: docstring and its ``data.params``."""
    from kdkit.data import DATASETS

    reader = DATASETS.get(name)
    lines = _head("dataset", name, DATASETS.describe(name), reader.__doc__)
    return "\n".join(lines + param_lines(describe_params(reader, ("root",)), "parameters (data.params)"))


def describe_task(name: str) -> str:
    """A registered task: docstring, metrics and targets."""
    from kdkit.task import TASKS

    task = TASKS.get(name)
    lines = _head("task", name, TASKS.describe(name), type(task).__doc__)
    lines.append(f"metrics {', '.join(task.metrics)} (best by {task.best}); targets: {task.target or 'the labels'}; "
                 f"deploys {task.deployed_output}")
    return "\n".join(lines)


def describe_setting(name: str) -> str:
    """A registered data setting: docstring (its module's, which says what it models) and its parameters."""
    from kdkit.data import SETTINGS
    from kdkit.data.settings import FILLED

    build = SETTINGS.get(name).build
    lines = _head("setting", name, SETTINGS.describe(name), sys.modules[build.__module__].__doc__)
    lines.append(f"the function: {docstring_body(build.__doc__)}")
    lines.append("")
    return "\n".join(lines + param_lines(describe_params(build, FILLED),
                                         "parameters (keys of data.setting, besides name and seed)"))


#: ``kdkit ls KIND NAME``: the describer of each kind.
DESCRIBERS: dict[str, Callable[[str], str]] = {
    "losses": describe_loss, "bridges": describe_bridge, "methods": describe_method, "models": describe_model,
    "datasets": describe_dataset, "tasks": describe_task, "settings": describe_setting,
}
