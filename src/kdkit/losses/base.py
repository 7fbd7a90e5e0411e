"""The contract every distillation loss follows, and the loss registry.

A loss sees tensors, never models: ``loss(student, teacher, labels) -> scalar``. Weights and warm-up
schedules are applied once, by :class:`kdkit.objective.Objective`, never inside a loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.params import enforce_bounds
from kdkit.registry import Registry


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype a loss computes in for these inputs: float64 if one is float64, else float32.

    The precision rule of every loss: it computes in the precision it is given (float64 stays float64, so
    gradient checks and reference comparisons are exact), but never below float32 (bfloat16 and float16
    are upcast).
    """
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)


def widen(x: Tensor) -> Tensor:
    """``x`` in :func:`compute_dtype`: half precisions upcast to float32, float32 and float64 kept."""
    return x.to(compute_dtype(x))


def run_widened(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` computed in :func:`compute_dtype` of ``x`` and the module's floating state.

    A loss's own layers (CRD's embedding heads, a feature loss's teacher transform) are built in float32; float64 inputs
    must not be rounded to them. When the precisions differ the state is cast for this call: parameters
    differentiably (they still train), and buffers that a training-mode forward updates in place (BatchNorm
    statistics) are written back in their own precision.

    Args:
        module: The loss's layer.
        x: Its input.

    Returns:
        The output, in the computing precision (float64 if ``x`` or the state is float64, else float32).
    """
    state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    dtype = compute_dtype(x, *(v for v in state.values() if v.is_floating_point()))
    if all(v.dtype == dtype for v in state.values() if v.is_floating_point()):
        return module(x.to(dtype))
    cast = {name: v.to(dtype) if v.is_floating_point() else v for name, v in state.items()}
    out = torch.func.functional_call(module, cast, (x.to(dtype),))
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if cast[name] is not buffer:
                buffer.copy_(cast[name])
    return out


class DistillLoss(nn.Module):
    """Base class of the thin module that wraps each pure loss function.

    Class attributes tell the recipe builder which taps a term reads when the recipe names none. The
    keyword-only ``__init__`` arguments are the recipe parameters; declare each one's valid range in its
    type (``temperature: Annotated[float, Gt(0)] = 4.0``, ``Literal[...]`` for choices): the recipe check
    reports it, and registration makes direct construction check it too. Every registered loss is run
    through ``tests/test_contracts.py`` on the inputs :meth:`example_inputs` describes.

    Attributes:
        default_student_tap: Tap read from the student when a term gives no ``student:``.
        default_teacher_tap: Tap read from the teacher when a term gives no ``teacher:``.
    """

    default_student_tap: ClassVar[str] = "logits"
    default_teacher_tap: ClassVar[str] = "logits"
    #: With lists of taps (several stages), the loss is applied to each (student, teacher) pair and
    #: summed; a loss that needs all stages at once sets this False and receives the lists. (ReviewKD
    #: fuses the stages in its bridge, so its loss stays pairwise.)
    pairwise: ClassVar[bool] = True
    #: The loss needs the dataset indices of the batch's samples (``index=`` keyword), e.g. CRD.
    needs_index: ClassVar[bool] = False
    #: The loss compares the student with a teacher tensor (False: it runs in recipes without a teacher).
    needs_teacher: ClassVar[bool] = True
    #: The loss compares one student tap with a list of teacher taps (e.g. one per teacher of an ensemble)
    #: instead of pairing the lists.
    teacher_list: ClassVar[bool] = False
    #: The registered bridge whose output the loss reads (``None``: any bridge or none).
    requires_bridge: ClassVar[str | None] = None
    #: Epochs over which a term's weight ramps up from 0 when its recipe entry sets no ``warmup_epochs``: part of
    #: the method where its reference code always ramps (DKD and ReviewKD: ``min(epoch / 20, 1)``).
    default_warmup_epochs: ClassVar[float] = 0.0
    #: The loss reads the class labels (e.g. DKD's target-class split, a cross-entropy of its own): it cannot run on
    #: unlabelled samples (:data:`kdkit.data.base.UNLABELLED`), and a recipe that would feed it some is refused.
    #: A class attribute; a loss whose parameters decide it (``label_relation``'s ``use_labels``) sets it per instance.
    uses_labels: bool = False
    #: The task output layouts (:data:`kdkit.task.LOGITS_LAYOUTS`) the loss understands when it reads a network's
    #: ``logits`` tap without a bridge: ``{"classes"}`` for a softmax over classes (KD), ``None`` for a loss that
    #: treats any tensor alike (MSE, CKA). A recipe pairing it with another task's logits is refused before training.
    reads_logits: ClassVar[frozenset[str] | None] = None

    @classmethod
    def teacher_needed(cls, params: Mapping[str, Any]) -> bool:
        """Whether a term with these loss parameters compares the student with a teacher tensor (default:
        :attr:`needs_teacher`; a loss whose knowledge can come from elsewhere, such as WAD's own contrastive
        representation, decides from its parameters)."""
        return cls.needs_teacher

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """Per-sample ``(student_shape, teacher_shape)`` that the loss accepts with its default parameters.

        What :meth:`setup` and :meth:`check_shapes` receive (after any bridge); a list of shapes for a loss
        that reads several taps at once. The default is a pair of 10-class logits; losses reading feature
        maps, embeddings or Gram-compatible widths override it.
        """
        return (10,), (10,)

    @classmethod
    def example_inputs(cls, batch: int, generator: torch.Generator | None = None) -> tuple[Any, Any, Tensor, Tensor]:
        """Random ``(student, teacher, labels, index)`` that :meth:`compute` accepts, for ``batch`` samples.

        The default draws standard-normal tensors of :meth:`example_shapes` (lists of tensors for lists of
        shapes; ``teacher`` is ``None`` when the loss needs none), labels in ``[0, 10)`` and
        ``index = arange(batch)``. Losses whose input is not a plain tensor (a bridge's structured output) or
        whose labels mean something else (multi-hot, repeated views) override it.

        Args:
            batch: Number of samples.
            generator: Source of randomness (``None``: the global one).
        """
        student_shape, teacher_shape = cls.example_shapes()

        def draw(shape: Any) -> Any:
            if isinstance(shape, list):
                return [draw(one) for one in shape]
            return torch.randn(batch, *shape, generator=generator)

        teacher = draw(teacher_shape) if cls.needs_teacher else None
        labels = torch.randint(0, 10, (batch,), generator=generator)
        return draw(student_shape), teacher, labels, torch.arange(batch)

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...]) -> str | KdkitError | None:
        """Say why these per-sample shapes cannot be compared, or ``None`` when they can.

        The default asks for identical shapes; losses comparing e.g. Gram matrices override it. A loss that knows
        better choices than a bridge (``composed``: the transforms or distances that fit) returns a
        :class:`~kdkit.errors.KdkitError` naming them and the fix instead of a sentence.
        """
        if tuple(student) != tuple(teacher):
            return f"student shape {tuple(student)} differs from teacher shape {tuple(teacher)}"
        return None

    def setup(self, student_shape: Any, teacher_shape: Any, num_samples: int) -> None:
        """Create state that depends on the probed tap shapes or the dataset size (called once, before
        the optimiser is built). The default has none; CRD builds its embedding heads and memory here.

        Args:
            student_shape: Per-sample shape of the (bridged) student tap, or a list for several taps.
            teacher_shape: Per-sample shape of the teacher tap(s).
            num_samples: Training samples in the dataset.
        """

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:  # pragma: no cover
        """Return the unweighted scalar loss."""
        raise NotImplementedError

    def compute(self, student: Tensor | list[Tensor], teacher: Tensor | list[Tensor], labels: Tensor,
                index: Tensor | None = None) -> Tensor:
        """What the objective calls: handles lists of taps (see :attr:`pairwise`) and sample indices."""
        extra = {"index": index} if self.needs_index else {}
        if isinstance(student, list) and self.pairwise:
            values = [self(s, t, labels, **extra) for s, t in zip(student, teacher, strict=True)]
            return torch.stack([widen(v) for v in values]).sum().to(values[0].dtype)
        return self(student, teacher, labels, **extra)


LOSSES: Registry[type[DistillLoss]] = Registry("loss", fix="run `kdkit ls losses`")


def register_loss(name: str, help: str | None = None) -> Callable[[type[DistillLoss]], type[DistillLoss]]:
    """Register a :class:`DistillLoss` subclass; its keyword-only ``__init__`` args are the recipe params.

    The bounds declared in the ``__init__`` signature are enforced from then on, also when Python code
    constructs the loss (a :class:`~kdkit.errors.KdkitError`, i.e. a ``ValueError``).
    """

    def deco(cls: type[DistillLoss]) -> type[DistillLoss]:
        return LOSSES.register(name, help)(enforce_bounds(cls, what=f"loss {name!r}"))

    return deco
