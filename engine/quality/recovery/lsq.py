"""`lsq`: least-squares reconstruction of each layer whose output drifted.

Layer by layer in network order, a linear layer or convolution whose pruned output differs
from the original's (restricted to the kept output channels) gets new weights and bias:
    min ||X W + b - Y||^2 + lambda ||W - W_pruned||^2
in closed form, where X are the pruned network's inputs to the layer (already reconstructed
upstream) and Y the original network's outputs. The ridge pulls towards the current weights,
so a layer with nothing to fix stays as it is.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from engine.quality.recovery.layers import as_layer, columns, out_rows
from engine.quality.recovery.lockstep import Context, Step, param_of, unchanged

RIDGE = 1e-6  # lambda relative to the mean input energy of the layer


def solve(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
          ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression of y (rows, out) on x (rows, in) towards (w (out, in), b (out))."""
    x64, y64 = x.double(), y.double()
    ones = torch.ones(x64.shape[0], 1, dtype=torch.float64)
    a = torch.cat([x64, ones], dim=1)
    gram = a.T @ a
    cross = a.T @ y64
    n_in = x64.shape[1]
    energy = float(torch.diagonal(gram)[:n_in].mean()) if n_in else 1.0
    lam = torch.full((n_in + 1,), ridge * max(energy, 1e-12), dtype=torch.float64)
    lam[-1] = 1e-10 * max(float(gram[-1, -1]), 1.0)  # the bias is almost free
    prior = torch.cat([w.double().T, b.double()[None, :]], dim=0)
    theta = torch.linalg.solve(gram + torch.diag(lam), cross + lam[:, None] * prior)
    return theta[:n_in].T, theta[n_in]


def correct(ctx: Context, node: fx.Node, step: Step, ridge: float = RIDGE) -> str | None:
    """Correct one node of the pruned graph before it runs; the layer changed, or None."""
    layer = as_layer(node)
    if layer is None:
        return None
    current = node.target(*step.pruned_args)
    target = ctx.layout.restrict(node.name, step.original_out, like=current)
    if target is None or unchanged(current, target):
        return None
    weight = param_of(ctx.pruned, layer.weight_node)
    bias_node = layer.bias_node()
    owner = str(layer.weight_node.target).rpartition(".")[0]
    if bias_node is None and ctx.refuses(owner, f"{owner}.bias"):
        return None  # the refit solves for a bias too
    old_bias = param_of(ctx.pruned, bias_node) if bias_node is not None else \
        torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    x = step.pruned_args[0]
    if layer.kind == "linear":  # a text model's padding positions are not fitted
        x, target = ctx.real_rows(x, target)
    groups = layer.conv_args(step.pruned_args)[3] if layer.kind == "conv" else 1
    in_per_group = weight.shape[1]
    out_per_group = weight.shape[0] // groups
    new_w = torch.empty_like(weight, dtype=torch.float64)
    new_b = torch.empty(weight.shape[0], dtype=torch.float64, device=weight.device)
    y = out_rows(layer, target)
    for g in range(groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        x_g = x if groups == 1 else x[:, g * in_per_group:(g + 1) * in_per_group]
        cols = columns(layer, x_g, step.pruned_args, weight.shape)
        w_g, b_g = solve(cols, y[:, rows], weight[rows].reshape(out_per_group, -1),
                         old_bias[rows], ridge)
        new_w[rows] = w_g.reshape(new_w[rows].shape)
        new_b[rows] = b_g
    with torch.no_grad():
        weight.copy_(new_w.to(weight.dtype))
        bias = layer.bias_tensor(ctx.pruned, weight.shape[0])
        bias.copy_(new_b.to(bias.dtype))
    return str(layer.weight_node.target).rpartition(".")[0]
