"""CTCL's three terms as pure functions and registered losses: HFD, region-wise BSD and pixel-wise BSD.

Each term reads both trained networks of the pair at once (``student: [A.tap, B.tap, ...]``), trains each network
from the other and detaches every target. See :mod:`kdkit.methods.ctcl` for the paper and what is reconstructed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor, nn

from kdkit.data.base import UNLABELLED
from kdkit.losses.base import DistillLoss, compute_dtype, register_loss

Projector = Callable[[Tensor], Tensor]
Rule = Literal["lower_ce", "correct"]


def common_grid(a: Tensor, b: Tensor) -> tuple[int, int]:
    """The coarser of two maps' spatial sizes, per axis: where two feature maps of different strides are compared."""
    return min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])


def mimic_map(student: Tensor, target: Tensor, project: Projector, normalize: bool) -> Tensor:
    """``(B, h, w)`` the per-position squared distance of ``project(student)`` to the detached ``target``.

    Both maps are average-pooled to :func:`common_grid` first; ``project`` maps the student's channels to the
    target's (a 1x1 convolution: it commutes with the pooling). With ``normalize`` each position's channel vector
    is L2-normalised on both sides (the distance is then ``2 - 2 cos``, in ``[0, 4]``); the distance is the mean
    over the target's channels.
    """
    grid = common_grid(student, target)
    s = project(F.adaptive_avg_pool2d(student, grid))
    t = F.adaptive_avg_pool2d(target.detach(), grid).to(s.dtype)
    if normalize:
        s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
    return (s - t).pow(2).mean(1)


def hfd_loss(a: Tensor, b: Tensor, a_to_b: Projector, b_to_a: Projector, normalize: bool = True) -> Tensor:
    r"""Heterogeneous feature distillation (HFD; Zhu, Luo, Zheng, Wang & Wang, "A Good Student is Cooperative and
    Reliable: CNN-Transformer Collaborative Learning for Semantic Segmentation", ICCV 2023): each network's low-layer
    features mimic the other's, both ways, each target detached.

    .. math::
        L_{HFD} = \frac{1}{Bhw}\sum_{n,i}\Big(\frac{1}{C_b}\big\|\nu(P_{ab} a_{n,i}) - \nu(\bar b_{n,i})\big\|^2
                  + \frac{1}{C_a}\big\|\nu(P_{ba} b_{n,i}) - \nu(\bar a_{n,i})\big\|^2\Big)

    over the positions ``i`` of the coarser grid (both maps average-pooled to it), :math:`P` the learnt 1x1
    projections, :math:`\bar{\cdot}` a detached target and :math:`\nu` the per-position L2 normalisation
    (``normalize``; identity when off).

    Args:
        a: ``(B, C_a, H_a, W_a)`` one network's low-layer features (e.g. the CNN's first stage).
        b: ``(B, C_b, H_b, W_b)`` the other's (e.g. the ViT's first block, as a token map).
        a_to_b: ``C_a -> C_b`` projection; ``b_to_a``: ``C_b -> C_a``.
        normalize: L2-normalise each position's channel vector (default; kdkit's choice, keeps two moving targets
            from shrinking together).

    Returns:
        Scalar, in the computing precision (float64 stays float64, half precisions upcast).
    """
    dtype = compute_dtype(a, b)
    a, b = a.to(dtype), b.to(dtype)
    return mimic_map(a, b, a_to_b, normalize).mean() + mimic_map(b, a, b_to_a, normalize).mean()


