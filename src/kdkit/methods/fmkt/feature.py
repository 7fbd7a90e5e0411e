r"""The FM-KT *feature variant*: a flow chain that rewrites an intermediate student feature map.

Shao et al., "Precise Knowledge Transfer via Flow Matching" (arXiv 2402.02012). The bridge sits on a
student tap :math:`f_s` of shape ``(C, H, W)`` and runs, from :math:`x = f_s`, for ``i = N .. 1``
(:math:`t = i/N`)

.. math:: v_i = \mathrm{enc}(x + \mathrm{time}(t)), \qquad x \leftarrow x - v_i / N .

The flowed :math:`x` **replaces** the tap's activation for the rest of the student's forward (the next
stage reads it), in training and at inference alike, so the deployed student contains the chain. The
loss (:class:`kdkit.methods.fmkt.feature_loss.FMKTFeatureLoss`) compares each velocity with
:math:`f_s - T(f_t)` (rectified flow: :math:`v = Z_1 - Z_0` with :math:`Z_1 = f_s`, :math:`Z_0 = T(f_t)`).

How it plugs in: the bridge is a :class:`~kdkit.bridges.roles.RewritingBridge`. :class:`kdkit.distill.Student` registers
:meth:`FeatureFlowBridge.rewrite_output` (or ``rewrite_input`` for ``path:input`` taps) as a hook on the
tapped module; the hook runs the chain, records a :class:`FeatureFlow` for the loss and returns the flowed
map, which PyTorch substitutes for the module's output. The model's code is never edited.

Released code vs this module: the released feature variant embeds the time with one linear layer
(``time_embedding: linear``, the default here; ``mlp`` is the logit variant's Linear-ReLU-Linear), and in
training draws the number of steps per batch from {1, 2, 4, 8, 16} (``random_steps``; off by default so
that training unrolls exactly ``steps`` steps, as the paper's algorithm).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from annotated_types import Ge
from torch import Tensor, nn

from kdkit.bridges import register_bridge
from kdkit.bridges.roles import RewritingBridge
from kdkit.errors import KdkitError
from kdkit.methods.fmkt.encoders import EncoderName, TimeEmbedding, build_encoder, sinusoidal


@dataclass(frozen=True)
class FeatureFlow:
    """What a feature flow bridge records for its loss in one forward.

    Attributes:
        start: ``(B, C, H, W)`` the student's own tap :math:`f_s` (the chain's start :math:`Z_1`).
        velocities: ``(N, B, C, H, W)`` the per-step velocities :math:`v_N, \\dots, v_1`, in chain order.
        flowed: ``(B, C, H, W)`` the chain's end, which replaced the tap's activation.
    """

    start: Tensor
    velocities: Tensor
    flowed: Tensor


class LinearTime(nn.Module):
    """``t -> Linear(sinusoidal(t))`` of width ``channels``, shaped ``(1, C, 1, 1)`` (released feature variant)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.linear = nn.Linear(channels, channels)

    def forward(self, t: float, like: Tensor) -> Tensor:
        """The embedding of time ``t`` (one for the whole batch), on ``like``'s device and dtype."""
        features = sinusoidal(torch.full((1,), t, device=like.device), self.channels).to(self.linear.weight.dtype)
        return self.linear(features).to(like.dtype).view(1, self.channels, 1, 1)


