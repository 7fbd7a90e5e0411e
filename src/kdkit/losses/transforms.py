"""Knowledge transforms of the distiller grammar: what a ``composed`` term does to both taps before comparing them.

A transform maps the student's and the teacher's tensor alike (``(B, ...)`` in, ``(B, ...)`` out); a chain of them,
then a distance (:mod:`kdkit.losses.distances`), is one ``composed`` term (:mod:`kdkit.losses.composed`). Each is a
small function reusing the existing losses' pieces (AT's attention map, PKD's channel standardisation, SP's relation
matrix, logit standardisation), registered with:

* a shape rule on per-sample shapes (``(K,)`` logits, ``(C, H, W)`` maps): the output shapes, or why the
  transform does not apply -- checked before training, so a misfit term never reaches the first batch;
* its keyword parameters, with bounds in their types (validated like a loss's);
* a symbol for the human-readable formula, and a factor the term is multiplied by (``T²`` after a temperature
  softmax, as Hinton's KD).

The transforms follow the operation families of Auto-KD (Li et al., ICCV 2023: global, intra-spatial and
inter-spatial transforms -- attention, masks, multi-scale pooling, normalisations, relations) and KD-Zero (Li et al.,
NeurIPS 2023). Per-sample shape entries equal to :data:`BATCH` have the batch's size (relation matrices).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Le, Lt, MinLen
from torch import Tensor

from kdkit.losses.at import attention_map
from kdkit.losses.pkd import standardize_channels
from kdkit.losses.sp import similarity_matrix
from kdkit.losses.standardize import standardize_logits
from kdkit.registry import Registry

#: A per-sample dimension whose size is the batch size (the ``(B, B)`` relation matrix has per-sample shape
#: ``(BATCH,)``).
BATCH = -1

Shape = tuple[int, ...]
#: A shape rule: ``(student_shape, teacher_shape, **params) -> (student_out, teacher_out)``, or the reason
#: (a sentence) the transform does not apply to these shapes.
ShapeRule = Callable[..., "tuple[Shape, Shape] | str"]


@dataclass(frozen=True)
class Value:
    """One side's tensor inside a chain.

    Attributes:
        x: The ``(B, ...)`` values.
        log_prob: ``log x`` when ``x`` is a probability distribution over dim 1 made by a temperature softmax (the
            divergences read it, so a saturated softmax never gives ``0 * log 0``); ``None`` otherwise.
    """

    x: Tensor
    log_prob: Tensor | None = None


@dataclass(frozen=True)
class Transform:
    """A registered transform (see the module docstring).

    Attributes:
        name: The registered name.
        fn: ``fn(x, **params) -> Tensor`` (or ``fn(student, teacher, **params) -> (student, teacher)`` when
            ``paired``); its keyword-only parameters are the recipe's ``transform_params.NAME``.
        rule: The shape rule.
        symbol: ``symbol(x, **params)``: the transform applied to the expression ``x``, for formulas.
        paired: ``fn`` sees both sides at once (masks drawn once and applied to both, or read from the teacher).
        distribution: ``fn`` returns log-probabilities over dim 1, kept as a distribution (:class:`Value`).
        terminal: The transform ends a chain (the softmaxes: what follows compares probabilities, it does not
            transform them further).
        factor: ``factor(**params)``: the term is multiplied by it (``T²`` for a temperature softmax).
        factor_symbol: ``factor_symbol(**params)``: that factor in formulas (``""`` when it is 1).
    """

    name: str
    fn: Callable[..., Any]
    rule: ShapeRule
    symbol: Callable[..., str]
    paired: bool = False
    distribution: bool = False
    terminal: bool = False
    factor: Callable[..., float] = lambda **_: 1.0
    factor_symbol: Callable[..., str] = lambda **_: ""

    def apply(self, student: Value, teacher: Value, params: dict[str, Any]) -> tuple[Value, Value]:
        """Both sides transformed alike."""
        if self.paired:
            s, t = self.fn(student.x, teacher.x, **params)
            return Value(s), Value(t)
        if self.distribution:
            log_s, log_t = self.fn(student.x, **params), self.fn(teacher.x, **params)
            return Value(log_s.exp(), log_s), Value(log_t.exp(), log_t)
        return Value(self.fn(student.x, **params)), Value(self.fn(teacher.x, **params))


TRANSFORMS: Registry[Transform] = Registry("transform", fix="see docs/distiller-grammar.md for the transforms")


def register_transform(name: str, *, rule: ShapeRule, symbol: Callable[..., str], paired: bool = False,
                       distribution: bool = False, terminal: bool = False, factor: Callable[..., float] | None = None,
                       factor_symbol: Callable[..., str] | None = None) -> Callable[[Callable[..., Any]],
                                                                                    Callable[..., Any]]:
    """Register ``fn`` as transform ``name`` (see :class:`Transform` for the arguments); its docstring's first
    line is its ``help``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        extra = {k: v for k, v in (("factor", factor), ("factor_symbol", factor_symbol)) if v is not None}
        TRANSFORMS.add(name, Transform(name, fn, rule, symbol, paired, distribution, terminal, **extra))
        return fn

    return deco


