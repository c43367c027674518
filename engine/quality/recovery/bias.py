"""`bias`: fold the mean contribution of the removed input channels into the bias (FLAP).

A layer that lost input channels loses, on average, what those channels contributed to its
output; that constant goes into the layer's bias (a zero bias is added where the layer had
none). It is measured rather than computed from the weights: the mean of the original
layer's output minus the mean of the pruned layer's output over the calibration data, per
output channel. Where nothing upstream changed this is exactly FLAP's
`W[:, removed] @ mean(x[removed])` (padding borders included); where upstream layers lost
channels too, the correction also covers their drift, layer by layer in network order.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from engine.quality.recovery.layers import as_layer
from engine.quality.recovery.lockstep import Context, Step


def correct(ctx: Context, node: fx.Node, step: Step) -> str | None:
    """Correct one node of the pruned graph before it runs; the layer changed, or None."""
    layer = as_layer(node)
    if layer is None or not isinstance(node.args[0], fx.Node):
        return None
    x = step.original_args[0]
    removed = ctx.layout.removed_along(node.args[0].name, layer.channel_dim % x.ndim)
    if removed is None or not removed.any():
        return None
    current = node.target(*step.pruned_args)
    target = ctx.layout.restrict(node.name, step.original_out, like=current)
    if target is None:
        return None
    if layer.kind == "linear":  # a text model's padding positions are not averaged
        target, current = ctx.real_rows(target, current)
    dim = layer.channel_dim % current.ndim
    others = [d for d in range(current.ndim) if d != dim]
    delta = target.double().mean(dim=others) - current.double().mean(dim=others)
    owner = str(layer.weight_node.target).rpartition(".")[0]
    if layer.bias_node() is None and ctx.refuses(owner, f"{owner}.bias"):
        return None
    bias = layer.bias_tensor(ctx.pruned, len(delta))
    with torch.no_grad():
        bias.add_(delta.to(bias.dtype))
    return str(layer.weight_node.target).rpartition(".")[0]