class FeatureFlowBridge(RewritingBridge):
    """Meta-encoder + time embedding unrolled as an Euler chain on a feature map (module docstring).

    Args:
        channels: Channels ``C`` of the student tap.
        steps: Euler steps in training (paper: 8).
        eval_steps: Euler steps at inference (paper: 4); fixed in the recipe, never tuned on test data.
        encoder: Meta-encoder (``conv``, ``mlp``, ``transformer``).
        time_embedding: ``linear`` (released feature variant) or ``mlp`` (Linear-ReLU-Linear).
        random_steps: If given, each training forward draws its step count from this list (released
            code: ``[1, 2, 4, 8, 16]``); ``steps`` is then unused.
        encoder_depth: Blocks of the mlp/transformer encoders.
        encoder_heads: Attention heads of the transformer encoder.
    """

    def __init__(self, channels: int, *, steps: int = 8, eval_steps: int = 4, encoder: EncoderName = "conv",
                 time_embedding: Literal["linear", "mlp"] = "linear", random_steps: list[int] | None = None,
                 encoder_depth: int = 2, encoder_heads: int = 4) -> None:
        super().__init__()
        self.channels, self.steps, self.eval_steps = channels, steps, eval_steps
        self.random_steps = list(random_steps) if random_steps else None
        self.time = LinearTime(channels) if time_embedding == "linear" else TimeEmbedding(channels)
        self.encoder = build_encoder(encoder, channels, depth=encoder_depth, heads=encoder_heads)
        self._record: FeatureFlow | None = None

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-sample shape the loss compares: one velocity, the tap's ``(C, H, W)``."""
        return tuple(input_shape)

    def current_steps(self) -> int:
        """Steps of this forward: ``eval_steps`` in eval mode, else ``steps`` (or a draw from ``random_steps``).

        The draw uses Python's ``random`` (seeded with the run), so no device synchronisation happens.
        """
        if not self.training:
            return self.eval_steps
        return random.choice(self.random_steps) if self.random_steps else self.steps

    def unroll(self, f_s: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """The ``n``-step chain from ``f_s`` ``(B, C, H, W)``: the flowed map and the ``(n, B, C, H, W)`` velocities."""
        x = f_s
        velocities = []
        for i in range(n, 0, -1):
            velocity = self.encoder(x + self.time(i / n, x))
            velocities.append(velocity)
            x = x - velocity / n
        return x, torch.stack(velocities)

    def forward(self, f_s: Tensor) -> FeatureFlow:
        """Run the chain on ``f_s`` (``current_steps()`` steps) and return what it produced."""
        if f_s.dim() != 4 or f_s.shape[1] != self.channels:
            raise ValueError(f"feature flow bridge expects (B, {self.channels}, H, W) maps, got {tuple(f_s.shape)}")
        flowed, velocities = self.unroll(f_s, self.current_steps())
        return FeatureFlow(f_s, velocities, flowed)

    # -- the rewrite hooks (bound methods, so copy.deepcopy of a Student re-binds them to the copy) --------------

    def rewrite_output(self, _module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
        """Forward hook: run the chain on the module's output, record it, return the flowed map instead."""
        self._record = self(output)
        return self._record.flowed

    def rewrite_input(self, _module: nn.Module, inputs: tuple) -> tuple:
        """Forward pre-hook (``path:input`` taps): the module receives the flowed map as its first input."""
        self._record = self(inputs[0])
        return (self._record.flowed, *inputs[1:])

    def pop(self) -> FeatureFlow:
        """The record of the last forward, cleared so that nothing is kept alive.

        Raises:
            RuntimeError: No forward reached the tap since the last call.
        """
        record, self._record = self._record, None
        if record is None:
            raise RuntimeError("the feature flow bridge's tap was not reached by the forward")
        return record

    def discard(self) -> None:
        """Drop the last record (after an inference forward, whose record no loss reads)."""
        self._record = None

    def extra_repr(self) -> str:
        steps = f"random_steps={self.random_steps}" if self.random_steps else f"steps={self.steps}"
        return f"channels={self.channels}, {steps}, eval_steps={self.eval_steps}"


@register_bridge("flow_feature", help="FM-KT feature variant: meta-encoder unrolled in N Euler steps on a student map; "
                                      "the flowed map replaces the activation (Shao et al., 2024)",
                 example_shapes=((4, 3, 3), (8, 6, 6)))
def flow_feature_bridge(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...] | None, *,
                        steps: Annotated[int, Ge(1)] = 8, eval_steps: Annotated[int, Ge(1)] = 4,
                        encoder: EncoderName = "conv", time_embedding: Literal["linear", "mlp"] = "linear",
                        random_steps: list[Annotated[int, Ge(1)]] | None = None,
                        encoder_depth: Annotated[int, Ge(1)] = 2,
                        encoder_heads: Annotated[int, Ge(1)] = 4) -> FeatureFlowBridge:
    """Build a :class:`FeatureFlowBridge` on a ``(C, H, W)`` student tap (use with the ``fmkt_feature`` loss).

    Recipe::

        distill:
          - {loss: fmkt_feature, student: stage1, teacher: stage1, bridge: flow_feature,
             bridge_params: {steps: 8, eval_steps: 4}}

    Args:
        student_shape: ``(C, H, W)`` student map (its flowed version continues through the student).
        teacher_shape: The teacher tap's shape; the loss maps it (BN + 1x1 conv), the bridge ignores it.
        steps: Training steps N (paper 8).
        eval_steps: Inference steps (paper 4).
        encoder: ``conv`` (default), ``mlp`` or ``transformer``.
        time_embedding: ``linear`` (released feature variant, default) or ``mlp``.
        random_steps: Per-batch step counts drawn in training (released code ``[1, 2, 4, 8, 16]``).
        encoder_depth: Blocks of the mlp/transformer encoders.
        encoder_heads: Heads of the transformer encoder.

    Raises:
        KdkitError: A tap that is not a ``(C, H, W)`` map, or values outside the declared bounds (checked by
            registration, e.g. non-positive step counts).
    """
    s = tuple(int(v) for v in student_shape)
    if len(s) != 3:
        raise KdkitError(f"bridge 'flow_feature' flows a (C, H, W) feature map, got student shape {s}",
                         fix="tap a convolutional stage (e.g. `student: stage1` for cnn_student)")
    return FeatureFlowBridge(s[0], steps=steps, eval_steps=eval_steps, encoder=encoder, time_embedding=time_embedding,
                             random_steps=random_steps, encoder_depth=encoder_depth, encoder_heads=encoder_heads)


__all__ = ["FeatureFlow", "FeatureFlowBridge", "LinearTime", "flow_feature_bridge"]
