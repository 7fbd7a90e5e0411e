"""UniKD's distillation term: the frozen AKE reads the teacher's and the (adapted) student's FPN levels, and the
student's knowledge embeddings are pulled to the teacher's. See :mod:`kdkit.methods.unikd` for the paper and what is
reconstructed."""

from __future__ import annotations

from typing import Annotated, Any

import torch
from annotated_types import Ge, Gt
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.losses.base import DistillLoss, compute_dtype, register_loss
from kdkit.methods.unikd.ake import AdaptiveKnowledgeExtractor, Knowledge


def knowledge_loss(student: Knowledge, teacher: Knowledge, content_weight: float = 1.0,
                   position_weight: float = 1.0) -> Tensor:
    r"""UniKD's loss between the knowledge embeddings the AKE extracts from the student and from the teacher.

    .. math:: L = \frac{1}{J}\sum_{j=1}^{J}\Big(w_c\,\frac{1}{BND}\big\|c^S_j - \bar c^T_j\big\|^2
              + w_p\,\frac{1}{BND}\big\|p^S_j - \bar p^T_j\big\|^2\Big)

    over the ``J`` decoder layers, ``c`` the content and ``p`` the positional embeddings ``(B, N, D)``, the
    teacher's detached.

    Args:
        student: The AKE's output on the adapted student features (:class:`Knowledge`, ``(J, B, N, D)`` fields).
        teacher: Its output on the teacher's features.
        content_weight: :math:`w_c`.
        position_weight: :math:`w_p`.

    Returns:
        Scalar in the embeddings' precision (the caller computes the AKE in at least float32).
    """
    content = (student.content - teacher.content.detach()).pow(2).mean()
    position = (student.position - teacher.position.detach()).pow(2).mean()
    return content_weight * content + position_weight * position


def call_in(module: nn.Module, dtype: torch.dtype, *args: Any) -> Any:
    """``module(*args)`` with its floating parameters and buffers in ``dtype`` (cast for this call only, and
    differentiably: a trained module still trains), so float64 inputs are never rounded to float32 weights."""
    state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    if all(v.dtype == dtype for v in state.values() if v.is_floating_point()):
        return module(*args)
    cast = {name: v.to(dtype) if v.is_floating_point() else v for name, v in state.items()}
    return torch.func.functional_call(module, cast, args)


@register_loss("unikd", help="UniKD: a frozen, pretrained query decoder (AKE, deformable attention over the FPN "
                             "levels) reads teacher and student; its knowledge embeddings are matched (ICCV 2023)")