# -- shape rules -----------------------------------------------------------------------------------------------------

def _unary(rule: Callable[..., Shape | str]) -> ShapeRule:
    """A shape rule applying the one-side ``rule`` to each side (the first side's reason wins)."""

    def both(s: Shape, t: Shape, **params: Any) -> tuple[Shape, Shape] | str:
        out_s, out_t = rule(s, **params), rule(t, **params)
        if isinstance(out_s, str):
            return out_s
        if isinstance(out_t, str):
            return out_t
        return out_s, out_t

    return both


def _any(shape: Shape, **_: Any) -> Shape:
    return shape


def _vector(shape: Shape, **_: Any) -> Shape | str:
    if len(shape) != 1:
        return f"needs per-sample (K,) vectors such as logits, got {shape}"
    return shape


def _with_channels(shape: Shape, **_: Any) -> Shape | str:
    if len(shape) < 1 or BATCH in shape:
        return f"needs per-sample (C, ...) tensors with a channel dim, got {shape}"
    return shape


def _maps(shape: Shape) -> str | None:
    if len(shape) != 3 or BATCH in shape:
        return f"needs per-sample (C, H, W) feature maps, got {shape}"
    return None


def _attention_shape(shape: Shape, **_: Any) -> Shape | str:
    return _maps(shape) or shape[1:]


def _pool_shape(shape: Shape, *, levels: Sequence[int] = (1, 2, 4)) -> Shape | str:
    return _maps(shape) or (shape[0] * sum(level * level for level in levels),)


def _relation_shape(shape: Shape, **_: Any) -> Shape:
    return (BATCH,)


def _same_positions(s: Shape, t: Shape, **_: Any) -> tuple[Shape, Shape] | str:
    """Masks that zero the same positions on both sides: equal shapes, or maps of one spatial size."""
    if s == t:
        return s, t
    if len(s) == 3 and len(t) == 3 and s[1:] == t[1:]:
        return s, t
    return f"masks the same positions of both sides: needs equal shapes or (C, H, W) maps of one size, got {s} and {t}"


def _teacher_mask_shape(s: Shape, t: Shape, **params: Any) -> tuple[Shape, Shape] | str:
    problem = _maps(s) or _maps(t)
    if problem:
        return problem
    return _same_positions(s, t, **params)


# -- transforms ------------------------------------------------------------------------------------------------------

@register_transform("identity", rule=_unary(_any), symbol=lambda x: x)
def identity(x: Tensor) -> Tensor:
    """The tap as it is (FitNets' hint, plain logit regression). Any shape."""
    return x


def _t2(temperature: float = 4.0) -> float:
    return temperature**2


def _log_softmax(x: Tensor, temperature: float) -> Tensor:
    """``log softmax(x / T)`` over each sample's values, or over each channel's positions for ``(B, C, H, W)``."""
    flat = x.flatten(2) if x.dim() == 4 else x.flatten(1)
    return F.log_softmax(flat / temperature, dim=-1).view_as(x)


@register_transform("softmax_t", rule=_unary(_any), distribution=True, terminal=True, factor=_t2,
                    symbol=lambda x, temperature=4.0: f"softmax({x}/{temperature:g})",
                    factor_symbol=lambda temperature=4.0: f"{temperature:g}²" if temperature != 1 else "")
