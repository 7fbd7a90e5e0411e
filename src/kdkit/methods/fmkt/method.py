"""FM-KT as a registered method: recognised from its terms; its summary, report and benchmark pieces.

FM-KT needs no engine hooks: its chains are bridges (a :class:`~kdkit.bridges.roles.DeployingBridge` for the
logit variant, a :class:`~kdkit.bridges.roles.RewritingBridge` for the feature variant) trained by its losses.
What the method adds is the cost of what it deploys: ``summary.json``'s ``flow`` section measures params
actually used, FLOPs and latency for N = 1, 2, 4, 8 inference steps and for the plain student (Theta).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from torch import nn

from kdkit.engine import Engine, Hooks
from kdkit.method import Method, MethodRun, register_method
from kdkit.methods.fmkt.costs import flow_costs, has_flow

#: Recipe names that make a recipe an FM-KT recipe.
LOSS_NAMES = frozenset({"fmkt", "ofmkt", "fmkt_feature"})
BRIDGE_NAMES = frozenset({"flow", "flow_feature"})


class FmktRun(MethodRun):
    """No hooks; after training, the deployed chains' cost (rank 0)."""

    def __init__(self, input_shape: tuple[int, int, int]) -> None:
        super().__init__(Hooks())
        self.input_shape = input_shape

    def summary(self, engine: Engine) -> dict[str, Any]:
        if not has_flow(engine.student):
            return {}
        metric = engine.metric

        def score(network: nn.Module) -> float:
            return engine.evaluate(predict=network)[f"test_{metric}"]

        return {"flow": flow_costs(engine.student, self.input_shape, device=engine.device, score=score,
                                   metric=metric)}


@register_method
class FmktMethod(Method):
    """FM-KT / OFM-KT: flow-matching knowledge transfer (Shao et al., 2024): terms with a `flow` bridge."""

    name = "fmkt"

    def active(self, recipe: Any) -> bool:
        return any(t.loss in LOSS_NAMES or t.bridge in BRIDGE_NAMES for t in recipe.distill)

    def attach(self, built: Any, ctx: Any) -> MethodRun:
        shape = built.shape
        return FmktRun((shape.in_channels, shape.image_size, shape.image_size))

    def report_section(self, label: str, summary: dict[str, Any], folder: Path) -> str:
        """Accuracy and cost of each deployable variant (N = 1, 2, 4, 8 inference steps, Theta)."""
        flow = summary.get("flow")
        if not flow:
            return ""
        metric = flow.get("metric", "top1")  # summaries from before the task's metric was recorded: top-1
        head = (f"<tr><th>variant</th><th>{html.escape(metric)} (%)</th><th>params</th><th>MFLOPs</th>"
                "<th>latency (ms)</th></tr>")

        def accuracy(variant: dict[str, Any]) -> str:
            return "–" if variant.get(metric) is None else f"{variant[metric]:.2f}"

        body = "".join(
            f"<tr><td>{html.escape(name)}{' (deployed)' if name == flow['deployed'] else ''}</td>"
            f"<td>{accuracy(v)}</td><td>{v['params']:,}</td><td>{v['flops'] / 1e6:.2f}</td>"
            f"<td>{v['latency_ms']:.3f}</td></tr>" for name, v in flow["variants"].items())
        return (f"<h3>{html.escape(label)}: FM-KT cost (<code>{html.escape(str(folder))}</code>)</h3>"
                f"<p>Inference steps fixed by the recipe: {flow['eval_steps']}; the other rows are for analysis, "
                f"never used to choose it.</p><table>{head}{body}</table>")

    def bench_fields(self, summaries: list[dict[str, Any]]) -> dict[str, Any]:
        """The deployed variant's cost, for summaries written before ``summary.json`` had ``deployed``."""
        flow = summaries[0].get("flow")
        if not flow or isinstance(summaries[0].get("deployed"), dict):
            return {}
        chosen = flow["variants"][flow["deployed"]]
        return {"deployed_params": chosen["params"], "deployed_flops": chosen["flops"],
                "latency_ms": chosen["latency_ms"]}