class UniKDLoss(DistillLoss):
    r""""UniKD: Universal Knowledge Distillation for Mimicking Homogeneous or Heterogeneous Object Detectors"
    (ICCV 2023): :func:`knowledge_loss` between the AKE's embeddings of the adapted student levels and of
    the teacher's levels.

    The term reads every FPN level at once (``student: [p2, p3, p4]``, ``teacher: [p2, p3, p4]``; the same number
    of levels, any sizes and widths): ``setup`` builds one 1x1 ``adapter`` conv per level (student width to the
    teacher's; none when they agree) and the :class:`~kdkit.methods.unikd.ake.AdaptiveKnowledgeExtractor` on the
    teacher's widths. The AKE is frozen here (no gradient, never in the student's optimiser's updates): the
    ``unikd`` method pretrains it on the teacher before the student's first step and then sets ``pretrained``. The
    student's gradient flows through the frozen AKE into the adapters and the student.

    Shapes: student and teacher lists of ``(B, C, H, W)`` maps, one per level; labels unused.

    Args:
        queries: Learnt queries of the AKE (knowledge embeddings per decoder layer).
        layers: Decoder layers of the AKE.
        dim: Width of the AKE's queries and embeddings.
        heads: Attention heads (``dim`` must be a multiple).
        points: Sampled points per head and level of the deformable attention.
        content_weight: Weight of the content embeddings' squared distance.
        position_weight: Weight of the positional embeddings' squared distance.
    """

    pairwise = False  # one AKE reads every level
    default_student_tap = "p2"
    default_teacher_tap = "p2"

    def __init__(self, *, queries: Annotated[int, Gt(0)] = 20, layers: Annotated[int, Gt(0)] = 2,
                 dim: Annotated[int, Gt(0)] = 32, heads: Annotated[int, Gt(0)] = 4, points: Annotated[int, Gt(0)] = 4,
                 content_weight: Annotated[float, Ge(0)] = 1.0, position_weight: Annotated[float, Ge(0)] = 1.0) -> None:
        super().__init__()
        if dim % heads:
            raise KdkitError(f"unikd: dim {dim} is not a multiple of heads {heads} (each head reads dim / heads "
                             "channels)", bad=dim, fix=f"set dim to a multiple of {heads}, e.g. {heads * 8}",
                             where="distill")
        self.queries, self.layers, self.dim, self.heads, self.points = queries, layers, dim, heads, points
        self.content_weight, self.position_weight = content_weight, position_weight
        self.adapters = nn.ModuleList()
        self.ake: AdaptiveKnowledgeExtractor | None = None
        self.register_buffer("pretrained", torch.zeros((), dtype=torch.bool))

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """Two FPN levels: a 4-channel student and an 8-channel teacher (so the adapters are exercised)."""
        return [(4, 8, 8), (4, 4, 4)], [(8, 8, 8), (8, 4, 4)]

    def check_shapes(self, student: Any, teacher: Any) -> str | None:
        """The same number of levels, each a ``(C, H, W)`` map (sizes and widths may differ)."""
        student = student if isinstance(student, list) else [student]
        teacher = teacher if isinstance(teacher, list) else [teacher]
        if len(student) != len(teacher):
            return (f"unikd's AKE reads one student level per teacher level: {len(student)} student taps, "
                    f"{len(teacher)} teacher taps")
        for s, t in zip(student, teacher, strict=True):
            if len(s) != 3 or len(t) != 3:
                return f"unikd reads (C, H, W) feature maps; got student {tuple(s)} and teacher {tuple(t)}"
        return None

    def setup(self, student_shape: Any, teacher_shape: Any, num_samples: int) -> None:
        """The adapters and the (frozen) AKE on the teacher's level widths."""
        student_shape = student_shape if isinstance(student_shape, list) else [student_shape]
        teacher_shape = teacher_shape if isinstance(teacher_shape, list) else [teacher_shape]
        for s, t in zip(student_shape, teacher_shape, strict=True):
            self.adapters.append(nn.Conv2d(s[0], t[0], 1) if s[0] != t[0] else nn.Identity())
        self.ake = AdaptiveKnowledgeExtractor([t[0] for t in teacher_shape], dim=self.dim, queries=self.queries,
                                              layers=self.layers, heads=self.heads, points=self.points)
        self.ake.requires_grad_(False)

    def extract(self, features: list[Tensor], dtype: torch.dtype) -> Knowledge:
        """The AKE's knowledge embeddings of ``features`` computed in ``dtype``."""
        assert self.ake is not None, "unikd: setup() builds the AKE"
        return call_in(self.ake, dtype, [f.to(dtype) for f in features])

    def forward(self, student: Tensor | list[Tensor], teacher: Tensor | list[Tensor], labels: Tensor) -> Tensor:
        """:func:`knowledge_loss` of the adapted student levels against the teacher's."""
        student = student if isinstance(student, list) else [student]
        teacher = teacher if isinstance(teacher, list) else [teacher]
        dtype = compute_dtype(*student, *teacher, *self.parameters())
        adapted = [call_in(a, dtype, s.to(dtype)) for a, s in zip(self.adapters, student, strict=True)]
        with torch.no_grad():
            target = self.extract([t.detach() for t in teacher], dtype)
        return knowledge_loss(self.extract(adapted, dtype), target, self.content_weight, self.position_weight)
