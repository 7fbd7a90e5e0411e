"""Patch-based CKA (PCKA) for dense feature maps, the detection variant of RCKA (IJCAI 2024)."""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor

from kdkit.losses.base import DistillLoss, register_loss
from kdkit.losses.cka import _compute_dtype, batched_cka


def _patch_grid(h: int, w: int, patch_size: int) -> tuple[int, int, int, int]:
    """``(ph, pw, H', W')``: patch sides (the whole axis when it is shorter) and the resized map size."""
    ph, pw = min(patch_size, h), min(patch_size, w)
    return ph, pw, math.ceil(h / ph) * ph, math.ceil(w / pw) * pw


def _min_patches(centered: bool) -> int:
    # Centred CKA over 2 samples is identically 1 (both centred Grams are multiples of [[1,-1],[-1,1]]),
    # and any CKA over 1 sample is constant: no signal.
    return 3 if centered else 2


def _patch_rows(x: Tensor, ph: int, pw: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(C, U*V, B*ph*pw)``: per channel, one row per patch position."""
    b, c, h, w = x.shape
    u, v = h // ph, w // pw
    x = x.reshape(b, c, u, ph, v, pw).permute(1, 2, 4, 0, 3, 5)  # (C, U, V, B, ph, pw)
    return x.reshape(c, u * v, b * ph * pw)


def pcka_loss(student: Tensor, teacher: Tensor, patch_size: int = 16, centered: bool = True) -> Tensor:
    r"""Patch-based CKA (PCKA) of Zhou et al., "Rethinking Centered Kernel Alignment in KD" (IJCAI 2024).

    .. math::
        L = 1 - \frac{1}{C}\sum_{c=1}^{C} \mathrm{CKA}\big(X_s^{(c)}, X_t^{(c)}\big),\qquad
        X^{(c)} \in \mathbb{R}^{(U V) \times (B\,p_h p_w)}

    Each feature map (one FPN level) is cut into a ``U x V`` grid of non-overlapping ``p x p`` patches.
    For every channel ``c``, ``X^{(c)}`` has one row per patch *position*, holding that patch's values for
    every image of the batch; CKA (see :func:`kdkit.losses.cka.cka`) then compares the student's and the
    teacher's ``UV x UV`` patch Gram matrices, and the CKAs are averaged over the channels. This reading
    of the paper's "CKA per channel between patch Gram matrices" is the official code's
    (``mmrazor/models/losses/cka_loss.py``: ``rearrange('c b (u h) (v w) -> c (u v) (b h w)')``).

    Choices (paper/code vs this implementation):

    - Remainders: like the official code, a map whose side is not a multiple of the patch size is
      **resized** (bilinear, ``align_corners=False``) up to the next multiple; nothing is padded or dropped.
    - A side shorter than ``patch_size`` makes that side one patch (the whole axis, no resizing); the code
      upsamples it to 16 instead. When this leaves fewer than 3 patches (2 uncentred) CKA carries no
      signal (centred CKA of 2 rows is identically 1), so this raises ``ValueError`` -- the official code
      crashes on a single patch and its configs skip the smallest FPN level. Use a smaller ``patch_size``.
    - Centring: the code computes uncentred alignment (``centered=False`` reproduces it); the paper's
      CKA is centred (default). The code's optional transposed ("inter") term is off in all its detection
      configs and is not implemented here. ``1 - CKA`` replaces the code's ``-CKA`` (same gradients).

    Args:
        student: ``(B, C, H, W)`` student feature map (bridged to the teacher's ``C``).
        teacher: ``(B, C, H, W)`` teacher feature map of the same shape.
        patch_size: Patch side ``p`` (16 in the paper).
        centered: Centre the rows over the patch positions before CKA (paper; default).

    Returns:
        Scalar loss in ``[0, 1]``, in the student's dtype.
    """
    if student.dim() != 4 or student.shape != teacher.shape:
        raise ValueError(f"pcka needs two (B, C, H, W) maps of the same shape, got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    _, _, h, w = student.shape
    ph, pw, h2, w2 = _patch_grid(h, w, patch_size)
    n = (h2 // ph) * (w2 // pw)
    if n < _min_patches(centered):
        raise ValueError(f"a {h}x{w} map with patch_size {patch_size} gives {n} patch(es); CKA over fewer than "
                         f"{_min_patches(centered)} patches is constant. Use a smaller patch_size")
    dtype = _compute_dtype(student, teacher)
    s, t = student.to(dtype), teacher.to(dtype)
    if (h2, w2) != (h, w):
        s = F.interpolate(s, size=(h2, w2), mode="bilinear", align_corners=False)
        t = F.interpolate(t, size=(h2, w2), mode="bilinear", align_corners=False)
    sims = batched_cka(_patch_rows(s, ph, pw), _patch_rows(t, ph, pw), centered, form="gram")
    return (1.0 - sims.mean()).to(student.dtype)


@register_loss("pcka", help="patch CKA: 1 - mean over channels of CKA of patch Gram matrices (IJCAI 2024)")
class PCKALoss(DistillLoss):
    """Patch-based CKA on one dense feature map (e.g. an FPN level); see :func:`pcka_loss`.

    Needs channel correspondence, so equal channels (add a ``conv1x1`` bridge otherwise). For RetinaNet
    R101 -> R50 the official config applies it to FPN levels P3-P6 with weight 10 each (``fpn0``... are
    taps you define on the detector's FPN outputs)::

        distill:
          - {loss: pcka, student: fpn0, teacher: fpn0, weight: 10, patch_size: 16}
          - {loss: pcka, student: fpn1, teacher: fpn1, weight: 10, patch_size: 16}

    On small classification maps use a smaller patch (e.g. 8x8 ``stage3`` maps with ``patch_size: 4``)::

        distill:
          - {loss: pcka, student: stage3, teacher: stage3, bridge: conv1x1, weight: 1.0, patch_size: 4}

    Args:
        patch_size: Patch side (default 16, the paper's).
        centered: Centre over the patch positions (paper; default); ``false`` is the official code.
    """

    default_student_tap = "stage2"
    default_teacher_tap = "stage2"

    @classmethod
    def example_shapes(cls) -> tuple[Any, Any]:
        """Equal maps large enough for 2x2 patches of the default size 16."""
        return (2, 32, 32), (2, 32, 32)

    def __init__(self, *, patch_size: Annotated[int, Ge(1)] = 16, centered: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.centered = centered

    def check_shapes(self, student: tuple[int, ...], teacher: tuple[int, ...]) -> str | None:
        """Two ``(C, H, W)`` maps with equal ``C`` and ``H, W`` giving enough patches."""
        if len(student) != 3 or len(teacher) != 3:
            return f"pcka needs (C, H, W) feature maps, got per-sample shapes {tuple(student)} and {tuple(teacher)}"
        if student[0] != teacher[0]:
            return (f"pcka compares channel c of the student with channel c of the teacher, but they have "
                    f"{student[0]} and {teacher[0]} channels: map them with a bridge")
        if tuple(student[1:]) != tuple(teacher[1:]):
            return f"pcka needs the same spatial size, got {tuple(student[1:])} and {tuple(teacher[1:])}"
        ph, pw, h2, w2 = _patch_grid(student[1], student[2], self.patch_size)
        n = (h2 // ph) * (w2 // pw)
        if n < _min_patches(self.centered):
            return (f"a {student[1]}x{student[2]} map with patch_size {self.patch_size} gives {n} patch(es); "
                    f"CKA needs at least {_min_patches(self.centered)}: use a smaller patch_size")
        return None

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """PCKA of two ``(B, C, H, W)`` maps; labels are unused."""
        return pcka_loss(student, teacher, self.patch_size, self.centered)
