r"""LELP's student head: ``C * S`` pseudo-subclass logits on the student's embedding, deployed as the classifier.

The paper trains the student on the expanded ``S * C``-class problem (its output layer widened to ``S * C``) and
predicts a class by summing its subclasses' probabilities. The ``lelp_head`` bridge is that output layer: a linear
layer on the student tap (flattened) to ``C * S`` logits :math:`u` (class-major, index ``c * S + s``). It is the
deployed classifier (a :class:`~kdkit.bridges.roles.DeployingBridge`: the deployed network runs up to the tap and
this head; the student's own output layer is not used), with class logits

.. math:: \ell_c = \log \sum_s e^{u_{c,s}}

whose softmax is exactly :math:`\sum_s \mathrm{softmax}(u)_{c,s}`. A cross-entropy with the labels
(``train.ce_weight``, the paper's :math:`\alpha`) reads these class logits.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from annotated_types import Ge
from torch import Tensor, nn

from kdkit.bridges import register_bridge
from kdkit.bridges.roles import DeployingBridge
from kdkit.errors import KdkitError


def class_logits(subclass_logits: Tensor, classes: int) -> Tensor:
    """``(B, C)``: :math:`\\log \\sum_s e^{u_{c,s}}` of class-major ``(B, C * S)`` subclass logits."""
    return subclass_logits.unflatten(1, (classes, -1)).logsumexp(2)


class LelpHead(DeployingBridge):
    """Flatten the student tap, one linear layer to ``classes * subclasses`` logits.

    Args:
        features: Width of the flattened student tap.
        classes: ``C``.
        subclasses: ``S`` per class.
    """

    def __init__(self, features: int, classes: int, subclasses: int) -> None:
        super().__init__()
        self.classes, self.subclasses = classes, subclasses
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(features, classes * subclasses)

    def forward(self, feature: Tensor) -> Tensor:
        """``(B, C * S)`` pseudo-subclass logits of the student tap ``(B, ...)``."""
        return self.linear(self.flatten(feature))

    def output_shape(self, input_shape: Any) -> tuple[int, ...]:
        """What the ``lelp`` loss compares: the ``(C * S,)`` subclass logits."""
        return (self.classes * self.subclasses,)

    def deploy(self, out: Tensor, model_logits: Tensor | None) -> tuple[Tensor, Tensor]:
        """The class logits (logsumexp over each class's subclasses), and the subclass logits for the loss."""
        return class_logits(out, self.classes), out

    def extra_repr(self) -> str:
        return f"classes={self.classes}, subclasses={self.subclasses}"


@register_bridge("lelp_head", help="LELP's output layer: C * S pseudo-subclass logits on the student's embedding, "
                                   "deployed as the classifier (class logit = logsumexp of its subclasses')",
                 example_shapes=((16,), [(2,), (8,)]))
def lelp_head(student_shape: tuple[int, ...], teacher_shape: Any, *,
              subclasses: Annotated[int, Ge(2)] = 4) -> LelpHead:
    """LELP's student head (Loo et al., 2024; see :mod:`kdkit.methods.lelp`).

    Args:
        student_shape: Per-sample shape of the student tap (flattened), e.g. ``penultimate``'s.
        teacher_shape: The ``lelp`` term's teacher taps: ``[(C,), embedding shape]`` (the logits first).
        subclasses: ``S``, pseudo-subclasses (PCA directions) per class. 4: the paper tunes it per task (its grid
            is in its appendix); with a binary task, 8 logits.
    """
    if not isinstance(teacher_shape, list) or len(teacher_shape) != 2 or len(tuple(teacher_shape[0])) != 1:
        raise KdkitError(f"lelp_head reads the lelp term's two teacher taps, the logits (C,) and the embedding, got "
                         f"teacher tap shape(s) {teacher_shape}", fix="give the lelp term `teacher: [logits, "
                         "penultimate]` (its default) and `loss: lelp`")
    return LelpHead(math.prod(student_shape), teacher_shape[0][0], subclasses)
