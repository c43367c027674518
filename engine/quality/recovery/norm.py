"""`norm`: correct normalisation layers whose normalised channels were pruned.

LayerNorm, RMSNorm and GroupNorm compute their statistics over channels; after pruning they
average over fewer of them, so every sample is scaled and shifted differently than before.
Per channel, the affine weight and bias are refitted so that the pruned normalisation's
output matches the original's on the calibration data (a one-variable least-squares fit per
channel; RMSNorm, which has no bias, through the origin).
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from engine.quality.recovery.lockstep import Context, Step, add_parameter, param_of

aten = torch.ops.aten


def _layer_norm(node, args):
    shape = list(args[1])
    eps = args[4] if len(args) > 4 else 1e-5
    return F.layer_norm(args[0], shape, None, None, eps), len(shape), 2, 3


def _rms_norm(node, args):
    shape = list(args[1])
    eps = args[3] if len(args) > 3 else None
    return F.rms_norm(args[0], shape, None, eps), len(shape), 2, None


def _group_norm(node, args):
    eps = args[4] if len(args) > 4 else 1e-5
    return F.group_norm(args[0], int(args[1]), None, None, eps), None, 2, 3


# op -> rule(node, args) giving (the normalised output without its affine, how many trailing
# dims are normalised (None: channels in dim 1), index of the weight, index of the bias or None)
NORMS = {
    aten.layer_norm.default: _layer_norm,
    aten.rms_norm.default: _rms_norm,
    aten.group_norm.default: _group_norm,
}


def fit_affine(z: torch.Tensor, y: torch.Tensor, with_bias: bool) -> tuple[torch.Tensor, ...]:
    """Per column of z and y (rows, channels): a, c minimising ||a z + c - y||^2."""
    z, y = z.double(), y.double()
    if not with_bias:
        return (z * y).sum(0) / (z * z).sum(0).clamp_min(1e-12), None
    zm, ym = z.mean(0), y.mean(0)
    cov = ((z - zm) * (y - ym)).mean(0)
    var = ((z - zm) ** 2).mean(0).clamp_min(1e-12)
    a = cov / var
    return a, ym - a * zm


def _rows(t: torch.Tensor, trailing: int | None) -> torch.Tensor:
    """(rows, channels): channels in dim 1 (GroupNorm) or the trailing normalised dims."""
    if trailing is None:
        return t.transpose(0, 1).reshape(t.shape[1], -1).T
    return t.reshape(-1, math.prod(t.shape[t.ndim - trailing:]))


def correct(ctx: Context, node: fx.Node, step: Step) -> str | None:
    """Correct one node of the pruned graph before it runs; the layer changed, or None."""
    rule = NORMS.get(node.target)
    if rule is None or not isinstance(node.args[0], fx.Node):
        return None
    z, trailing, w_i, b_i = rule(node, step.pruned_args)
    x = step.original_args[0]
    dims = [1] if trailing is None else list(range(x.ndim - trailing, x.ndim))
    kept = ctx.layout.kept(node.args[0].name)
    if not any(d in kept and not kept[d].all() for d in dims):
        return None  # nothing was removed from the normalised channels
    weight_node = node.args[w_i] if len(node.args) > w_i else None
    weight = param_of(ctx.pruned, weight_node)
    target = ctx.layout.restrict(node.name, step.original_out, like=z)
    if weight is None or target is None:
        return None
    bias_node = node.args[b_i] if b_i is not None and len(node.args) > b_i else None
    with_bias = b_i is not None
    a, c = fit_affine(_rows(z, trailing), _rows(target, trailing), with_bias)
    with torch.no_grad():
        weight.copy_(a.reshape(weight.shape).to(weight.dtype))
        if with_bias:
            if not isinstance(bias_node, fx.Node):
                bias_node = add_parameter(ctx.pruned, node,
                                          str(weight_node.target).rpartition(".")[0],
                                          "bias", torch.zeros_like(weight))
                args = list(node.args)
                args[b_i] = bias_node
                node.args = tuple(args)
            param_of(ctx.pruned, bias_node).copy_(c.reshape(weight.shape).to(weight.dtype))
    return str(weight_node.target).rpartition(".")[0]
