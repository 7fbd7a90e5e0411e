"""BACS's losses: the backward-background-shift detector, its background-aware cross-entropy, masked feature KD.

ElAraby, Harakeh & Paull, "BACS: Background Aware Continual Semantic Segmentation" (CRV 2024, arXiv:2404.13148).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Le
from torch import Tensor

from kdkit.data.base import UNLABELLED
from kdkit.losses.base import DistillLoss, compute_dtype, register_loss

Mask = Literal["background", "shifted", "all"]


def centroids(features: Tensor, assign: Tensor, classes: int) -> tuple[Tensor, Tensor]:
    """Mean feature of the pixels assigned to each class, and which classes have any.

    Args:
        features: ``(N, C, H, W)``.
        assign: ``(N, H, W)`` class of each pixel in ``[0, classes)``, or -1 for a pixel left out.
        classes: Number of classes.

    Returns:
        ``(classes, C)`` centroids (0 for an absent class) and ``(classes,)`` bool presence.
    """
    flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    index = assign.reshape(-1)
    kept = index >= 0
    one_hot = F.one_hot(index[kept], classes).to(flat.dtype)  # (P, classes)
    counts = one_hot.sum(0)
    sums = one_hot.t() @ flat[kept]
    return sums / counts.clamp_min(1).unsqueeze(1), counts > 0


def detect_shift(old_features: Tensor, old_logits: Tensor, labels: Tensor, normalize: bool = True) -> Tensor:
    r"""BACS's backward-background-shift detector: the background-labelled pixels that show an old class.

    In the old model's feature space (``old_features``, the step-1 model's last decoder map) the batch's
    background-labelled pixels are split by the old model's prediction (argmax of ``old_logits``) and the
    centroid :math:`\mu_c` of each predicted class is taken: :math:`\mu_0` of the pixels it calls background, the
    foreground centroids :math:`\mu_c` (:math:`c \ge 1`) of those it calls an old class. A background-labelled pixel
    with feature :math:`f` is *shifted* (an old class under the background label) when it is nearer a foreground
    centroid than the background one, :math:`\min_{c \ge 1} \lVert f - \mu_c\rVert < \lVert f - \mu_0\rVert`
    (features L2-normalised first when ``normalize``). With no foreground centroid no pixel is shifted; with no
    background centroid every background pixel near a foreground one is.

    Reconstructed: the paper detects old classes by the distance from "the foreground centroids of previous steps"
    (running means of projected foreground features, a learnt projector and per-step foreground filters); here the
    centroids are the batch's, in the old model's own features, from its own predictions (no extra network, no
    state), and the threshold is the background centroid's distance (no tuned threshold).

    Args:
        old_features: ``(N, C, H, W)`` old-model features (at the masks' resolution).
        old_logits: ``(N, K_o, H, W)`` old-model logits.
        labels: ``(N, H, W)`` step-2 masks (0 background, :data:`UNLABELLED` ignored).
        normalize: L2-normalise the features over channels before the distances.

    Returns:
        ``(N, H, W)`` bool: background-labelled pixels detected as an old class.
    """
    features = old_features.detach().to(compute_dtype(old_features))
    if normalize:
        features = F.normalize(features, dim=1)
    background = labels == 0
    predicted = old_logits.detach().argmax(1)
    mu, present = centroids(features, torch.where(background, predicted, torch.full_like(predicted, -1)),
                            old_logits.shape[1])
    distance = torch.cdist(features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]), mu)  # (P, K_o)
    distance = distance.masked_fill(~present, float("inf"))
    nearest_fg = distance[:, 1:].min(1).values  # the old model has background and at least one class
    shifted = (nearest_fg < distance[:, 0]).view(labels.shape)
    return shifted & background


def bacs_ce_loss(logits: Tensor, labels: Tensor, shifted: Tensor, shift_weight: float = 0.0) -> Tensor:
    r"""BACS's background-shift-aware cross-entropy: the per-pixel cross-entropy with the labels, each
    background-labelled pixel that the detector calls an old class weighted ``shift_weight`` (the paper's
    "down-weight"; 0, the default, leaves it out: its background label is likely wrong), every other labelled pixel 1:

    .. math::
        \ell = \frac{\sum_i w_i\,\mathrm{CE}(z_i, y_i)}{\sum_i w_i},\quad
        w_i = \begin{cases} \texttt{shift\_weight} & i \text{ shifted} \\ 1 & \text{else}\end{cases}

    over the labelled pixels (0 when every weight is 0).

    Args:
        logits: ``(N, K, H, W)`` student logits.
        labels: ``(N, H, W)`` masks, :data:`UNLABELLED` ignored.
        shifted: ``(N, H, W)`` bool from :func:`detect_shift`.
        shift_weight: Weight of the shifted pixels, in ``[0, 1]``.
    """
    z = logits.to(compute_dtype(logits))
    labelled = labels != UNLABELLED
    ce = F.cross_entropy(z, labels.long().clamp_min(0), reduction="none")
    weight = torch.where(shifted, torch.full_like(ce, shift_weight), torch.ones_like(ce)) * labelled.to(ce.dtype)
    total = weight.sum()
    return (weight * ce).sum() / total.clamp_min(torch.finfo(ce.dtype).tiny)


def masked_feature_kd(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    r"""BACS's masked feature distillation: the squared distance of the student's and the old model's features,
    averaged over channels and over the masked pixels (0 when none is masked):
    :math:`\frac{1}{C\,|M|}\sum_{i \in M}\lVert f^s_i - f^t_i\rVert^2`.

    Args:
        student: ``(N, C, H, W)`` student features.
        teacher: ``(N, C, H, W)`` old-model features (detached).
        mask: ``(N, H, W)`` bool, the pixels distilled.
    """
    dtype = compute_dtype(student, teacher)
    diff = (student.to(dtype) - teacher.detach().to(dtype)).pow(2).sum(1)
    m = mask.to(dtype)
    return (diff * m).sum() / (m.sum() * student.shape[1]).clamp_min(1)


def kd_mask(labels: Tensor, shifted: Tensor, mask: Mask) -> Tensor:
    """The pixels whose features are distilled: background-labelled ones (default), the shifted ones, or all
    labelled ones."""
    if mask == "background":
        return labels == 0
    if mask == "shifted":
        return shifted
    return labels != UNLABELLED


@register_loss("bacs", help="BACS (CRV 2024): background-shift-aware CE (detected old-class pixels down-weighted) + "
                            "masked feature KD from the old model; student/teacher: [decoder1, logits]")
class BacsLoss(DistillLoss):
    """BACS's step-2 objective: :func:`bacs_ce_loss` + ``feature_weight`` x :func:`masked_feature_kd`.

    It replaces the task's cross-entropy (set ``train.ce_weight: 0``). Recipe::

        distill:
          - {loss: bacs, student: [decoder1, logits], teacher: [decoder1, logits], feature_weight: 1}

    Taps: the student's and the old model's last decoder features (one width: the student is grown from the old
    model) and their logits.

    Args:
        shift_weight: Weight of the background pixels detected as old classes in the cross-entropy (0: left out).
        feature_weight: Weight of the masked feature distillation.
        mask: Pixels whose features are distilled: ``background`` (default: the background-labelled ones, where the
            old classes can be; a new class's pixels may change), ``shifted`` (the detected ones) or ``all``.
        normalize: L2-normalise the features in the detector.
    """

    pairwise = False
    uses_labels = True

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """Student ``[features (6, 5, 5), logits (7, 5, 5)]``, old model ``[features (6, 5, 5), logits (4, 5, 5)]``."""
        return [(6, 5, 5), (7, 5, 5)], [(6, 5, 5), (4, 5, 5)]

    @classmethod
    def example_inputs(cls, batch: int, generator: torch.Generator | None = None) -> tuple[Any, Any, Tensor, Tensor]:
        """Random maps of :meth:`example_shapes`; ``(B, 5, 5)`` masks over the 7 outputs, some unlabelled."""
        (fs, zs), (ft, zt) = cls.example_shapes()
        draw = [torch.randn(batch, *s, generator=generator) for s in (fs, zs, ft, zt)]
        labels = torch.randint(-1, zs[0], (batch, *zs[1:]), generator=generator)
        return draw[:2], draw[2:], labels, torch.arange(batch)

    def __init__(self, *, shift_weight: Annotated[float, Ge(0), Le(1)] = 0.0,
                 feature_weight: Annotated[float, Ge(0)] = 1.0, mask: Mask = "background",
                 normalize: bool = True) -> None:
        super().__init__()
        self.shift_weight, self.feature_weight, self.mask, self.normalize = shift_weight, feature_weight, mask, \
            normalize

    def check_shapes(self, student: Any, teacher: Any) -> str | None:
        """Two taps each, ``[features (C, H, W), logits (K, H, W)]``, one feature width, ``K_o <= K``."""
        problem = ("bacs needs student and teacher taps [features, logits]: per-sample [(C, H, W), (K, H, W)] of one "
                   f"C and H x W, the old model's K in 2..the student's; got {student} and {teacher}")
        try:
            (fs, zs), (ft, zt) = [tuple(map(tuple, x)) for x in (student, teacher)]
        except (TypeError, ValueError):
            return problem
        if any(len(s) != 3 for s in (fs, zs, ft, zt)) or fs != ft or zs[1:] != zt[1:] or fs[1:] != zs[1:] \
                or not 2 <= zt[0] <= zs[0]:
            return problem
        return None

    def forward(self, student: list[Tensor], teacher: list[Tensor], labels: Tensor) -> Tensor:
        features, logits = student
        old_features, old_logits = teacher
        shifted = detect_shift(old_features, old_logits, labels, self.normalize)
        loss = bacs_ce_loss(logits, labels, shifted, self.shift_weight)
        if self.feature_weight:
            loss = loss + self.feature_weight * masked_feature_kd(features, old_features,
                                                                  kd_mask(labels, shifted, self.mask))
        return loss
