"""The contract of a distillation *method*: everything a method adds beyond losses and bridges.

Most distillers are only terms (a loss, taps, maybe a bridge) and need no method. A method is what
changes the run around the objective -- the training loop (a learned augmentation trained in its own
phases), the deployed network (a chain of bridges that becomes part of it), what a run reports. It
lives in one folder under :mod:`kdkit.methods` (or in an installed package, through the ``kdkit.plugins``
entry-point group), registers one :class:`Method` in :data:`METHODS`, and declares there:

* its recipe section (:attr:`Method.section`, a pydantic :attr:`Method.spec`) and the checks that need
  the whole recipe (:meth:`Method.check`), including which combinations it refuses and why;
* its engine hooks for a training run (:meth:`Method.attach` returns a :class:`MethodRun` whose
  :class:`~kdkit.engine.Hooks` chain batch transforms, callbacks, phases, checkpointed state and
  parameter groups);
* its section of ``summary.json`` (:meth:`MethodRun.summary`), of the HTML report
  (:meth:`Method.report_section`) and of the method benchmark (:meth:`Method.bench_fields`,
  :meth:`Method.bench_notes`).

``run``, ``validate``, ``bench``, ``cache`` and ``report`` loop over the registered methods; none of
them names one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kdkit.registry import Registry

if TYPE_CHECKING:
    from kdkit.build import Plan
    from kdkit.distributed import DistContext
    from kdkit.engine import Engine, Hooks
    from kdkit.schema import Strict


class MethodRun:
    """What one method contributes to one training run.

    Args:
        hooks: The engine hooks (see :class:`kdkit.engine.Hooks`).
    """

    def __init__(self, hooks: Hooks) -> None:
        self.hooks = hooks

    def summary(self, engine: Engine) -> dict[str, Any]:
        """Fields this method adds to ``summary.json`` after training (rank 0 only). Default: none."""
        return {}


class Method:
    """Base class of a registered method (one instance per method in :data:`METHODS`).

    Attributes:
        name: Registry name.
        section: Top-level recipe key of the method's settings, or ``None`` when the method has no
            section (it is then recognised from the recipe's terms, see :meth:`active`).
        spec: The pydantic model of that section (subclass of :class:`kdkit.schema.Strict`).
        feeds_teacher_new_images: The teacher must see images other than the training set's stored
            crop/flip views, so a teacher-output cache cannot stand in for it.
        needs_labels: The method reads the label of every training sample (e.g. a phase with its own
            cross-entropy), so data with unlabelled samples (:data:`kdkit.data.base.UNLABELLED`) is refused.
    """

    name: ClassVar[str] = ""
    section: ClassVar[str | None] = None
    spec: ClassVar[type[Strict] | None] = None
    feeds_teacher_new_images: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False

    def active(self, recipe: Any) -> bool:
        """Whether ``recipe`` uses this method. Default: its section is present."""
        return self.section is not None and getattr(recipe, self.section, None) is not None

    def moves_pixels(self, recipe: Any) -> str | None:
        """What in ``recipe``'s use of this method changes the training images' geometry (shears, rotations,
        translations), with how to avoid it, or ``None``. A task whose targets are pixel maps or boxes read by
        sample index (:attr:`kdkit.task.Task.pixel_targets`) refuses a method that moves pixels. Default: none."""
        return None

    def check(self, recipe: Any) -> list[str]:
        """Problems with a schema-valid ``recipe`` that uses this method (each a message that says why and
        how to fix it). Called while the recipe is validated, so a bad combination fails before training."""
        return []

    def attach(self, built: Plan, ctx: DistContext) -> MethodRun | None:
        """The hooks of a training run of ``built`` (a recipe that uses this method), or ``None``."""
        return None

    def report_section(self, label: str, summary: dict[str, Any], folder: Path) -> str:
        """HTML for the report, from a finished run's summary and folder (already escaped). Default: none."""
        return ""

    def bench_fields(self, summaries: list[dict[str, Any]]) -> dict[str, Any]:
        """Extra fields of this method's row in ``kdkit bench methods``, from its seeds' summaries."""
        return {}

    def bench_notes(self, row: dict[str, Any]) -> list[str]:
        """Lines printed under the benchmark table about a row with this method's fields."""
        return []


METHODS: Registry[Method] = Registry("method", fix="run `kdkit ls methods`")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register one instance of a :class:`Method` subclass under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a `name`")
    if (cls.section is None) != (cls.spec is None):
        raise TypeError(f"{cls.__name__}: give both `section` and `spec`, or neither")
    METHODS.add(cls.name, cls(), (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "")
    return cls


def active_methods(recipe: Any) -> list[Method]:
    """The registered methods ``recipe`` uses, in registry order."""
    return [method for _, method in METHODS.items() if method.active(recipe)]


def method_sections() -> dict[str, Method]:
    """Recipe section name -> the method that declares it."""
    sections: dict[str, Method] = {}
    for name, method in METHODS.items():
        if method.section is None:
            continue
        if method.section in sections:
            raise TypeError(f"methods {sections[method.section].name!r} and {name!r} both declare recipe "
                            f"section {method.section!r}")
        sections[method.section] = method
    return sections
