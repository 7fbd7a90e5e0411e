"""MDCS's experts: several classifier heads on one shared student feature, deployed as their averaged logits.

The ``mdcs_experts`` bridge reads one student tap (the feature the model's classifier reads, ``penultimate``) and
gives every expert's raw logits ``(B, E, K)``. It is a :class:`~kdkit.bridges.roles.DeployingBridge`: the deployed
network runs the model up to the tap and predicts the experts' mean raw logits, ``(1/E) sum_k v_k`` (the official
code's ``final_out = torch.stack(outs, dim=1).mean(dim=1)``, which ``test.py`` scores); the prior shifts of the
diversity loss are training-only. The model's own classifier (after the tap) is not part of the deployed network.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor, nn

from kdkit.bridges import register_bridge
from kdkit.bridges.roles import DeployingBridge

Classifier = Literal["cosine", "linear"]


class CosineClassifier(nn.Module):
    """``scale * normalize(f) @ normalize(W)``: the official code's ``NormedLinear`` times ``s`` (30 for CIFAR-LT).

    Args:
        features: Input width.
        classes: Output width.
        scale: The logit scale ``s``.
    """

    def __init__(self, features: int, classes: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(features, classes).uniform_(-1, 1))
        self.scale = scale

    def forward(self, feature: Tensor) -> Tensor:
        """``(B, K)`` scaled cosine similarities of ``(B, D)`` features with the class weights."""
        return self.scale * F.normalize(feature, dim=1) @ F.normalize(self.weight, dim=0)

    def extra_repr(self) -> str:
        return f"features={self.weight.shape[0]}, classes={self.weight.shape[1]}, scale={self.scale}"


def expert(features: int, classes: int, hidden: int, classifier: Classifier, scale: float) -> nn.Module:
    """One expert: an optional expert-own hidden layer (linear, BN, ReLU), then its classifier."""
    head = CosineClassifier(hidden or features, classes, scale) if classifier == "cosine" \
        else nn.Linear(hidden or features, classes)
    if not hidden:
        return head
    return nn.Sequential(nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), head)


class MdcsExperts(DeployingBridge):
    """``E`` expert heads on the flattened student tap; deployed as the mean of their raw logits.

    Args:
        features: Width of the flattened tap.
        classes: Classes ``K``.
        experts: ``E`` (at least 2).
        hidden: Width of each expert's own hidden layer (0: the classifier reads the shared feature directly).
        classifier: ``cosine`` (the official code's normed linear layer times ``scale``) or ``linear``.
        scale: Logit scale of the cosine classifier.
    """

    def __init__(self, features: int, classes: int, experts: int, hidden: int = 0, classifier: Classifier = "cosine",
                 scale: float = 30.0) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.experts = nn.ModuleList([expert(features, classes, hidden, classifier, scale) for _ in range(experts)])
        self.classes = classes

    def forward(self, feature: Tensor) -> Tensor:
        """Every expert's raw logits ``(B, E, K)`` for the tap ``(B, ...)``."""
        flat = self.flatten(feature)
        return torch.stack([head(flat) for head in self.experts], dim=1)

    def output_shape(self, input_shape: Any) -> tuple[int, ...]:
        """What the ``mdcs`` loss reads: ``(E, K)`` per sample."""
        return (len(self.experts), self.classes)

    def deploy(self, out: Tensor, model_logits: Tensor | None) -> tuple[Tensor, Tensor]:
        """The deployed logits, the experts' mean ``(B, K)``, and the experts' logits for the loss."""
        return out.mean(dim=1), out


@register_bridge("mdcs_experts", help="MDCS's experts: E classifier heads on one student feature, deployed as the "
                                      "mean of their logits (reads penultimate)",
                 example_shapes=((16,), (10,)))
def mdcs_experts(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], *, experts: Annotated[int, Ge(2)] = 3,
                 hidden: Annotated[int, Ge(0)] = 0, classifier: Classifier = "cosine",
                 scale: Annotated[float, Gt(0)] = 30.0) -> MdcsExperts:
    """MDCS's expert heads (Zhao et al., ICCV 2023; see :mod:`kdkit.methods.mdcs`).

    Args:
        student_shape: Per-sample shape of the student tap (flattened), e.g. ``penultimate``'s.
        teacher_shape: The student's own logits ``(K,)`` (an ``mdcs`` term reads no teacher): the class count.
        experts: Number of experts ``E`` (3 in the paper and the official code); fewer than 2 is no ensemble.
        hidden: Width of an expert-own hidden layer before each classifier (0: none). The official experts own
            the network's last two stages (RIDE's layout); kdkit's bridge cannot split a registered model, and this
            layer is the cheap stand-in.
        classifier: ``cosine`` (default: the official CIFAR configs' ``use_norm: true``, ``NormedLinear`` times
            ``s = 30``) or ``linear``. On kdkit's 12k-parameter CNN student trained from scratch (long-tailed
            Fashion-MNIST, 15 epochs) linear heads scored 77.9 % top-1 and cosine ones 49.6 %: the shipped recipe
            uses ``linear``.
        scale: ``s``, the cosine classifier's logit scale (30, the official code's).
    """
    return MdcsExperts(math.prod(student_shape), teacher_shape[-1], experts, hidden, classifier, scale)
