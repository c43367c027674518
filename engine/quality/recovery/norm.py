"""`norm`: correct normalisation layers whose normalised channels were pruned.

LayerNorm, RMSNorm and GroupNorm compute their statistics over channels; after pruning they
average over fewer of them, so every sample is scaled and shifted differently than before.
On the original network's activations, the normalised value over the kept channels only is
fitted, per channel, to the normalised value over all channels (a one-variable least-squares
fit: the mean ratio of the two scales and the mean shift of the centre; through the origin
for RMSNorm, which has no bias), and the affine weight and bias absorb that fit. Using the
original activations on both sides isolates the change of statistics from upstream drift.
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


_CASTS = (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default)


def _written_out_rms(node: fx.Node) -> tuple[int, int, float] | None:
    """`weight * cast(x * rsqrt(mean(x ** 2, -1, keepdim) + eps))`, RMSNorm as transformers
    writes it (Llama, Mistral, Qwen): (index of the weight argument, of the normalised one,
    eps)."""
    if node.target != aten.mul.Tensor or len(node.args) != 2:
        return None
    for w_i in (0, 1):
        weight, other = node.args[w_i], node.args[1 - w_i]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"
                and isinstance(other, fx.Node)):
            continue
        inner = other
        while inner.op == "call_function" and inner.target in _CASTS:
            inner = inner.args[0]
        if inner.op != "call_function" or inner.target != aten.mul.Tensor:
            continue
        for arg in inner.args:
            eps = _inverse_rms_eps(arg)
            if eps is not None:
                return w_i, 1 - w_i, eps
    return None


def _inverse_rms_eps(node) -> float | None:
    """eps of rsqrt(mean(pow(x, 2), [-1], keepdim=True) + eps); None: not that pattern."""
    if not (isinstance(node, fx.Node) and node.target == aten.rsqrt.default):
        return None
    inner, eps = node.args[0], 0.0
    if isinstance(inner, fx.Node) and inner.target == aten.add.Tensor:
        if not isinstance(inner.args[1], (int, float)):
            return None
        inner, eps = inner.args[0], float(inner.args[1])
    if not (isinstance(inner, fx.Node) and inner.target == aten.mean.dim):
        return None
    square = inner.args[0]
    if (list(inner.args[1]) == [-1] and isinstance(square, fx.Node)
            and square.target == aten.pow.Tensor_Scalar and square.args[1] == 2):
        return eps
    return None


def _correct_written_out_rms(ctx: Context, node: fx.Node, step: Step) -> str | None:
    """The RMSNorm of a written-out pattern: the original's normalised value over all
    channels z = x / sqrt(ms + eps) is at hand; its mean square m = ms / (ms + eps) gives
    ms + eps = eps / (1 - m), so z rescaled gives x, and x's kept channels normalised
    on their own give the value over the kept channels only."""
    found = _written_out_rms(node)
    if found is None:
        return None
    w_i, z_i, eps = found
    z_node = node.args[z_i]
    keep = ctx.layout.kept(z_node.name)
    last = step.original_args[z_i].ndim - 1
    if last not in keep or keep[last].all():
        return None
    weight = param_of(ctx.pruned, node.args[w_i])
    z_full = ctx.layout.restrict(z_node.name, step.original_args[z_i],
                                 like=step.pruned_args[z_i])
    if weight is None or weight.ndim != 1 or z_full is None:
        return None
    z_full = z_full.double()
    m = step.original_args[z_i].double().pow(2).mean(-1, keepdim=True)
    # where eps is lost in float rounding (1 - m tiny) it is negligible: leave it out
    scale = torch.where(1 - m > 1e-5, eps / (1 - m).clamp_min(1e-12), torch.inf)
    kept_ms = (z_full * z_full).mean(-1, keepdim=True)
    z_kept = torch.where(torch.isinf(scale), z_full * torch.rsqrt(kept_ms.clamp_min(1e-12)),
                         z_full * torch.sqrt(scale) / torch.sqrt(kept_ms * scale + eps))
    a, _ = fit_affine(z_kept.reshape(-1, z_kept.shape[-1]), z_full.reshape(-1, z_full.shape[-1]),
                      with_bias=False)
    with torch.no_grad():
        weight.mul_(a.to(weight.dtype))
    return str(node.args[w_i].target).rpartition(".")[0]


def correct(ctx: Context, node: fx.Node, step: Step) -> str | None:
    """Correct one node of the pruned graph before it runs; the layer changed, or None."""
    if node.target == aten.mul.Tensor:
        return _correct_written_out_rms(ctx, node, step)
    rule = NORMS.get(node.target)
    if rule is None or not isinstance(node.args[0], fx.Node):
        return None
    pruned_args = step.pruned_args
    x = step.original_args[0]
    _, trailing, w_i, b_i = rule(node, pruned_args)
    dims = [1] if trailing is None else list(range(x.ndim - trailing, x.ndim))
    kept = ctx.layout.kept(node.args[0].name)
    if not any(d in kept and not kept[d].all() for d in dims):
        return None  # nothing was removed from the normalised channels
    weight_node = node.args[w_i] if len(node.args) > w_i else None
    weight = param_of(ctx.pruned, weight_node)
    x_kept = ctx.layout.restrict(node.args[0].name, x, like=pruned_args[0])
    if weight is None or x_kept is None:
        return None
    # the same original activations normalised over the kept channels only, and over all
    # of them: how the statistics changed, without the drift of upstream layers
    z_kept = rule(node, (x_kept, *pruned_args[1:]))[0]
    z_full = ctx.layout.restrict(node.name, rule(node, step.original_args)[0], like=z_kept)
    if z_full is None:
        return None
    with_bias = b_i is not None
    owner = str(weight_node.target).rpartition(".")[0]
    has_bias = with_bias and len(node.args) > b_i and isinstance(node.args[b_i], fx.Node)
    if with_bias and not has_bias and ctx.refuses(owner, f"{owner}.bias"):
        with_bias = False  # scale only: the architecture has no bias here
    a, c = fit_affine(_rows(z_kept, trailing), _rows(z_full, trailing), with_bias)
    old_weight = weight.detach().double().clone()
    with torch.no_grad():
        weight.copy_((old_weight * a.reshape(weight.shape)).to(weight.dtype))
        if with_bias:
            bias_node = node.args[b_i] if len(node.args) > b_i else None
            if not isinstance(bias_node, fx.Node):
                bias_node = add_parameter(ctx.pruned, node,
                                          str(weight_node.target).rpartition(".")[0],
                                          "bias", torch.zeros_like(weight))
                args = list(node.args)
                while len(args) <= b_i:
                    args.append(None)
                args[b_i] = bias_node
                node.args = tuple(args)
            bias = param_of(ctx.pruned, bias_node)
            bias.add_((old_weight * c.reshape(weight.shape)).to(bias.dtype))
    return str(weight_node.target).rpartition(".")[0]
