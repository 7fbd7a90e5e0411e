"""Fold a frozen network's BatchNorm layers into the convolutions that feed them.

For a teacher in eval mode, ``BN(conv(x)) = conv'(x)`` with ``W' = W·γ/√(σ²+ε)`` (per output channel)
and ``b' = (b − μ)·γ/√(σ²+ε) + β``: one layer instead of two (``shared/perf-notes.md``: BN folding and
channels-last together save ~13 ms of a 46 ms KD step on the Fashion-MNIST pair).

Pairs are found from the real dataflow with ``torch.fx`` (a BatchNorm whose input is a convolution's
output that nothing else reads) -- never from attribute names, which would fold pre-activation nets
(BN before conv) wrongly. Folded BatchNorms become ``nn.Identity`` at the same module path, so a tap on
the BN still captures the same tensor; pairs whose convolution output or BN input is tapped are left
alone. Models fx cannot trace are left unfolded (the reason is returned).
"""

from __future__ import annotations

import torch
from torch import nn

from kdkit.taps import Tap


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv_path, bn_path)`` pairs where the BN reads only that conv's output (``torch.fx`` dataflow)."""
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0] if node.args else None
        if (isinstance(source, torch.fx.Node) and source.op == "call_module"
                and isinstance(modules.get(source.target), nn.Conv2d) and len(source.users) == 1):
            pairs.append((str(source.target), str(node.target)))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module, taps: list[Tap] | None = None) -> tuple[int, str | None]:
    """Fold every eligible conv → BN pair of ``model`` (which must be in eval mode) in place.

    Args:
        model: A frozen network in eval mode.
        taps: Taps that will be hooked on it; pairs they would observe differently are skipped.

    Returns:
        ``(number of folded pairs, reason folding was skipped or None)``.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (BN running statistics)")
    try:
        pairs = conv_bn_pairs(model)
    except Exception as exc:
        return 0, f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}"
    watched = {(t.path, t.capture) for t in taps or []}
    modules = dict(model.named_modules())
    folded = 0
    for conv_path, bn_path in pairs:
        if (conv_path, "output") in watched or (bn_path, "input") in watched:
            continue
        conv, bn = modules[conv_path], modules[bn_path]
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
            1.0 / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))
        new_bias = (bias - bn.running_mean) * scale + shift
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.copy_(new_bias)
        parent_path, _, name = bn_path.rpartition(".")
        setattr(modules[parent_path] if parent_path else model, name, nn.Identity())
        folded += 1
    return folded, None
