"""`bn`: recompute BatchNorm running statistics on the calibration inputs.

Pruning changes what reaches a BatchNorm after a layer that lost input channels; its stored
mean and variance describe the unpruned network. Only BatchNorms whose input changed are
touched, so an unpruned path keeps its trained statistics.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from engine.quality.recovery.lockstep import Context, Step, param_of, unchanged

aten = torch.ops.aten
# op -> index of (running_mean, running_var) in its arguments
BATCH_NORMS = {
    aten.batch_norm.default: (3, 4),
    aten._native_batch_norm_legit_no_training.default: (3, 4),
}


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) variance of every channel (dim 1) over all other dims."""
    dims = [d for d in range(x.ndim) if d != 1]
    x64 = x.double()
    mean = x64.mean(dim=dims)
    var = x64.var(dim=dims, unbiased=False)
    return mean, var


def correct(ctx: Context, node: fx.Node, step: Step) -> str | None:
    """Correct one node of the pruned graph before it runs; the layer changed, or None."""
    if node.target not in BATCH_NORMS or not isinstance(node.args[0], fx.Node):
        return None
    mean_i, var_i = BATCH_NORMS[node.target]
    mean_node, var_node = node.args[mean_i], node.args[var_i]
    if param_of(ctx.pruned, mean_node) is None or param_of(ctx.pruned, var_node) is None:
        return None
    x = step.pruned_args[0]
    before = ctx.layout.restrict(node.args[0].name, step.original_args[0], like=x)
    if unchanged(x, before):
        return None
    mean, var = batch_stats(x)
    with torch.no_grad():
        param_of(ctx.pruned, mean_node).copy_(mean)
        param_of(ctx.pruned, var_node).copy_(var)
    return str(mean_node.target).rpartition(".")[0]