def pixel_ce(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, H, W)`` each pixel's cross-entropy (detached; 0 where unlabelled) and the labelled pixels' mask."""
    valid = targets != UNLABELLED
    ce = F.cross_entropy(logits.detach(), targets.clamp_min(0), reduction="none")
    return ce * valid, valid


def region_means(values: Tensor, valid: Tensor, regions: int) -> tuple[Tensor, Tensor]:
    """``(B, R, R)`` the mean of ``values`` over each region's labelled pixels, and which regions have any.

    The ``H x W`` map is split into ``R x R`` regions by adaptive pooling (equal blocks when ``R`` divides the size).
    """
    mask = valid.to(values.dtype).unsqueeze(1)
    total = F.adaptive_avg_pool2d(values.unsqueeze(1) * mask, regions).squeeze(1)
    count = F.adaptive_avg_pool2d(mask, regions).squeeze(1)
    return total / count.clamp_min(torch.finfo(values.dtype).tiny), count > 0


def region_teachers(za: Tensor, zb: Tensor, targets: Tensor, regions: int) -> tuple[Tensor, Tensor]:
    """``(B, R, R)`` masks of the regions where ``a`` teaches (its mean cross-entropy there is lower) and where ``b``
    does; a tie or a region without labelled pixels has no teacher."""
    dtype = compute_dtype(za, zb)
    ce_a, valid = pixel_ce(za.to(dtype), targets)
    ce_b, _ = pixel_ce(zb.to(dtype), targets)
    ra, labelled = region_means(ce_a, valid, regions)
    rb, _ = region_means(ce_b, valid, regions)
    return labelled & (ra < rb), labelled & (rb < ra)


def region_bsd_loss(fa: Tensor, fb: Tensor, za: Tensor, zb: Tensor, targets: Tensor, a_to_b: Projector,
                    b_to_a: Projector, regions: int = 4, normalize: bool = True) -> Tensor:
    r"""Region-wise bidirectional selective distillation (region-wise BSD; Zhu et al., ICCV 2023): the feature maps
    are split into ``R x R`` regions and, in each, the network whose prediction is more reliable there teaches the
    other its features.

    .. math::
        L_{rBSD} = \frac{1}{BR^2}\sum_{n,r}\big(\mathbb{1}[\bar\ell^b_{n,r} < \bar\ell^a_{n,r}]\,D_{a\leftarrow b}(n,r)
                   + \mathbb{1}[\bar\ell^a_{n,r} < \bar\ell^b_{n,r}]\,D_{b\leftarrow a}(n,r)\big)

    with :math:`\bar\ell^a_{n,r}` network ``a``'s mean per-pixel cross-entropy over region ``r``'s labelled pixels
    (from its logits at the label's resolution) and :math:`D_{a\leftarrow b}(n,r)` the mean over the region of
    :func:`mimic_map` (``a`` projected onto ``b``'s channels, ``b`` detached), both maps on the coarser grid. The
    regions tile the label map and the feature grid alike (adaptive pooling). A tie or an unlabelled region
    transfers nothing.

    Args:
        fa: ``(B, C_a, H_a, W_a)`` network ``a``'s features (e.g. its decoder's, the classifier's input).
        fb: ``(B, C_b, H_b, W_b)`` network ``b``'s.
        za: ``(B, K, H, W)`` ``a``'s logits; ``zb`` the same for ``b``.
        targets: ``(B, H, W)`` class indices, :data:`~kdkit.data.base.UNLABELLED` where unlabelled.
        a_to_b: ``C_a -> C_b`` projection; ``b_to_a``: ``C_b -> C_a``.
        regions: ``R``, regions per side (kdkit's default 4: 12x12-pixel regions on 48x48 scenes).
        normalize: As :func:`hfd_loss`.

    Returns:
        Scalar, in the computing precision.
    """
    dtype = compute_dtype(fa, fb, za, zb)
    fa, fb = fa.to(dtype), fb.to(dtype)
    a_teaches, b_teaches = region_teachers(za, zb, targets, regions)
    a_learns = F.adaptive_avg_pool2d(mimic_map(fa, fb, a_to_b, normalize).unsqueeze(1), regions).squeeze(1)
    b_learns = F.adaptive_avg_pool2d(mimic_map(fb, fa, b_to_a, normalize).unsqueeze(1), regions).squeeze(1)
    return (b_teaches * a_learns + a_teaches * b_learns).sum() / a_learns.numel()


def pixel_teachers(za: Tensor, zb: Tensor, targets: Tensor, rule: Rule = "lower_ce") -> tuple[Tensor, Tensor]:
    """``(B, H, W)`` masks of the pixels where ``a`` teaches and where ``b`` does.

    ``lower_ce``: the network with the lower cross-entropy at the pixel teaches (a tie: neither); ``correct``: also
    only where the teacher's arg-max is the label. Unlabelled pixels have no teacher.
    """
    dtype = compute_dtype(za, zb)
    ce_a, valid = pixel_ce(za.to(dtype), targets)
    ce_b, _ = pixel_ce(zb.to(dtype), targets)
    a_teaches, b_teaches = valid & (ce_a < ce_b), valid & (ce_b < ce_a)
    if rule == "correct":
        a_teaches = a_teaches & (za.detach().argmax(1) == targets)
        b_teaches = b_teaches & (zb.detach().argmax(1) == targets)
    return a_teaches, b_teaches


def pixel_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``(B, H, W)`` ``T^2 KL(softmax(teacher/T) || softmax(student/T))`` at each pixel, the teacher detached."""
    log_s = F.log_softmax(student / temperature, dim=1)
    log_t = F.log_softmax(teacher.detach() / temperature, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(1) * temperature**2


def pixel_bsd_loss(za: Tensor, zb: Tensor, targets: Tensor, temperature: float = 1.0,
                   rule: Rule = "lower_ce") -> Tensor:
    r"""Pixel-wise bidirectional selective distillation (pixel-wise BSD; Zhu et al., ICCV 2023): at each pixel the
    network whose prediction is more reliable teaches the other its class distribution, in logit space.

    .. math::
        L_{pBSD} = \frac{1}{|\Omega|}\sum_{(n,i)\in\Omega}\big(\mathbb{1}^a_{n,i}\,T^2\,
                   \mathrm{KL}(\bar p^a_{n,i}\,\|\,p^b_{n,i}) + \mathbb{1}^b_{n,i}\,T^2\,
                   \mathrm{KL}(\bar p^b_{n,i}\,\|\,p^a_{n,i})\big)

    :math:`\Omega` the labelled pixels, :math:`p = \mathrm{softmax}(z/T)`, :math:`\bar p` detached and
    :math:`\mathbb{1}^a` :func:`pixel_teachers`' mask where ``a`` teaches (``rule``).

    Args:
        za: ``(B, K, H, W)`` network ``a``'s logits; ``zb`` network ``b``'s.
        targets: ``(B, H, W)`` class indices, :data:`~kdkit.data.base.UNLABELLED` where unlabelled.
        temperature: ``T`` (default 1, as pixel-wise KD for segmentation; the loss is scaled by ``T^2``).
        rule: ``lower_ce`` (default) or ``correct`` (:func:`pixel_teachers`).

    Returns:
        Scalar, in the computing precision; 0 when no pixel is labelled.
    """
    dtype = compute_dtype(za, zb)
    za, zb = za.to(dtype), zb.to(dtype)
    a_teaches, b_teaches = pixel_teachers(za, zb, targets, rule)
    per_pixel = a_teaches * pixel_kl(zb, za, temperature) + b_teaches * pixel_kl(za, zb, temperature)
    return per_pixel.sum() / (targets != UNLABELLED).sum().clamp_min(1)


def projector(cin: int, cout: int) -> nn.Conv2d:
    """A learnt 1x1 convolution from ``cin`` to ``cout`` channels (with bias)."""
    return nn.Conv2d(cin, cout, 1)


def in_precision(module: nn.Module) -> Projector:
    """``module`` as a projection that computes in its input's precision (a float64 map is not cast down to the
    float32 weights: the weights are cast up)."""
    if not isinstance(module, nn.Conv2d):
        return module

    def run(x: Tensor) -> Tensor:
        bias = None if module.bias is None else module.bias.to(x.dtype)
        return F.conv2d(x, module.weight.to(x.dtype), bias)

    return run


def map_shapes_problem(what: str, shapes: list[tuple[int, ...]], count: int) -> str | None:
    """Why ``shapes`` are not ``count`` per-sample ``(C, H, W)`` maps, or ``None``."""
    if len(shapes) != count or any(len(s) != 3 for s in shapes):
        return f"{what} reads {count} (C, H, W) maps, one of each network in the same order, got {shapes}"
    return None


def as_shapes(student: Any) -> list[tuple[int, ...]]:
    """The per-sample shapes of a term's taps as a list of tuples."""
    return [tuple(s) for s in student] if isinstance(student, list) else [tuple(student)]


class PairLoss(DistillLoss):
    """What CTCL's terms share: they read both networks at once, need no frozen teacher, and count who taught.

    ``taught`` (checkpointed with the objective) counts the regions or pixels where each network was the teacher.
    """

    pairwise = False
    needs_teacher = False
    #: What ``taught`` counts.
    unit: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("taught", torch.zeros(2, dtype=torch.long))

    def _count(self, a_teaches: Tensor, b_teaches: Tensor) -> None:
        self.taught += torch.stack([a_teaches.sum(), b_teaches.sum()]).to(self.taught)


@register_loss("hfd", help="CTCL's heterogeneous feature distillation (ICCV 2023): two networks' low-layer features "
                           "mimic each other through learnt 1x1 projections; student: [A.tap, B.tap]")
class HfdLoss(DistillLoss):
    """HFD between two trained networks; see :func:`hfd_loss`. Recipe::

        distill:
          - {loss: hfd, student: [model.stage1, vit.low], weight: 1.0}

    Args:
        normalize: L2-normalise each position's channel vector before the squared distance (default True).
    """

    pairwise = False
    needs_teacher = False

    def __init__(self, *, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize
        self.a_to_b: nn.Module = nn.Identity()
        self.b_to_a: nn.Module = nn.Identity()

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        return [(8, 12, 12), (16, 6, 6)], None

    def check_shapes(self, student: Any, teacher: Any) -> str | None:
        return map_shapes_problem("hfd", as_shapes(student), 2)

    def setup(self, student_shape: Any, teacher_shape: Any, num_samples: int) -> None:
        """The two 1x1 projections, from the taps' channels."""
        (ca, *_), (cb, *_) = as_shapes(student_shape)
        self.a_to_b, self.b_to_a = projector(ca, cb), projector(cb, ca)

    def forward(self, student: list[Tensor], teacher: Tensor | None, labels: Tensor) -> Tensor:
        a, b = student
        return hfd_loss(a, b, in_precision(self.a_to_b), in_precision(self.b_to_a), self.normalize)


def pixel_example(cls: type[DistillLoss], batch: int, generator: torch.Generator | None) -> tuple[Any, Any, Tensor,
                                                                                                    Tensor]:
    """Random inputs of ``cls.example_shapes`` with ``(B, H, W)`` pixel labels (some unlabelled) for the last map."""
    shapes, _ = cls.example_shapes()
    student = [torch.randn(batch, *s, generator=generator) for s in shapes]
    k, h, w = shapes[-1]
    labels = torch.randint(-1, k, (batch, h, w), generator=generator)
    return student, None, labels, torch.arange(batch)


@register_loss("region_bsd", help="CTCL's region-wise BSD (ICCV 2023): per region, the network with the lower "
                                  "cross-entropy teaches the other its features; student: [A.feat, B.feat, "
                                  "A.logits, B.logits]")
class RegionBsdLoss(PairLoss):
    """Region-wise BSD between two trained networks; see :func:`region_bsd_loss`. Recipe::

        distill:
          - {loss: region_bsd, student: [model.decoder1, vit.high, model.logits, vit.logits], regions: 4}

    Args:
        regions: Regions per side ``R`` (kdkit's default 4).
        normalize: As :class:`HfdLoss`.
    """

    uses_labels = True
    unit = "regions"

    def __init__(self, *, regions: Annotated[int, Ge(1)] = 4, normalize: bool = True) -> None:
        super().__init__()
        self.regions, self.normalize = regions, normalize
        self.a_to_b: nn.Module = nn.Identity()
        self.b_to_a: nn.Module = nn.Identity()

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        return [(8, 8, 8), (16, 4, 4), (5, 8, 8), (5, 8, 8)], None

    @classmethod
    def example_inputs(cls, batch: int, generator: torch.Generator | None = None) -> tuple[Any, Any, Tensor, Tensor]:
        return pixel_example(cls, batch, generator)

    def check_shapes(self, student: Any, teacher: Any) -> str | None:
        shapes = as_shapes(student)
        problem = map_shapes_problem("region_bsd", shapes, 4)
        if problem is None and shapes[2] != shapes[3]:
            problem = f"region_bsd's two logit maps (taps 3 and 4) differ: {shapes[2]} and {shapes[3]}"
        return problem

    def setup(self, student_shape: Any, teacher_shape: Any, num_samples: int) -> None:
        """The two 1x1 projections, from the feature taps' channels."""
        (ca, *_), (cb, *_), *_ = as_shapes(student_shape)
        self.a_to_b, self.b_to_a = projector(ca, cb), projector(cb, ca)

    def forward(self, student: list[Tensor], teacher: Tensor | None, labels: Tensor) -> Tensor:
        fa, fb, za, zb = student
        self._count(*region_teachers(za, zb, labels, self.regions))
        return region_bsd_loss(fa, fb, za, zb, labels, in_precision(self.a_to_b), in_precision(self.b_to_a),
                               self.regions, self.normalize)


@register_loss("pixel_bsd", help="CTCL's pixel-wise BSD (ICCV 2023): per pixel, the network with the lower "
                                 "cross-entropy teaches the other its class distribution; student: [A.logits, "
                                 "B.logits]")
class PixelBsdLoss(PairLoss):
    """Pixel-wise BSD between two trained networks; see :func:`pixel_bsd_loss`. Recipe::

        distill:
          - {loss: pixel_bsd, student: [model.logits, vit.logits], temperature: 1}

    Args:
        temperature: ``T`` (default 1).
        rule: Who teaches a pixel: ``lower_ce`` (default) or ``correct`` (also right at that pixel).
    """

    uses_labels = True
    unit = "pixels"

    def __init__(self, *, temperature: Annotated[float, Gt(0)] = 1.0, rule: Rule = "lower_ce") -> None:
        super().__init__()
        self.temperature, self.rule = temperature, rule

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        return [(5, 6, 6), (5, 6, 6)], None

    @classmethod
    def example_inputs(cls, batch: int, generator: torch.Generator | None = None) -> tuple[Any, Any, Tensor, Tensor]:
        return pixel_example(cls, batch, generator)

    def check_shapes(self, student: Any, teacher: Any) -> str | None:
        shapes = as_shapes(student)
        problem = map_shapes_problem("pixel_bsd", shapes, 2)
        if problem is None and shapes[0] != shapes[1]:
            problem = f"pixel_bsd's two logit maps differ: {shapes[0]} and {shapes[1]}"
        return problem

    def forward(self, student: list[Tensor], teacher: Tensor | None, labels: Tensor) -> Tensor:
        za, zb = student
        self._count(*pixel_teachers(za, zb, labels, self.rule))
        return pixel_bsd_loss(za, zb, labels, self.temperature, self.rule)
