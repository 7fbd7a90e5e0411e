r"""The FM-KT flow bridge: a meta-encoder that carries a student tap towards the teacher in N Euler steps.

Shao et al., "Precise Knowledge Transfer via Flow Matching" (arXiv 2402.02012). Logit variant: the
student's pre-pool map :math:`f_s` is the chain's start :math:`Z_1`; at each step ``i = N .. 1``
(:math:`t = i/N`)

.. math::
    v = \mathrm{enc}(x + \mathrm{time}(t)), \qquad \hat Z_0^{(i)} = \mathrm{head}(\mathrm{est}(x, v, t)),
    \qquad x \leftarrow x - v / N

with ``est`` the schedule's clean-target estimate (:meth:`~kdkit.methods.fmkt.schedules.Schedule.estimate`) and
``head`` a global average pool + linear layer onto the teacher's logits (``head: pool``, the paper's
ResNets), or a flatten + linear layer (``head: flatten``, for students whose own classifier reads the
flattened map, such as ``cnn_student``: pooling would discard the spatial layout that classifier uses).
Training and inference run this same chain (no teacher tensor ever enters it), training with ``steps``
and inference with ``eval_steps``; the prediction is the mean of the per-step estimates (an implicit ensemble).

Paper vs released code: the released code estimates every step as ``f_s - v`` (from the chain's start);
the general formula estimates from the current point, ``x - t v`` for rectified flow; both agree at the
first step. ``anchor: student`` selects the released code's form (generalised as ``est(f_s, v, 1)``),
``anchor: z_t`` (default) the formula.

FM-KT^Theta (``theta: true``): the deployed model is the plain student; its own classifier is trained on
the detached ensemble by the ``fmkt`` loss, and the chain is a training-time aid only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Literal

import torch
from annotated_types import Ge
from torch import Tensor, nn

from kdkit.bridges import register_bridge
from kdkit.bridges.roles import DeployingBridge
from kdkit.errors import KdkitError
from kdkit.methods.fmkt.encoders import EncoderName, TimeEmbedding, build_encoder
from kdkit.methods.fmkt.schedules import get_schedule


@dataclass(frozen=True)
class FlowEstimates:
    """What a flow bridge hands its loss.

    Attributes:
        steps: ``(N, B, K)`` per-step estimates, in chain order (``t = 1, (N-1)/N, ..., 1/N``).
        plain: ``(B, K)`` the plain student's own logits with FM-KT^Theta (trained on the detached
            ensemble), else ``None``.
    """

    steps: Tensor
    plain: Tensor | None = None

    def ensemble(self) -> Tensor:
        """``(B, K)``: the mean of the per-step estimates (the FM-KT prediction)."""
        return self.steps.mean(0)


class FlowBridge(DeployingBridge):
    """Meta-encoder + time embedding + pooled linear head, unrolled as an Euler chain (module docstring).

    Args:
        channels: Channels ``C`` of the student tap (a flat ``(D,)`` tap is flowed as a ``(D, 1, 1)`` map).
        out_features: Width ``K`` of the teacher tap (logits).
        steps: Euler steps in training (paper: 8).
        eval_steps: Euler steps at inference (paper: 4); fixed in the recipe, never tuned on test data.
        encoder: Meta-encoder (``conv``, ``mlp``, ``transformer``).
        schedule: Noise schedule (``rectified``, ``vp``, ``ve``).
        theta: FM-KT^Theta: deploy the plain student instead of the chain.
        anchor: ``z_t`` (the general formula) or ``student`` (the released code's ``f_s - v``).
        encoder_depth: Blocks of the mlp/transformer encoders.
        encoder_heads: Attention heads of the transformer encoder.
        head: ``pool`` (global average pool + linear) or ``flatten`` (flatten + linear).
        spatial: ``(H, W)`` of the tap (sizes the ``flatten`` head).
    """

    def __init__(self, channels: int, out_features: int, *, steps: int = 8, eval_steps: int = 4,
                 encoder: EncoderName = "conv", schedule: str = "rectified", theta: bool = False,
                 anchor: Literal["z_t", "student"] = "z_t", encoder_depth: int = 2, encoder_heads: int = 4,
                 head: Literal["pool", "flatten"] = "pool", spatial: tuple[int, int] = (1, 1)) -> None:
        super().__init__()
        self.channels, self.out_features = channels, out_features
        self.steps, self.eval_steps = steps, eval_steps
        self.schedule = get_schedule(schedule)
        self.theta, self.anchor = theta, anchor
        self.time = TimeEmbedding(channels)
        self.encoder = build_encoder(encoder, channels, depth=encoder_depth, heads=encoder_heads)
        if head == "flatten":
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels * spatial[0] * spatial[1], out_features))
        else:
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, out_features))

    @property
    def runs_at_inference(self) -> bool:
        """Whether the deployed model runs the chain (False for FM-KT^Theta: the plain student is deployed)."""
        return not self.theta

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-sample shape the loss's metric compares: one estimate ``(K,)``."""
        return (self.out_features,)

    def unroll(self, f_s: Tensor, n: int) -> Tensor:
        """The ``n``-step chain from the student tap ``f_s``: ``(n, B, K)`` estimates, one per step.

        Args:
            f_s: ``(B, C, H, W)`` (or ``(B, C)``) student tap.
            n: Euler steps (step size ``1/n``).
        """
        start = f_s[:, :, None, None] if f_s.dim() == 2 else f_s
        x = start
        outputs = []
        for i in range(n, 0, -1):
            t = i / n
            velocity = self.encoder(x + self.time(t, x))
            if self.anchor == "z_t":
                z0 = self.schedule.estimate(x, velocity, t)
            else:
                z0 = self.schedule.estimate(start, velocity, 1.0)
            outputs.append(self.head(z0))
            x = x - velocity / n
        return torch.stack(outputs)

    def forward(self, f_s: Tensor) -> FlowEstimates:
        """The chain's estimates: ``steps`` of them in training, ``eval_steps`` in eval mode."""
        return FlowEstimates(self.unroll(f_s, self.steps if self.training else self.eval_steps))

    def deploy(self, out: FlowEstimates, model_logits: Tensor | None) -> tuple[Tensor, FlowEstimates]:
        """The deployed logits ``(B, K)`` and what the loss receives.

        Without Theta the deployed logits are the ensemble; with Theta they are the plain student's
        ``model_logits``, which the loss also needs (they are trained on the detached ensemble).
        """
        if self.theta:
            if model_logits is None:
                raise ValueError("FM-KT^Theta needs the plain student's logits")
            return model_logits, replace(out, plain=model_logits)
        return out.ensemble(), out

    def extra_repr(self) -> str:
        return (f"steps={self.steps}, eval_steps={self.eval_steps}, schedule={self.schedule.name}, "
                f"anchor={self.anchor}, theta={self.theta}")


@register_bridge("flow", help="FM-KT flow bridge: meta-encoder unrolled in N Euler steps from a student map to "
                              "the teacher's logits (Shao et al., 2024)", example_shapes=((4, 3, 3), (10,)))
def flow_bridge(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], *, steps: Annotated[int, Ge(1)] = 8,
                eval_steps: Annotated[int, Ge(1)] = 4, encoder: EncoderName = "conv",
                schedule: Literal["rectified", "vp", "ve"] = "rectified", theta: bool = False,
                anchor: Literal["z_t", "student"] = "z_t", encoder_depth: Annotated[int, Ge(1)] = 2,
                encoder_heads: Annotated[int, Ge(1)] = 4, head: Literal["pool", "flatten"] = "pool") -> FlowBridge:
    """Build a :class:`FlowBridge` from the probed per-sample shapes (logit variant).

    Recipe (use with the ``fmkt`` loss; the outer CE is usually 0 since CE is applied at every step)::

        distill:
          - {loss: fmkt, student: stage2, teacher: logits, bridge: flow,
             bridge_params: {steps: 8, eval_steps: 4}, metric: kd, metric_params: {temperature: 4}}

    Args:
        student_shape: ``(C, H, W)`` pre-pool map (or ``(D,)``).
        teacher_shape: ``(K,)`` teacher logits (or, for a teacher-less loss, the student's logits).
        steps: Training steps N (paper 8).
        eval_steps: Inference steps (paper 4).
        encoder: ``conv`` (default), ``mlp`` or ``transformer``.
        schedule: ``rectified`` (default), ``vp`` or ``ve``.
        theta: Deploy the plain student (FM-KT^Theta).
        anchor: ``z_t`` (general estimate, default) or ``student`` (released code: ``f_s - v``).
        encoder_depth: Blocks of the mlp/transformer encoders.
        encoder_heads: Heads of the transformer encoder.
        head: ``pool`` (default; global average pool + linear, as the paper's ResNets) or ``flatten``
            (flatten + linear, for students whose classifier reads the flattened map).

    Raises:
        KdkitError: Shapes the logit variant cannot map, or values outside the declared bounds (checked by
            registration, e.g. non-positive step counts).
    """
    s, t = tuple(int(v) for v in student_shape), tuple(int(v) for v in teacher_shape or ())
    if len(s) not in (1, 3):
        raise KdkitError(f"bridge 'flow' needs a (C, H, W) map or a (D,) vector student tap, got shape {s}",
                         fix="tap the student's pre-pool feature map (e.g. `student: stage2` for cnn_student)")
    if len(t) != 1:
        raise KdkitError(f"bridge 'flow' maps onto logits: the teacher tap must be (K,), got shape {t}",
                         fix="use `teacher: logits`")
    return FlowBridge(s[0], t[0], steps=steps, eval_steps=eval_steps, encoder=encoder, schedule=schedule,
                      theta=theta, anchor=anchor, encoder_depth=encoder_depth, encoder_heads=encoder_heads,
                      head=head, spatial=(s[1], s[2]) if len(s) == 3 else (1, 1))


__all__ = ["FlowBridge", "FlowEstimates", "flow_bridge"]
