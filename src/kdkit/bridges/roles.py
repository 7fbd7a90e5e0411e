"""Typed roles of bridges that do more than map a tensor: what :class:`kdkit.distill.Student` relies on.

A plain bridge is any ``nn.Module`` mapping the student tap (or a list of taps) to a tensor. A bridge
that plays one of the roles below subclasses it, and the Student dispatches on the type, never on
attribute names:

* :class:`DeployingBridge` -- its output becomes the deployed model's prediction (the network is run up
  to the bridge's tap and the bridge gives the logits).
* :class:`CombiningBridge` -- a second prediction head on a student tap: training leaves the model's own logits
  as they are, and the deployed prediction combines them with the head's output (the whole model runs).
* :class:`RewritingBridge` -- it replaces its tap's activation inside the model's forward (a forward hook),
  so the layers after the tap read what it made, in training and at inference.

Both say the per-sample shape their loss receives (:meth:`StructuredBridge.output_shape`), since their
output is not one tensor that a probe forward could measure.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class StructuredBridge(nn.Module):
    """A bridge whose output is a structure (not one tensor): it states the shape its loss compares."""

    def output_shape(self, input_shape: Any) -> Any:
        """Per-sample shape(s) of what the loss compares, for the tap's per-sample ``input_shape``."""
        raise NotImplementedError


class DeployingBridge(StructuredBridge):
    """A bridge that is part of the deployed network: it turns the student's tap into the logits."""

    @property
    def runs_at_inference(self) -> bool:
        """Whether the deployed model runs the bridge (``False``: the plain model is deployed instead)."""
        return True

    def deploy(self, out: Any, model_logits: Tensor | None) -> tuple[Tensor, Any]:
        """The deployed logits ``(B, K)`` from the bridge's output ``out``, and what the loss receives.

        Args:
            out: The bridge's forward output.
            model_logits: The plain model's logits (``None`` at inference, where the model stops at the tap).
        """
        raise NotImplementedError


class CombiningBridge(DeployingBridge):
    """A second head beside the model's own output, both deployed: the model runs whole, the bridge reads its tap.

    In training the model's logits stay the logits (the supervised loss trains the model's own head) and the term's
    loss reads the head's output; the deployed prediction is :meth:`combine` of the two.
    """

    def deploy(self, out: Any, model_logits: Tensor | None) -> tuple[Tensor, Any]:
        """Training: the model's logits unchanged, and the head's output for the loss."""
        if model_logits is None:
            raise ValueError("a combining bridge needs the model's own logits: the deployed network runs the whole "
                             "model (Student.predict)")
        return model_logits, out

    def combine(self, model_logits: Tensor, out: Any) -> Tensor:
        """The deployed logits ``(B, K)`` from the model's logits and the head's output."""
        raise NotImplementedError


class RewritingBridge(StructuredBridge):
    """A bridge that replaces its tap's activation in every forward; its loss reads what it recorded."""

    def rewrite_output(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        """Forward hook on the tapped module: the tensor that replaces its output."""
        raise NotImplementedError

    def rewrite_input(self, module: nn.Module, inputs: tuple) -> tuple:
        """Forward pre-hook (``path:input`` taps): the inputs that replace the module's inputs."""
        raise NotImplementedError

    def pop(self) -> Any:
        """What the last training forward recorded, cleared (the loss's input)."""
        raise NotImplementedError

    def discard(self) -> None:
        """Drop the last record (after an inference forward, whose record no loss reads)."""
        raise NotImplementedError
