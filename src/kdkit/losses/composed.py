"""The ``composed`` loss: a distiller term built from registered pieces -- a transform chain, then a distance.

A term of the distiller grammar (issue 12; Auto-KD, Li et al., ICCV 2023; KD-Zero, Li et al., NeurIPS 2023) is
``(student tap, teacher tap) -> transforms -> distance -> weight``. The same chain is applied to both sides
(:mod:`kdkit.losses.transforms`), the distance compares the results (:mod:`kdkit.losses.distances`), and the term is
multiplied by the chain's factors (``T²`` after ``softmax_t``). The weight is the term's ``weight``, applied by the
objective. Every searched distiller is thus an ordinary recipe; the hand-written losses are special cases::

    kd       = composed(transforms: [softmax_t], distance: kl)                        # T² KL(p_t || p_s)
    kd + std = composed(transforms: [standardize, softmax_t], distance: kl)
    at       = composed(transforms: [attention, l2_normalize], distance: mse)          # equal spatial sizes
    pkd      = composed(transforms: [channel_std], distance: mse) / 2
    sp       = composed(transforms: [relation], distance: mse)
    cka      = composed(transforms: [], distance: cka)

``tests/losses/test_composed.py`` proves each equality on random float64 inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from kdkit.errors import KdkitError
from kdkit.losses.base import DistillLoss, compute_dtype, register_loss
from kdkit.losses.distances import DISTANCES, Distance
from kdkit.losses.transforms import TRANSFORMS, Misfit, Shape, Transform, Value, fit_chain
from kdkit.params import with_defaults

#: Parameters of the transform and distance functions that the chain fills in (the tensors).
TENSOR_ARGS = ("x", "student", "teacher")


def resolve_chain(names: Sequence[str], params: dict[str, dict[str, Any]] | None,
                  ) -> tuple[list[Transform], dict[str, dict[str, Any]]]:
    """The registered transforms of a chain and each one's parameters, defaults filled in.

    Raises:
        KdkitError: An unknown transform (closest names first), a transform named twice, or parameters for a
            transform the chain does not have, or invalid ones (``where`` relative to the term).
    """
    transforms = [TRANSFORMS.get(name, where=f"transforms.{i}") for i, name in enumerate(names)]
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise KdkitError(f"transform {name!r} appears twice in the chain {list(names)}",
                             fix="name each transform once (their order is the order applied)",
                             where=f"transforms.{i}")
        seen.add(name)
        if transforms[i].terminal and i != len(names) - 1:
            raise KdkitError(f"transform {name!r} ends a chain (what follows it compares probabilities), but the chain "
                             f"{list(names)} continues after it", fix=f"move {name} to the end of `transforms:`",
                             where=f"transforms.{i}")
    given = dict(params or {})
    for name in given:
        if name not in seen:
            raise KdkitError(f"transform_params names {name!r}, which is not in the chain {list(names)}",
                             choices=list(names), bad=name, fix="give parameters only for the chain's transforms",
                             where=f"transform_params.{name}")
    resolved = {t.name: with_defaults(t.fn, dict(given.get(t.name) or {}), skip=TENSOR_ARGS,
                                      where=f"transform_params.{t.name}", what=f"transform {t.name!r}")
                for t in transforms}
    return transforms, resolved


def resolve_distance(name: str, params: dict[str, Any] | None, transforms: Sequence[Transform],
                     ) -> tuple[Distance, dict[str, Any]]:
    """The registered distance and its parameters (defaults filled in), checked against the chain's kind.

    Raises:
        KdkitError: An unknown distance (closest first), invalid parameters, or a divergence after a chain that
            does not end with a distribution.
    """
    distance = DISTANCES.get(name, where="distance")
    resolved = with_defaults(distance.fn, dict(params or {}), skip=TENSOR_ARGS, where="distance_params",
                             what=f"distance {name!r}")
    ends_in_distribution = bool(transforms) and transforms[-1].distribution
    if distance.needs_distribution and not ends_in_distribution:
        fitting = [d for d, entry in DISTANCES.items() if not entry.needs_distribution]
        raise KdkitError(f"distance {name!r} compares probability distributions, but the chain "
                         f"{[t.name for t in transforms]} does not end with softmax_t", choices=fitting, bad=name,
                         fix="end `transforms:` with softmax_t, or choose a distance that compares plain values",
                         where="distance")
    return distance, resolved


def chain_formula(transforms: Sequence[str], transform_params: dict[str, dict[str, Any]], distance: str,
                  distance_params: dict[str, Any], student: str = "s", teacher: str = "t") -> str:
    """The term as a formula, e.g. ``KL(softmax(std(t)/4) ‖ softmax(std(s)/4))·4²``.

    Args:
        transforms: The chain's transform names.
        transform_params: Each transform's parameters (missing ones take their defaults).
        distance: The distance's name.
        distance_params: Its parameters.
        student: The student tap's symbol.
        teacher: The teacher tap's symbol.
    """
    s, t, factors = student, teacher, []
    for name in transforms:
        entry, params = TRANSFORMS.get(name), transform_params.get(name, {})
        s, t = entry.symbol(s, **params), entry.symbol(t, **params)
        factor = entry.factor_symbol(**params)
        if factor:
            factors.append(factor)
    text = DISTANCES.get(distance).symbol(s, t, **distance_params)
    return "·".join([text, *factors])


@register_loss("composed", help="a grammar term: the same transform chain on both taps, then a distance "
                                "(Auto-KD / KD-Zero search space)")
class ComposedLoss(DistillLoss):
    """A distiller term built from registered transforms and a distance; see :mod:`kdkit.losses.composed`.

    Recipe (logit-standardised KD, as ``{loss: kd, standardize: true, temperature: 2}``)::

        distill:
          - loss: composed
            student: logits
            teacher: logits
            weight: 9
            transforms: [standardize, softmax_t]
            transform_params: {softmax_t: {temperature: 2}}
            distance: kl

    ``kdkit ls`` does not list the pieces; docs/distiller-grammar.md does, with shapes and formulas.

    Args:
        transforms: Transform names, applied in order to both taps alike (each at most once; ``[]``: the taps as
            they are).
        transform_params: Parameters by transform name, e.g. ``{softmax_t: {temperature: 4}}`` (defaults otherwise).
        distance: Distance name comparing the transformed taps (kl, reverse_kl and js need a chain ending with
            softmax_t).
        distance_params: The distance's parameters, e.g. ``{beta: 1.0}`` for smooth_l1.
    """

    default_student_tap = "logits"
    default_teacher_tap = "logits"

    def __init__(self, *, transforms: tuple[str, ...] = ("softmax_t",),
                 transform_params: dict[str, dict[str, Any]] | None = None, distance: str = "kl",
                 distance_params: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.transforms, self.transform_params = resolve_chain(transforms, transform_params)
        self.distance, self.distance_params = resolve_distance(distance, distance_params, self.transforms)
        self.factor = math.prod(t.factor(**self.transform_params[t.name]) for t in self.transforms)

    @property
    def names(self) -> list[str]:
        """The chain's transform names."""
        return [t.name for t in self.transforms]

    def formula(self, student: str = "s", teacher: str = "t") -> str:
        """This term as a formula (:func:`chain_formula`)."""
        return chain_formula(self.names, self.transform_params, self.distance.name, self.distance_params,
                             student, teacher)

    def check_shapes(self, student: Shape, teacher: Shape) -> KdkitError | None:
        """Whether the chain applies to these per-sample shapes and the distance can compare its outputs.

        Returns a :class:`KdkitError` whose choices are the pieces that would fit (closest first).
        """
        fit = fit_chain(self.names, self.transform_params, student, teacher)
        if isinstance(fit, Misfit):
            s_in, t_in = self._input_of(fit.transform, student, teacher)
            fitting = [name for name, entry in TRANSFORMS.items()
                       if not isinstance(entry.rule(s_in, t_in), str)]
            return KdkitError(f"transform {fit.transform!r} does not apply to student {s_in} and teacher {t_in}: "
                              f"{fit.reason}", choices=fitting, bad=fit.transform,
                              fix="choose a transform that applies to these taps, or tap other layers")
        distribution = bool(self.transforms) and self.transforms[-1].distribution
        problem = self.distance.problem(fit[0], fit[1], distribution)
        if problem:
            fitting = [name for name, entry in DISTANCES.items() if entry.problem(fit[0], fit[1], distribution) is None]
            return KdkitError(problem, choices=fitting, bad=self.distance.name,
                              fix="choose a distance that compares these shapes, or add a transform that makes them "
                                  "equal (pool, relation, attention)")
        return None

    def _input_of(self, name: str, student: Shape, teacher: Shape) -> tuple[Shape, Shape]:
        """The per-sample shapes reaching transform ``name`` of the chain."""
        before = self.names[:self.names.index(name)]
        fit = fit_chain(before, self.transform_params, student, teacher)
        assert not isinstance(fit, Misfit)  # the first misfit is ``name`` itself
        return fit

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """The distance of the transformed taps times the chain's factors; labels are unused."""
        dtype = compute_dtype(student, teacher)
        s, t = Value(student.to(dtype)), Value(teacher.to(dtype))
        for transform in self.transforms:
            s, t = transform.apply(s, t, self.transform_params[transform.name])
        value = self.distance.fn(s, t, **self.distance_params)
        return (value * self.factor).to(student.dtype)