def softmax_t(x: Tensor, *, temperature: Annotated[float, Gt(0)] = 4.0) -> Tensor:
    r"""Temperature softmax, :math:`p = \mathrm{softmax}(z / T)` (Hinton et al., 2015); the term is multiplied by
    :math:`T^2`.

    Over each sample's values (``(B, K)`` logits: over the classes, Hinton's KD); for ``(B, C, H, W)`` maps over each
    channel's spatial positions (channel-wise distillation, Shu et al., ICCV 2021). Returns the log-probabilities
    :math:`\log p` (the chain keeps :math:`p` and :math:`\log p`, so the divergences are exact on saturated
    softmaxes). The :math:`T^2` factor keeps the gradient's scale independent of :math:`T` (Hinton's KD). Ends a
    chain.

    Args:
        x: ``(B, ...)`` tensor.
        temperature: Softening temperature ``T`` (KD on CIFAR: 4).
    """
    return _log_softmax(x, temperature)


@register_transform("log_softmax_t", rule=_unary(_any), terminal=True,
                    symbol=lambda x, temperature=1.0: f"log softmax({x}/{temperature:g})")
def log_softmax_t(x: Tensor, *, temperature: Annotated[float, Gt(0)] = 1.0) -> Tensor:
    r"""Log of the temperature softmax (over the same values as ``softmax_t``) as plain values, e.g. to regress
    log-probabilities with MSE; no :math:`T^2` factor. Ends a chain.

    Args:
        x: ``(B, ...)`` tensor.
        temperature: Softening temperature ``T``.
    """
    return _log_softmax(x, temperature)


@register_transform("standardize", rule=_unary(_vector), symbol=lambda x: f"std({x})")
def standardize(x: Tensor) -> Tensor:
    r"""Logit standardisation: z-score each sample's logits, :math:`(z - \bar z)/(\sigma(z) + 10^{-7})` (Sun et al.,
    CVPR 2024); :func:`~kdkit.losses.standardize.standardize_logits`. ``(B, K)`` -> ``(B, K)``.

    Args:
        x: ``(B, K)`` logits.
    """
    return standardize_logits(x)


@register_transform("channel_std", rule=_unary(_with_channels), symbol=lambda x: f"cstd({x})")
def channel_std(x: Tensor) -> Tensor:
    r"""Channel standardisation: each channel to zero mean and unit (unbiased) std over the batch and spatial dims,
    :math:`(f_c - \mu_c)/(\sigma_c + 10^{-6})` (PKD, Cao et al., NeurIPS 2022);
    :func:`~kdkit.losses.pkd.standardize_channels`. ``(B, C, ...)`` -> same shape.

    Args:
        x: ``(B, C, ...)`` tensor.
    """
    return standardize_channels(x)


@register_transform("l2_normalize", rule=_unary(_any), symbol=lambda x: f"{x}/‖{x}‖")
def l2_normalize(x: Tensor) -> Tensor:
    r"""Scale each sample to unit L2 norm over all its values, :math:`x / \lVert \mathrm{vec}(x)\rVert_2` (AT's
    normalisation of the attention map). Any shape.

    Args:
        x: ``(B, ...)`` tensor.
    """
    return F.normalize(x.flatten(1), dim=1).view_as(x)


@register_transform("attention", rule=_unary(_attention_shape), symbol=lambda x, p=2.0: f"att_{p:g}({x})")
def attention(x: Tensor, *, p: Annotated[float, Gt(0)] = 2.0) -> Tensor:
    r"""Spatial attention map :math:`\mathrm{mean}_c |f_c|^p` (AT, Zagoruyko and Komodakis, ICLR 2017; Auto-KD's
    intra-spatial attention); :func:`~kdkit.losses.at.attention_map`, not normalised (chain ``l2_normalize`` for
    AT). ``(B, C, H, W)`` -> ``(B, H, W)``: channel counts may differ between student and teacher.

    Args:
        x: ``(B, C, H, W)`` feature map.
        p: Exponent (AT's default 2).
    """
    return attention_map(x, p)


@register_transform("pool", rule=_unary(_pool_shape),
                    symbol=lambda x, levels=(1, 2, 4): f"pool_{{{','.join(str(v) for v in levels)}}}({x})")
