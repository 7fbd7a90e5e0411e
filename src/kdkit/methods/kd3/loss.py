"""KD³'s loss: instance selection, weighted feature and classifier alignment, MixDistribution contrast.

The pure functions take tensors only, so each part can be checked by hand; :class:`Kd3Loss` holds the projector and
is handed the two classifiers by the method (:mod:`kdkit.methods.kd3.method`).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Le
from torch import Tensor, nn

from kdkit.losses.base import DistillLoss, compute_dtype, register_loss, run_widened

#: Floor of a sum of instance weights (a batch where nothing is selected gives a 0 term, not 0 / 0).
EPS = 1e-12


def select_instances(student_logits: Tensor, teacher_logits: Tensor, teacher_weight: float = 0.5,
                     threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    r"""Teacher-student instance selection: which web instances to learn from, and how much.

    The combined prediction is :math:`p_i = \beta\,\mathrm{softmax}(z^t_i) + (1-\beta)\,\mathrm{softmax}(z^s_i)`
    (:math:`\beta` = ``teacher_weight``; the student's side carries no gradient: selection is not trained). An
    instance is selected when its confidence :math:`c_i = \max_k p_{ik}` reaches ``threshold``; its weight is
    :math:`w_i = c_i\,[c_i \ge \tau]`. The selection is dynamic: it is recomputed at every step with the
    current student.

    Args:
        student_logits: ``(B, K)``.
        teacher_logits: ``(B, K)``.
        teacher_weight: :math:`\beta` in ``[0, 1]``.
        threshold: :math:`\tau`.

    Returns:
        ``(mask, weights)``: ``(B,)`` 0/1 selection and ``(B,)`` weights, in the computing precision.
    """
    dtype = compute_dtype(student_logits, teacher_logits)
    combined = (teacher_weight * teacher_logits.detach().to(dtype).softmax(1)
                + (1 - teacher_weight) * student_logits.detach().to(dtype).softmax(1))
    confidence = combined.max(1).values
    mask = (confidence >= threshold).to(dtype)
    return mask, confidence * mask


def selected_kd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 4.0) -> Tensor:
    r""":math:`\sum_i m_i\,T^2\,\mathrm{KL}(\mathrm{softmax}(z^t_i/T)\,\|\,\mathrm{softmax}(z^s_i/T)) /
    \max(\sum_i m_i, 1)`: KD on the selected instances only (0 when none is)."""
    dtype = compute_dtype(student_logits, teacher_logits, mask)
    log_p_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=1)
    per_sample = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1) * temperature**2
    return (per_sample * mask.to(dtype)).sum() / mask.to(dtype).sum().clamp_min(1)


def weighted_feature_alignment(projected: Tensor, teacher_features: Tensor, weights: Tensor) -> Tensor:
    r""":math:`\sum_i w_i\,\frac{1}{D}\lVert P f^s_i - f^t_i\rVert^2 / \sum_i w_i`: the projected student feature
    pulled to the teacher's, each instance as much as its selection weight (0 when nothing is selected)."""
    dtype = compute_dtype(projected, teacher_features, weights)
    squared = (projected.to(dtype) - teacher_features.detach().to(dtype)).pow(2).flatten(1).mean(1)
    weights = weights.to(dtype)
    return (squared * weights).sum() / weights.sum().clamp_min(EPS)


def classifier_alignment(student_weight: Tensor, student_bias: Tensor, teacher_weight: Tensor, teacher_bias: Tensor,
                         projector_weight: Tensor, projector_bias: Tensor) -> Tensor:
    r"""Align the student's classifier with the teacher's, seen through the projector :math:`P f = A f + a`.

    The teacher's classifier on the projected student feature is :math:`W_t(Af + a) + b_t`; the student's own is
    :math:`W_s f + b_s`. They are the same function when :math:`W_s = W_t A` and :math:`b_s = W_t a + b_t`, so

    .. math::
        \mathcal{L}_{cls} = \mathrm{mean}\big((W_s - W_t A)^2\big) + \mathrm{mean}\big((b_s - W_t a - b_t)^2\big)

    (with equal feature widths and :math:`P` the identity, :math:`\lVert W_s - W_t\rVert^2` and
    :math:`\lVert b_s - b_t\rVert^2` as means). The teacher's parameters are targets (no gradient).

    Args:
        student_weight: ``(K, D_s)``; student_bias: ``(K,)``.
        teacher_weight: ``(K, D_t)``; teacher_bias: ``(K,)``.
        projector_weight: ``A``, ``(D_t, D_s)``; projector_bias: ``a``, ``(D_t,)``.

    Returns:
        Scalar, in the computing precision.
    """
    dtype = compute_dtype(student_weight, teacher_weight, projector_weight)
    w_t, b_t = teacher_weight.detach().to(dtype), teacher_bias.detach().to(dtype)
    a, a_bias = projector_weight.to(dtype), projector_bias.to(dtype)
    weight_gap = (student_weight.to(dtype) - w_t @ a).pow(2).mean()
    bias_gap = (student_bias.to(dtype) - w_t @ a_bias - b_t).pow(2).mean()
    return weight_gap + bias_gap


def mix_contrast(projected_mixed: Tensor, teacher_features: Tensor, temperature: float = 0.1) -> Tensor:
    r"""Instance alignment across distributions (InfoNCE): the projected student feature of the MixDistribution
    image :math:`\tilde x_i` must pick out the teacher's feature of the original :math:`x_i` among the batch's.

    .. math::
        \mathcal{L}_{mix} = -\frac{1}{B}\sum_i \log\frac{\exp(q_i\cdot k_i/\tau)}{\sum_j \exp(q_i\cdot k_j/\tau)},
        \quad q_i = \frac{P f^s(\tilde x_i)}{\lVert\cdot\rVert},\ k_j = \frac{f^t(x_j)}{\lVert\cdot\rVert}
    """
    dtype = compute_dtype(projected_mixed, teacher_features)
    q = F.normalize(projected_mixed.to(dtype).flatten(1), dim=1)
    k = F.normalize(teacher_features.detach().to(dtype).flatten(1), dim=1)
    return F.cross_entropy(q @ k.T / temperature, torch.arange(len(q), device=q.device))


@register_loss("kd3", help="KD³ (Tang et al., ICCV 2023): distil from shifted web data -- instance selection, weighted "
                           "feature + classifier alignment, MixDistribution contrast (batch [x; mixed x])")
class Kd3Loss(DistillLoss):
    r"""KD³'s objective on a batch ``[x; MixDistribution(x)]`` (the ``kd3`` method's batch transform doubles it):

    .. math::
        \mathcal{L} = \mathcal{L}_{KD}^{sel} + \alpha\,\mathcal{L}_{feat} + \delta\,\mathcal{L}_{cls}
                      + \gamma\,\mathcal{L}_{mix}

    :func:`select_instances` and :func:`selected_kd`, :func:`weighted_feature_alignment` (on the originals),
    :func:`classifier_alignment` and :func:`mix_contrast` (mixed half against the teacher's originals). The
    projector :math:`P` (a linear layer, student feature width to teacher's) is a loss head: trained with the
    student, checkpointed with the objective, never deployed.

    Recipe (``train.ce_weight: 0``: the web pool has no labels; the taps are the defaults; the optional ``kd3:``
    section sets MixDistribution's ``mix_alpha``)::

        distill:
          - {loss: kd3, student: [logits, penultimate], teacher: [logits, penultimate]}
        kd3: {mix_alpha: 0.1}

    Args:
        temperature: KD temperature on the selected instances.
        teacher_weight: :math:`\beta` of the combined prediction (0.5: teacher and student alike).
        threshold: Confidence of the combined prediction from which an instance is selected.
        feature_weight: :math:`\alpha`.
        classifier_weight: :math:`\delta`.
        contrast_weight: :math:`\gamma`.
        contrast_temperature: :math:`\tau` of :func:`mix_contrast`.
    """
    reads_logits = frozenset({"classes"})

    pairwise = False
    # a tuple: the two taps each side gives at once (the recipe's list)
    default_student_tap = ("logits", "penultimate")  # type: ignore[assignment]
    default_teacher_tap = ("logits", "penultimate")  # type: ignore[assignment]

    def __init__(self, *, temperature: Annotated[float, Gt(0)] = 4.0,
                 teacher_weight: Annotated[float, Ge(0), Le(1)] = 0.5,
                 threshold: Annotated[float, Ge(0), Le(1)] = 0.5,
                 feature_weight: Annotated[float, Ge(0)] = 1.0, classifier_weight: Annotated[float, Ge(0)] = 1.0,
                 contrast_weight: Annotated[float, Ge(0)] = 1.0,
                 contrast_temperature: Annotated[float, Gt(0)] = 0.1) -> None:
        super().__init__()
        self.temperature, self.teacher_weight, self.threshold = temperature, teacher_weight, threshold
        self.feature_weight, self.classifier_weight = feature_weight, classifier_weight
        self.contrast_weight, self.contrast_temperature = contrast_weight, contrast_temperature
        self.projector: nn.Linear | None = None
        # the two classifiers, handed over by the method (a list: not submodules of the loss, never its state)
        self.classifiers: list[nn.Linear] = []
        self.selected = 0.0  # selected originals since the run (or its resumption) started
        self.seen = 0.0

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        return [(10,), (6,)], [(10,), (8,)]

    def check_shapes(self, student: Any, teacher: Any) -> str | None:
        """``[logits (K,), feature (D_s,)]`` and ``[logits (K,), feature (D_t,)]``."""
        s = [tuple(x) for x in student] if isinstance(student, list) else []
        t = [tuple(x) for x in teacher] if isinstance(teacher, list) else []
        if len(s) != 2 or len(t) != 2 or s[0] != t[0] or len(s[0]) != 1 or len(s[1]) != 1 or len(t[1]) != 1:
            return (f"needs student and teacher taps [logits, penultimate] giving [(K,), (D,)] each, got student "
                    f"{student} and teacher {teacher}")
        return None

    def setup(self, student_shape: Any, teacher_shape: Any, num_samples: int) -> None:
        """Build the projector from the student's feature width to the teacher's."""
        self.projector = nn.Linear(student_shape[1][0], teacher_shape[1][0])

    def bind_classifiers(self, student: nn.Linear, teacher: nn.Linear) -> None:
        """The linear classifiers that read the two penultimate features (the method calls this before training)."""
        self.classifiers = [student, teacher]

    def forward(self, student: list[Tensor], teacher: list[Tensor], labels: Tensor) -> Tensor:
        """KD³ on ``[originals; mixed]`` halves of ``[(2B, K), (2B, D_s)]`` and ``[(2B, K), (2B, D_t)]``."""
        if self.projector is None:
            raise RuntimeError("kd3: call setup() first (it builds the projector)")
        (s_logits, s_feat), (t_logits, t_feat) = student, teacher
        if len(s_logits) % 2:
            raise ValueError(f"kd3 reads batches [x; MixDistribution(x)] of even size, got {len(s_logits)}")
        b = len(s_logits) // 2
        mask, weights = select_instances(s_logits[:b], t_logits[:b], self.teacher_weight, self.threshold)
        self.selected += float(mask.sum())
        self.seen += b
        projected = run_widened(self.projector, s_feat.flatten(1))
        total = selected_kd(s_logits[:b], t_logits[:b], mask, self.temperature)
        if self.feature_weight:
            total = total + self.feature_weight * weighted_feature_alignment(projected[:b], t_feat[:b], weights)
        if self.contrast_weight:
            total = total + self.contrast_weight * mix_contrast(projected[b:], t_feat[:b], self.contrast_temperature)
        if self.classifier_weight and self.classifiers:
            s_fc, t_fc = self.classifiers
            total = total + self.classifier_weight * classifier_alignment(
                s_fc.weight, s_fc.bias, t_fc.weight, t_fc.bias, self.projector.weight, self.projector.bias)
        return total