def pool(x: Tensor, *, levels: Annotated[tuple[Annotated[int, Ge(1)], ...], MinLen(1)] = (1, 2, 4)) -> Tensor:
    r"""Multi-scale pooling: adaptive average pooling of the map to each ``L x L`` grid of ``levels``, flattened and
    concatenated (a spatial pyramid; Auto-KD's multi-scale transform). ``(B, C, H, W)`` ->
    ``(B, C * sum(L²))``: maps of different spatial sizes become comparable.

    Args:
        x: ``(B, C, H, W)`` feature map.
        levels: Grid sizes ``L`` (default 1, 2 and 4: global, quadrants, 4x4).
    """
    return torch.cat([F.adaptive_avg_pool2d(x, level).flatten(1) for level in levels], dim=1)


@register_transform("relation", rule=_unary(_relation_shape), symbol=lambda x: f"G({x})")
def relation(x: Tensor) -> Tensor:
    r"""Sample relation matrix: the row-normalised Gram matrix :math:`\mathrm{rownorm}(Q Q^\top)` of the flattened
    batch ``Q`` (SP, Tung and Mori, ICCV 2019; Auto-KD's inter-sample relation);
    :func:`~kdkit.losses.sp.similarity_matrix`. ``(B, ...)`` -> ``(B, B)``: any widths become comparable.

    Args:
        x: ``(B, ...)`` tensor.
    """
    return similarity_matrix(x)


def _position_mask(student: Tensor, keep: Tensor) -> Tensor:
    """``keep`` (``(B, H, W)`` for maps, else the per-sample shape) broadcast over a map's channels."""
    return keep.unsqueeze(1) if student.dim() == 4 and keep.dim() == 3 else keep


@register_transform("random_mask", rule=_same_positions, paired=True,
                    symbol=lambda x, ratio=0.5: f"mask_{ratio:g}({x})")
def random_mask(student: Tensor, teacher: Tensor, *,
                ratio: Annotated[float, Ge(0), Lt(1)] = 0.5) -> tuple[Tensor, Tensor]:
    r"""Random masking: zero the same randomly drawn positions on both sides, each with probability ``ratio``
    (spatial positions of ``(B, C, H, W)`` maps, across channels; entries of other tensors). A new mask every call,
    from torch's global generator (seeded by the run). Auto-KD's and KD-Zero's mask operation.

    Args:
        student: ``(B, ...)`` student tensor.
        teacher: ``(B, ...)`` teacher tensor (same positions).
        ratio: Probability that a position is zeroed.
    """
    shape = (student.shape[0], *student.shape[2:]) if student.dim() == 4 else student.shape
    keep = (torch.rand(shape, device=student.device) >= ratio).to(student.dtype)
    mask = _position_mask(student, keep)
    return student * mask, teacher * mask


@register_transform("teacher_mask", rule=_teacher_mask_shape, paired=True,
                    symbol=lambda x, keep=0.5: f"top_{keep:g}({x})")
def teacher_mask(student: Tensor, teacher: Tensor, *,
                 keep: Annotated[float, Gt(0), Le(1)] = 0.5) -> tuple[Tensor, Tensor]:
    r"""Teacher-attention masking: keep the spatial positions where the teacher's attention
    :math:`\mathrm{mean}_c |f_t|^2` is among the top ``keep`` fraction of the sample's positions, zero the others on
    both sides (Auto-KD's attention mask). The mask carries no gradient.

    Args:
        student: ``(B, C_s, H, W)`` student map.
        teacher: ``(B, C_t, H, W)`` teacher map.
        keep: Fraction of positions kept (at least one).
    """
    scores = attention_map(teacher.detach()).flatten(1)
    k = max(1, round(keep * scores.shape[1]))
    threshold = scores.topk(k, dim=1).values[:, -1:]
    kept = (scores >= threshold).to(student.dtype).view(teacher.shape[0], *teacher.shape[2:])
    mask = _position_mask(student, kept)
    return student * mask, teacher * mask


@dataclass(frozen=True)
class Misfit:
    """Why a chain does not apply: the first transform whose shape rule refused its input, and its reason."""

    transform: str
    reason: str


def fit_chain(names: Sequence[str], params: dict[str, dict[str, Any]], student: Shape,
              teacher: Shape) -> tuple[Shape, Shape] | Misfit:
    """Run the chain's shape rules on per-sample shapes: the output shapes, or the first :class:`Misfit`."""
    s, t = tuple(student), tuple(teacher)
    for name in names:
        out = TRANSFORMS.get(name).rule(s, t, **params.get(name, {}))
        if isinstance(out, str):
            return Misfit(name, out)
        s, t = out
    return s, t
