"""The op-rule registry: how each ATen op carries channel labels from inputs to outputs.

One entry per op (``RULES["aten.<name>"]``, or ``"aten.<name>.<overload>"`` to single out
an overload). A rule receives the :class:`~engine.graph.tracer.Tracer` and the node and returns the
labels of the node's output (a list for ops with several outputs). The same rule serves the
analysis pass (joining channels, binding parameters) and the apply pass (rewriting shape
constants with the pruned sizes). An op with no entry freezes every channel that reaches it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from engine.graph.labels import NO_LABEL, along, is_labelled
from engine.graph.tracer import RewriteError, Tracer, layer_name, op_key

aten = torch.ops.aten
Rule = Callable[[Tracer, fx.Node], Any]
RULES: dict[str, Rule] = {}


def find_rule(node: fx.Node) -> Rule | None:
    key = op_key(node)
    return RULES.get(key) or RULES.get(key.rsplit(".", 1)[0])


def rule_for(node: fx.Node) -> Rule:
    """The node's rule; `unknown_op` (freeze what reaches it) when the op has none."""
    return find_rule(node) or unknown_op


def register(*names: str) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for name in names:
            RULES[name if name.startswith("aten.") else f"aten.{name}"] = fn
        return fn

    return deco


# --------------------------------------------------------------------------- helpers
def out_ndim(node: fx.Node) -> int:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else 0


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        items = a if isinstance(a, (list, tuple)) else [a]
        for item in items:
            if isinstance(item, fx.Node) and isinstance(item.meta.get("val"), torch.Tensor):
                out.append(item)
    return out


def full_ids(ids: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.broadcast_to(ids, shape)



def unknown_op(t: Tracer, node: fx.Node) -> Any:
    """No rule: every channel reaching the op is frozen; its output carries none."""
    name = op_key(node)
    for arg in _tensor_args(node):
        ids = t.labels_of(arg)
        if ids is not None:
            t.freeze(ids, f"unsupported op {name}")
            t.unknown.add(name)
    return None


def channel_ids(t: Tracer, ids: np.ndarray | None, dim: int, what: str) -> np.ndarray | None:
    """Labels along a channel dimension; frozen if they also vary along another dimension."""
    if ids is None:
        return None
    line = along(ids, dim)
    if line is None:
        t.freeze(ids, f"{what}: channels spread over several dimensions")
    return line


# ---------------------------------------------------------------- pass-through ops
@register(
    "clone", "contiguous", "alias", "detach", "lift_fresh_copy", "dropout", "feature_dropout",
    "alpha_dropout", "relu", "relu_", "gelu", "silu", "silu_", "sigmoid", "tanh", "hardtanh",
    "hardtanh_", "hardswish", "hardsigmoid", "leaky_relu", "elu", "selu", "celu", "softplus",
    "mish", "relu6", "neg", "abs", "exp", "log", "log1p", "sqrt", "rsqrt", "reciprocal", "sin",
    "cos", "erf", "square", "floor", "ceil", "round", "sign", "logical_not", "bitwise_not",
    "nan_to_num", "_to_copy", "to", "type_as", "gelu_", "clamp", "clamp_min", "clamp_max",
    "isnan", "isinf", "sigmoid_", "tanh_", "pow.Tensor_Scalar", "exp2", "trunc", "frac",
    "logit", "threshold", "_assert_tensor_metadata", "dropout_", "feature_dropout_",
    "clamp_", "clamp_min_", "clamp_max_", "hardswish_", "hardsigmoid_", "leaky_relu_", "elu_",
    "neg_", "exp_", "sqrt_", "rsqrt_", "abs_", "mish_",
)
def pass_through(t: Tracer, node: fx.Node) -> Any:
    return t.labels_of(node.args[0]) if out_ndim(node) else None


@register("native_dropout")
def native_dropout(t: Tracer, node: fx.Node) -> Any:
    ids = t.labels_of(node.args[0])
    return [ids, ids]


@register(
    "add", "sub", "rsub", "mul", "div", "maximum", "minimum", "pow", "eq", "ne", "lt", "le",
    "gt", "ge", "where", "masked_fill", "logical_and", "logical_or", "bitwise_and",
    "bitwise_or", "floor_divide", "remainder", "fmod", "atan2", "addcmul", "addcdiv", "lerp",
    "hypot", "copysign", "fill", "clamp.Tensor", "xlogy", "add_", "sub_", "mul_", "div_",
    "masked_fill_", "pow_", "maximum_", "minimum_", "multiply", "divide", "true_divide",
    "subtract", "greater", "less", "greater_equal", "less_equal", "not_equal", "clip",
)
def elementwise(t: Tracer, node: fx.Node) -> Any:
    ndim = out_ndim(node)
    args = _tensor_args(node)
    if not ndim or not args:
        return None
    if not any(t.labels_of(a) is not None for a in args):
        return None
    return t.align(args, ndim, f"{op_key(node)}: meets data that cannot be sliced")


# ------------------------------------------------------------------ producing layers
def _layer(param: str) -> str:
    return layer_name(param)


def _derived_layer(t: Tracer, node: fx.Node, x: fx.Node, weight: fx.Node, x_dim: int,
                   out_shape: tuple[int, ...]) -> Any:
    """A linear/conv layer whose weight is computed from a parameter (weight
    standardisation, weight norm): the parameter's output channels are the layer's filters,
    its input channels read x's. Statistics taken over the input channels make pruning them
    inexact; output channels stay exact."""
    derived = t.derived_weights.get(weight.name) if isinstance(weight, fx.Node) else None
    w_line = along(t.labels_of(weight), 0) if t.labels_of(weight) is not None else None
    if derived is None or w_line is None:
        return None
    param = derived.param
    x_ids = t.labels_of(x)
    if x_ids is not None:
        line = channel_ids(t, x_ids, x_dim, op_key(node))
        if line is not None:
            line = full_ids(line, (t.shape(x)[x_dim],))
            t.bind(param, 1, line)
            if derived.normalised:
                t.inexact(line, f"{_layer(param)}: its weight is normalised over the input "
                          "channels")
    out = t.slots(param, 0, member=_layer(param), out_dim=x_dim % len(out_shape))
    t.union(out, w_line)
    return out.reshape(out_shape)


def _bias(t: Tracer, node: fx.Node, index: int, name: str, out_ids: np.ndarray) -> None:
    arg = _arg(node, index, name)
    bias = t.param(arg)
    if bias is not None:
        t.bind(bias, 0, out_ids)
    elif isinstance(arg, fx.Node):
        # a computed bias (a fused q/k/v bias chunked, as nn.MultiheadAttention does): its
        # channels go with the output's, or the output cannot be sliced
        ids = t.labels_of(arg)
        line = along(ids, -1) if ids is not None else None
        if line is not None and len(line) == len(out_ids):
            t.union(line, out_ids)
        else:
            t.freeze(out_ids, f"{op_key(node)}: a computed bias that cannot be sliced")
            t.freeze(ids, f"{op_key(node)}: a computed bias that cannot be sliced")


@register("linear")
def linear(t: Tracer, node: fx.Node) -> Any:
    x, weight = node.args[0], node.args[1]
    param = t.param(weight)
    ndim = out_ndim(node)
    if param is None and weight.name in t.derived_weights:
        out = _derived_layer(t, node, x, weight, -1, (1,) * (ndim - 1) + (-1,))
        if out is not None:
            _bias(t, node, 2, "bias", out.ravel())
            return out
    if param is None:
        return _einsum_rule(t, node, [x, weight], "...k,ok->...o")
    x_ids = t.labels_of(x)
    if x_ids is not None:
        line = channel_ids(t, x_ids, -1, "linear")
        if line is not None:
            t.bind(param, 1, full_ids(line, (t.shape(x)[-1],)))
    out = t.slots(param, 0, member=_layer(param), out_dim=ndim - 1)
    _bias(t, node, 2, "bias", out)
    return out.reshape((1,) * (ndim - 1) + (-1,))


@register("addmm")
def addmm(t: Tracer, node: fx.Node) -> Any:
    """GPT-2's Conv1D: ``addmm(bias, x, weight)`` with the weight stored (in, out)."""
    bias, x, weight = node.args[0], node.args[1], node.args[2]
    view = _matrix_view(t, weight)
    if view is None or t.param(bias) is None:
        return _einsum_rule(t, node, [x, weight], "ik,kj->ij", extra=[bias])
    out = _by_param_matrix(t, node, x, view)
    t.bind(t.param(bias), 0, out)
    return out.reshape(1, -1)


def _matrix_view(t: Tracer, arg: Any):
    """A parameter matrix (possibly transposed, possibly with broadcast batch dims)."""
    view = t.param_view(arg)
    if view is None or len(view[1]) < 2:
        return None
    *batch, in_dim, out_dim = view[1]
    if any(d != -1 for d in batch) or in_dim < 0 or out_dim < 0 or in_dim == out_dim:
        return None
    return view


def _by_param_matrix(t: Tracer, node: fx.Node, x: fx.Node, view) -> np.ndarray:
    """``x @ W`` with W a parameter matrix (or a transpose of one): W's first dim reads x's
    channels, its second dim is the layer's filters."""
    param, (in_dim, out_dim) = view[0], view[1][-2:]
    x_ids = t.labels_of(x)
    if x_ids is not None:
        line = channel_ids(t, x_ids, -1, op_key(node))
        if line is not None:
            t.bind(param, in_dim, full_ids(line, (t.shape(x)[-1],)))
    return t.slots(param, out_dim, member=_layer(param), out_dim=out_ndim(node) - 1)


def _conv_common(
    t: Tracer, node: fx.Node, transposed: bool, groups: int, groups_index: int
) -> Any:
    x, weight = node.args[0], node.args[1]
    param = t.param(weight)
    ndim = out_ndim(node)
    if param is None and groups == 1 and not transposed:
        out = _derived_layer(t, node, x, weight, 1, (1, -1) + (1,) * (ndim - 2))
        if out is not None:
            _bias(t, node, 2, "bias", out.ravel())
            return out
    if param is None:
        reason = (f"{op_key(node)}: its weight is computed (only per-output-channel "
                  "transforms of an ungrouped layer's weight are understood)")
        for arg in _tensor_args(node):
            t.freeze(t.labels_of(arg), reason)
        return None
    x_ids = t.labels_of(x)
    in_line = channel_ids(t, x_ids, 1, "convolution") if x_ids is not None else None
    in_channels = t.shape(x)[1]
    if in_line is not None:
        in_line = full_ids(in_line, (in_channels,))
    w_shape = t.param_tensor(param).shape
    out_dim = 1 if transposed else 0
    layer = _layer(param)
    shape_out = (1, -1) + (1,) * (ndim - 2)
    if groups == 1:
        if in_line is not None:
            t.bind(param, 1 - out_dim, in_line)
        out = t.slots(param, out_dim, member=layer, out_dim=1)
    elif not transposed and w_shape[1] == 1:
        out = _depthwise(t, node, param, in_line, groups, groups_index, layer)
    elif transposed:
        t.freeze(in_line, "grouped transposed convolution")
        out = t.slots(param, 1, member=layer, out_dim=1)
        t.freeze(out, "grouped transposed convolution")
    else:
        if in_line is not None:
            t.bind_grouped(param, in_line, groups)
        out = t.slots(param, 0, member=layer, out_dim=1)
        if not t.apply_pass:
            t.record_split(out.reshape(groups, -1), f"grouped conv output {layer}")
    _bias(t, node, 2, "bias", out)
    return out.reshape(shape_out)


def _depthwise(t, node, param, in_line, groups, groups_index, layer) -> np.ndarray:
    """Output channel a*m+r (channel multiplier m) reads input channel a alone."""
    multiplier = t.param_tensor(param).shape[0] // groups
    if in_line is None:
        out = t.slots(param, 0, member=layer, out_dim=1)
        t.freeze(out, "depthwise convolution of channels that cannot be pruned")
        return out
    if not t.apply_pass:
        out = t.slots(param, 0, member=layer, out_dim=1)
        t.bind(param, 0, np.repeat(in_line, multiplier))
        return out
    t.bind(param, 0, np.repeat(in_line, multiplier))
    t.set_arg(groups_index, len(in_line))
    return t.state.slots[(param, 0)][t.gathers[(param, 0)]]


@register("conv1d", "conv2d", "conv3d")
def conv(t: Tracer, node: fx.Node) -> Any:
    return _conv_common(t, node, False, int(_arg(node, 6, "groups", 1)), 6)


@register("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv_transpose(t: Tracer, node: fx.Node) -> Any:
    return _conv_common(t, node, True, int(_arg(node, 6, "groups", 1)), 6)


@register("convolution")
def convolution(t: Tracer, node: fx.Node) -> Any:
    return _conv_common(t, node, bool(node.args[6]), int(node.args[8]), 8)


@register("embedding")
def embedding(t: Tracer, node: fx.Node) -> Any:
    weight = t.param(node.args[0])
    ndim = out_ndim(node)
    if weight is None:
        return unknown_op(t, node)
    out = t.slots(weight, 1, member=_layer(weight), out_dim=ndim - 1)
    return out.reshape((1,) * (ndim - 1) + (-1,))


# ---------------------------------------------------------------------- normalisation
@register("batch_norm", "_native_batch_norm_legit_no_training", "instance_norm",
          "_native_batch_norm_legit", "native_batch_norm")
def batch_norm(t: Tracer, node: fx.Node) -> Any:
    x = node.args[0]
    ids = t.labels_of(x)
    line = channel_ids(t, ids, 1, "batch norm") if ids is not None else None
    channels = t.shape(x)[1]
    for index in (1, 2, 3, 4):
        param = t.param(node.args[index]) if len(node.args) > index else None
        if param is not None:
            if line is not None:
                t.bind(param, 0, full_ids(line, (channels,)))
            else:
                t.slots(param, 0)
    out = ids if line is not None else None
    if isinstance(node.meta.get("val"), (list, tuple)):
        return [out] + [None] * (len(node.meta["val"]) - 1)
    return out


def _norm_last(t: Tracer, node: fx.Node, shape_index: int, param_indices: tuple[int, ...]):
    x = node.args[0]
    ids = t.labels_of(x)
    normalized = list(node.args[shape_index])
    if ids is None:
        return None
    if len(normalized) != 1:
        t.freeze(ids, f"{op_key(node)} over several dimensions")
        return None
    line = channel_ids(t, ids, -1, op_key(node))
    if line is None:
        return None
    t.inexact(line, f"{op_key(node)} normalises over the channels")
    channels = t.shape(x)[-1]
    for index in param_indices:
        param = t.param(node.args[index]) if len(node.args) > index else None
        if param is not None:
            t.bind(param, 0, full_ids(line, (channels,)))
    if t.apply_pass:
        t.set_arg(shape_index, [channels])
    return ids


@register("layer_norm")
def layer_norm(t: Tracer, node: fx.Node) -> Any:
    return _norm_last(t, node, 1, (2, 3))


@register("native_layer_norm")
def native_layer_norm(t: Tracer, node: fx.Node) -> Any:
    return [_norm_last(t, node, 1, (2, 3)), None, None]


@register("rms_norm")
def rms_norm(t: Tracer, node: fx.Node) -> Any:
    return _norm_last(t, node, 1, (2,))


@register("group_norm")
def group_norm(t: Tracer, node: fx.Node) -> Any:
    x = node.args[0]
    groups = int(node.args[1])
    ids = t.labels_of(x)
    if ids is None:
        return None
    line = channel_ids(t, ids, 1, "group norm")
    if line is None:
        return None
    channels = t.shape(x)[1]
    line = full_ids(line, (channels,))
    t.inexact(line, "group norm normalises over the channels")
    t.record_split(line.reshape(groups, -1), "group norm")
    for index in (2, 3):
        param = t.param(node.args[index]) if len(node.args) > index else None
        if param is not None:
            t.bind(param, 0, line)
    return ids


# ------------------------------------------------------------------- reductions etc.
# where each reduction keeps its dims (``norm(x, p, dim)``: the second argument is p)
_DIM_ARG = {"norm": (2, "dim"), "linalg_vector_norm": (2, "dim")}


def _dims(node: fx.Node, index: int, name: str, ndim: int) -> list[int] | None:
    """The reduced dims, or None for all of them. Anything but ints is a rule error (the
    tracer freezes what the op touches, with this message)."""
    dims = _arg(node, index, name)
    if dims is None:
        return None
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        raise TypeError(f"dims {dims!r} are not integers")
    return [d % ndim for d in dims] if dims else None


def _reduce(t: Tracer, node: fx.Node, count_dependent: bool, out_rank: int | None = None) -> Any:
    ids = t.labels_of(node.args[0])
    if ids is None:
        return None
    name = op_key(node).split(".")[1]
    index, key = _DIM_ARG.get(name, (1, "dim"))
    dims = _dims(node, index, key, ids.ndim) or list(range(ids.ndim))
    label_dims = t.label_dims(node.args[0])
    if label_dims & set(dims):
        if count_dependent:
            t.inexact(ids, f"{op_key(node)} over the channels")
        if label_dims - set(dims):
            t.freeze(ids, f"{op_key(node)} mixes channels of several dimensions")
        return None
    rank = out_ndim(node) if out_rank is None else out_rank
    if rank < ids.ndim:
        ids = ids.reshape([s for d, s in enumerate(ids.shape) if d not in dims])
    return ids


@register("sum", "nansum")
def sum_(t: Tracer, node: fx.Node) -> Any:
    return _reduce(t, node, True)


@register("mean", "amax", "amin", "var", "std", "logsumexp", "linalg_vector_norm", "norm",
          "prod", "any", "all")
def mean(t: Tracer, node: fx.Node) -> Any:
    return _reduce(t, node, True)


@register("var_mean", "std_mean")
def var_mean(t: Tracer, node: fx.Node) -> Any:
    val = node.meta.get("val")
    out = _reduce(t, node, True, out_rank=val[0].dim())
    return [out, out]


@register("max.dim", "min.dim")
def max_dim(t: Tracer, node: fx.Node) -> Any:
    out = _reduce(t, node, False, out_rank=node.meta["val"][0].dim())
    return [out, out]


@register("_weight_norm", "_weight_norm_interface")
def weight_norm(t: Tracer, node: fx.Node) -> Any:
    """``v * g / ||v||`` per slice of ``dim`` (0: per output channel): v and g share it."""
    v, g = node.args[0], node.args[1]
    dim = int(_arg(node, 2, "dim", 0))
    multi = op_key(node).startswith("aten._weight_norm_interface")
    if dim != 0:
        reason = f"weight norm over dim {dim}, not the output channels"
        for arg in _tensor_args(node):
            t.freeze(t.labels_of(arg), reason)
        out = None
    else:
        ndim = len(t.orig_shape(v))
        out = t.align([v, g], ndim, "weight norm of data that cannot be sliced")
        if not is_labelled(out):
            out = None
    return [out, None] if multi else out


@register("softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum", "cumprod")
def along_dim(t: Tracer, node: fx.Node) -> Any:
    ids = t.labels_of(node.args[0])
    if ids is None:
        return None
    dim = int(node.args[1]) % ids.ndim
    if ids.shape[dim] > 1:
        if op_key(node).startswith(("aten.cum",)):
            t.freeze(ids, f"{op_key(node)} along the channels")
            return None
        t.inexact(ids, f"{op_key(node)} over the channels")
    return ids


# ----------------------------------------------------------------- spatial ops (NC...)
@register(
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool2d",
    "adaptive_max_pool1d", "upsample_nearest2d", "upsample_bilinear2d", "upsample_nearest1d",
    "upsample_linear1d", "upsample_bicubic2d", "upsample_nearest3d", "_upsample_nearest_exact2d",
    "max_pool2d_with_indices", "_adaptive_avg_pool2d",
)
def spatial(t: Tracer, node: fx.Node) -> Any:
    """Ops over the trailing spatial dims of an (N, C, *spatial) tensor, channel by channel."""
    x = node.args[0]
    ids = t.labels_of(x)
    val = node.meta.get("val")
    count = len(val) if isinstance(val, (list, tuple)) else 0
    out = None
    if ids is not None:
        key = op_key(node)
        spatial_dims = 3 if "3d" in key else 1 if "1d" in key else 2
        line = channel_ids(t, ids, ids.ndim - spatial_dims - 1, key)
        out = ids if line is not None else None
    return [out] * count if count else out


@register("constant_pad_nd", "pad", "reflection_pad1d", "reflection_pad2d", "replication_pad1d",
          "replication_pad2d")
def pad(t: Tracer, node: fx.Node) -> Any:
    ids = t.labels_of(node.args[0])
    if ids is None:
        return None
    amounts = list(node.args[1])
    label_dims = t.label_dims(node.args[0])
    for k in range(len(amounts) // 2):  # (last dim's before, after, next dim's ...)
        dim = ids.ndim - 1 - k
        if dim in label_dims and any(a != 0 for a in amounts[2 * k:2 * k + 2]):
            t.freeze(ids, "padding along the channels")
            return None
    return ids


@register("pixel_shuffle")
def pixel_shuffle(t: Tracer, node: fx.Node) -> Any:
    x = node.args[0]
    r = int(node.args[1])
    ids = t.labels_of(x)
    if ids is None:
        return None
    line = channel_ids(t, ids, -3, "pixel_shuffle")
    if line is None:
        return None
    line = full_ids(line, (t.shape(x)[-3],)).reshape(-1, r * r)
    for row in line:
        t.union(np.full(len(row) - 1, row[0]), row[1:])
    out = line[:, 0]
    return out.reshape((1,) * (ids.ndim - 3) + (-1, 1, 1))


@register("prelu", "_prelu_kernel")
def prelu(t: Tracer, node: fx.Node) -> Any:
    x, weight = node.args[0], node.args[1]
    ids = t.labels_of(x)
    param = t.param(weight)
    if param is not None and t.param_tensor(param).numel() > 1:
        line = channel_ids(t, ids, 1, "prelu") if ids is not None else None
        if line is None:
            t.freeze(t.slots(param, 0), "prelu on channels that cannot be pruned")
            return ids
        t.bind(param, 0, full_ids(line, (t.shape(x)[1],)))
    return ids


# ------------------------------------------------------------------------ layout ops
@register("transpose", "swapaxes")
def transpose(t: Tracer, node: fx.Node) -> Any:
    ids = t.labels_of(node.args[0])
    if ids is None:
        return None
    return np.swapaxes(ids, int(node.args[1]), int(node.args[2]))


@register("t", "numpy_T")
def t_(t: Tracer, node: fx.Node) -> Any:
    ids = t.labels_of(node.args[0])
    return None if ids is None else ids.T


@register("permute")
def permute(t: Tracer, node: fx.Node) -> Any:
    ids = t.labels_of(node.args[0])
    return None if ids is None else np.transpose(ids, [int(d) for d in node.args[1]])


@register("movedim")
def movedim(t: Tracer, node: fx.Node) -> Any:
    ids = t.labels_of(node.args[0])
    return None if ids is None else np.moveaxis(ids, node.args[1], node.args[2])


@register("unsqueeze")
def unsqueeze(t: Tracer, node: fx.Node) -> Any:
    ids = t.labels_of(node.args[0])
    if ids is None:
        return None
    return np.expand_dims(ids, int(node.args[1]) % (ids.ndim + 1))


@register("squeeze")
def squeeze(t: Tracer, node: fx.Node) -> Any:
    ids = t.labels_of(node.args[0])
    if ids is None:
        return None
    shape = t.orig_shape(node.args[0])
    dims = _arg(node, 1, "dim")
    if dims is None:
        dims = [d for d, s in enumerate(shape) if s == 1]
    elif isinstance(dims, int):
        dims = [dims]
    dims = [d % ids.ndim for d in dims if shape[d % ids.ndim] == 1]
    return ids.reshape([s for d, s in enumerate(ids.shape) if d not in dims])


@register("expand", "expand_copy", "broadcast_to")
def expand(t: Tracer, node: fx.Node) -> Any:
    ids = t.labels_of(node.args[0])
    if ids is None:
        return None
    ndim = out_ndim(node)
    out = ids.reshape((1,) * (ndim - ids.ndim) + ids.shape)
    if t.apply_pass:
        new_in = t.shape(node.args[0])
        sizes = list(node.args[1])
        offset = ndim - len(new_in)
        for d in t.label_dims(node.args[0]):
            if isinstance(sizes[d + offset], int) and sizes[d + offset] != -1:
                sizes[d + offset] = new_in[d]
        t.set_arg(1, sizes)
    return out


@register("expand_as")
def expand_as(t: Tracer, node: fx.Node) -> Any:
    ids = t.labels_of(node.args[0])
    if ids is None:
        return None
    return ids.reshape((1,) * (out_ndim(node) - ids.ndim) + ids.shape)


@register("repeat")
def repeat(t: Tracer, node: fx.Node) -> Any:
    ids = t.labels_of(node.args[0])
    if ids is None:
        return None
    reps = list(node.args[1])
    ids = ids.reshape((1,) * (len(reps) - ids.ndim) + ids.shape)
    dims = {d + len(reps) - len(t.orig_shape(node.args[0])) for d in t.label_dims(node.args[0])}
    reps = [r if d in dims else 1 for d, r in enumerate(reps)]
    return np.tile(ids, reps)


@register("cat", "concat", "concatenate")
def cat(t: Tracer, node: fx.Node) -> Any:
    tensors = [a for a in node.args[0]]
    ndim = out_ndim(node)
    dim = int(_arg(node, 1, "dim", 0)) % ndim
    labels = [t.tensor_labels(a) for a in tensors]
    if not any(is_labelled(x) for x in labels):
        return None
    if not any(dim in t.label_dims(a) for a in tensors):
        # joined along a non-channel dim (tokens): the pieces share their channels
        return t.align(tensors, ndim, "cat with data that cannot be sliced")
    if any(d != dim for a in tensors for d in t.label_dims(a)):
        # pieces with channels along another dim too (ConvBERT: attention and convolution
        # heads joined, each of head_size): their other dims must keep equal sizes. Rotary
        # attention's rotate_half, cat(-x2, x1), and partial rotary's cat(rotated, passed)
        # do: each head's slice holds whole groups or whole blocks. That is known only once
        # the groups are, so the check is deferred
        t.defer_cat_check(labels, dim, f"{op_key(node)} of channels laid out over several "
                          "dimensions")
    sizes = [1] * ndim
    for x in labels:
        for d in range(ndim):
            if d != dim:
                sizes[d] = max(sizes[d], x.shape[d])
    pieces = []
    for x, a in zip(labels, tensors):
        shape = list(sizes)
        shape[dim] = t.shape(a)[dim]
        pieces.append(np.broadcast_to(x, shape))
    return np.concatenate(pieces, axis=dim)


@register("stack")
def stack(t: Tracer, node: fx.Node) -> Any:
    tensors = list(node.args[0])
    ndim = out_ndim(node)
    dim = int(_arg(node, 1, "dim", 0)) % ndim
    labels = [t.tensor_labels(a) for a in tensors]
    if not any(is_labelled(x) for x in labels):
        return None
    shape = [1] * (ndim - 1)
    for x in labels:
        for d in range(ndim - 1):
            shape[d] = max(shape[d], x.shape[d])
    return np.stack([np.broadcast_to(x, shape) for x in labels], axis=dim)


def _kept_count(t: Tracer, line: np.ndarray, start: int, stop: int) -> int:
    return int(t.kept(line[start:stop]).sum())


@register("split", "split_with_sizes", "chunk", "unsafe_split", "split_copy")
def split(t: Tracer, node: fx.Node) -> Any:
    x = node.args[0]
    ids = t.labels_of(x)
    vals = node.meta.get("val")
    count = len(vals)
    if ids is None:
        return [None] * count
    dim = int(_arg(node, 2, "dim", 0)) % ids.ndim
    if dim not in t.label_dims(x):
        return [ids] * count
    if along(ids, dim) is None and not t.apply_pass:
        # (heads, head_dim) split inside each head: the pieces need not keep equal counts
        t.freeze(ids, f"{op_key(node)} of channels spread over several dimensions")
    sizes = [int(v.shape[dim]) for v in vals]
    if t.apply_pass:
        ref = t.state.labels[x.name]
        line = along(ref, dim)
        if line is None:  # frozen in the analysis: every piece keeps its size
            line = np.moveaxis(ref, dim, -1).reshape(-1, ref.shape[dim])[0]
        bounds = np.cumsum([0] + sizes)
        sizes = [_kept_count(t, line, bounds[i], bounds[i + 1]) for i in range(count)]
        t.set_target(aten.split_with_sizes.default, (x, sizes, dim))
    bounds = np.cumsum([0] + sizes)
    return [np.take(ids, np.arange(bounds[i], bounds[i + 1]), axis=dim) for i in range(count)]


@register("unbind")
def unbind(t: Tracer, node: fx.Node) -> Any:
    x = node.args[0]
    ids = t.labels_of(x)
    count = len(node.meta["val"])
    if ids is None:
        return [None] * count
    dim = int(_arg(node, 1, "dim", 0)) % ids.ndim
    if dim not in t.label_dims(x):
        return [np.squeeze(ids, dim)] * count
    if t.label_dims(x) == {dim}:
        t.freeze(ids, "unbind along the channels")
        return [None] * count
    # fused projections laid out as (3, heads, head_dim): each piece is its own channels
    _check_slices_survive(t, x, dim)
    return [np.take(ids, i, axis=dim) for i in range(count)]


def _check_slices_survive(t: Tracer, x: fx.Node, dim: int) -> None:
    """Indexing along `dim` stays valid only while no index along it loses all channels."""
    if not t.apply_pass:
        return
    kept = np.moveaxis(t.kept(t.state.labels[x.name]), dim, 0)
    if not kept.reshape(kept.shape[0], -1).any(axis=1).all():
        raise RewriteError("an indexed slice of channels would be removed entirely")


@register("slice")
def slice_(t: Tracer, node: fx.Node) -> Any:
    x = node.args[0]
    ids = t.labels_of(x)
    if ids is None:
        return None
    dim = int(_arg(node, 1, "dim", 0)) % ids.ndim
    if dim not in t.label_dims(x):
        return ids
    size = t.orig_shape(x)[dim]
    start = _arg(node, 2, "start", 0)
    end = _arg(node, 3, "end", None)
    step = int(_arg(node, 4, "step", 1))
    if not all(isinstance(v, (int, type(None))) for v in (start, end)):
        t.freeze(ids, "slice with symbolic bounds along the channels")
        return None
    start, end, _ = slice(start, end).indices(size)
    if step != 1:
        t.freeze(ids, "strided slice along the channels")
        return None
    if not t.apply_pass:
        return np.take(ids, np.arange(start, end), axis=dim)
    ref = t.state.labels[x.name]
    kept = np.moveaxis(t.kept(ref), dim, -1).reshape(-1, ref.shape[dim])
    before = set(kept[:, :start].sum(axis=1).tolist())
    inside = set(kept[:, start:end].sum(axis=1).tolist())
    if len(before) != 1 or len(inside) != 1:
        raise RewriteError(f"slice {node.name}: the kept channels differ between rows")
    new_start = before.pop()
    new_end = new_start + inside.pop()
    t.set_arg(2, new_start)
    t.set_arg(3, new_end)
    return np.take(ids, np.arange(new_start, new_end), axis=dim)


@register("narrow")
def narrow(t: Tracer, node: fx.Node) -> Any:
    ids = t.labels_of(node.args[0])
    if ids is None:
        return None
    dim = int(node.args[1]) % ids.ndim
    if ids.shape[dim] > 1:
        t.freeze(ids, "narrow along the channels")
        return None
    return ids


@register("select")
def select(t: Tracer, node: fx.Node) -> Any:
    x = node.args[0]
    ids = t.labels_of(x)
    if ids is None:
        return None
    dim = int(node.args[1]) % ids.ndim
    if dim not in t.label_dims(x):
        return np.squeeze(ids, dim)
    index = int(node.args[2]) % t.orig_shape(x)[dim]
    ref = t.state.labels[x.name] if t.apply_pass else ids
    line = along(ref, dim)
    if line is None:
        # a slice of channels laid out over several dims (q of a fused qkv): kept whole
        _check_slices_survive(t, x, dim)
        return np.take(ids, index, axis=dim)
    t.freeze(line[index], "a single channel is selected")
    if t.apply_pass:
        new_index = _kept_count(t, line, 0, index)
        t.set_arg(2, new_index)
        return np.take(ids, new_index, axis=dim)
    return np.take(ids, index, axis=dim)


@register("im2col")
def im2col(t: Tracer, node: fx.Node) -> Any:
    """``unfold``: (N, C, H, W) -> (N, C * kh * kw, L), channel-major: each channel becomes
    a block of kh * kw rows."""
    ids = t.labels_of(node.args[0])
    if ids is None:
        return None
    line = channel_ids(t, ids, -3, op_key(node))
    if line is None:
        return None
    block = int(np.prod([int(k) for k in node.args[1]]))
    line = np.repeat(full_ids(line, (t.shape(node.args[0])[-3],)), block)
    return line.reshape((1,) * (out_ndim(node) - 2) + (-1, 1))


@register("col2im")
def col2im(t: Tracer, node: fx.Node) -> Any:
    """``fold``: (N, C * kh * kw, L) -> (N, C, H, W); each block of kh * kw rows is one
    channel, so the rows of a block go together."""
    ids = t.labels_of(node.args[0])
    if ids is None:
        return None
    line = channel_ids(t, ids, -2, op_key(node))
    if line is None:
        return None
    block = int(np.prod([int(k) for k in node.args[2]]))
    rows = full_ids(line, (t.shape(node.args[0])[-2],)).reshape(-1, block)
    for row in rows:
        t.union(np.full(block - 1, row[0]), row[1:])
    return rows[:, 0].reshape((1,) * (out_ndim(node) - 3) + (-1, 1, 1))


@register("roll")
def roll(t: Tracer, node: fx.Node) -> Any:
    """Rolling (shifted windows) over other dims passes channels through. Over the channels
    it is a cyclic permutation; its restriction to the kept channels is again one, shifted
    by the number of kept channels among those that wrap around."""
    x = node.args[0]
    ids = t.labels_of(x)
    if ids is None:
        return None
    shifts = _arg(node, 1, "shifts")
    dims = _arg(node, 2, "dims", [])
    shifts = [shifts] if isinstance(shifts, int) else list(shifts)
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if not dims:
        t.freeze(ids, "roll of the flattened tensor")
        return None
    if not all(isinstance(v, int) for v in shifts + dims):
        raise TypeError(f"roll shifts {shifts!r} / dims {dims!r} are not integers")
    dims = [d % ids.ndim for d in dims]
    label_dims = t.label_dims(x)
    out = ids
    new_shifts = list(shifts)
    for k, (shift, dim) in enumerate(zip(shifts, dims)):
        if dim not in label_dims:
            continue
        ref = t.state.labels[x.name] if t.apply_pass else ids
        line = along(ref, dim)
        if line is None:
            t.freeze(ids, "roll along channels spread over several dimensions")
            return None
        size = t.orig_shape(x)[dim]
        wrapped = shift % size
        if t.apply_pass:
            new_shifts[k] = _kept_count(t, line, size - wrapped, size) if wrapped else 0
        out = np.roll(out, new_shifts[k], axis=dim)
    if t.apply_pass and new_shifts != shifts:
        t.set_arg(1, new_shifts)
    return out


@register("index.Tensor", "_unsafe_index.Tensor")
def index(t: Tracer, node: fx.Node) -> Any:
    """``x[idx]`` with index tensors over some dims: labels of the other dims pass through.

    Indexing over channels is data dependent (which channels are read is decided by data):
    frozen. A parameter table indexed along one dim (relative position bias tables,
    ``table[index]`` of shape (positions, heads)) carries the slots of its remaining dim,
    so its heads can go with the heads they are added to.
    """
    x, indices = node.args[0], list(node.args[1])
    ids = t.labels_of(x)
    shape = t.orig_shape(x)
    present = [d for d, i in enumerate(indices) if i is not None]
    for i in indices:
        if isinstance(i, fx.Node):
            t.freeze(t.labels_of(i), f"{op_key(node)}: channels used as indices")
    if not present or present != list(range(present[0], present[-1] + 1)):
        return unknown_op(t, node)
    first, last = present[0], present[-1] + 1
    param = t.param(x)
    if ids is None and param is not None:
        rest = [d for d in range(len(shape)) if not first <= d < last and shape[d] > 1]
        if len(rest) != 1:
            return None
        slots = t.slots(param, rest[0])
        if not t.whole_blocks:
            t.freeze(slots, f"{param.rsplit('.', 1)[-1]}: a per-head table (heads are "
                     "removed whole only with reshape_channel_axis -2/0)")
            return None
        ids = slots.reshape([len(slots) if d == rest[0] else 1 for d in range(len(shape))])
    if ids is None:
        return None
    if any(first <= d < last for d in t.label_dims(x)) or (param is not None and any(
            first <= d < last and ids.shape[d] > 1 for d in range(ids.ndim))):
        t.freeze(ids, f"{op_key(node)} over the channels (data-dependent)")
        return None
    out_rank = out_ndim(node)
    index_rank = out_rank - (len(shape) - (last - first))
    return ids.reshape(ids.shape[:first] + (1,) * index_rank + ids.shape[last:])


@register("lstm.input", "gru.input", "rnn_tanh.input", "rnn_relu.input")
def recurrent(t: Tracer, node: fx.Node) -> Any:
    """RNN/LSTM/GRU: the first layer's input weights read x's channels (prunable, exact);
    the hidden units feed back into the layer through time, so they stay."""
    x, params = node.args[0], list(node.args[2])
    has_biases, bidirectional = node.args[3], bool(node.args[7])
    per_layer = (4 if has_biases else 2) * (2 if bidirectional else 1)
    reason = f"{op_key(node)}: recurrent hidden units feed back through time (kept)"
    ids = t.labels_of(x)
    line = channel_ids(t, ids, -1, op_key(node)) if ids is not None else None
    first_inputs = {0, per_layer // 2} if bidirectional else {0}
    for k, weight in enumerate(params):
        param = t.param(weight)
        if param is None:
            continue
        if k in first_inputs and line is not None and k < per_layer:
            t.bind(param, 1, full_ids(line, (t.shape(x)[-1],)))
            t.freeze(t.slots(param, 0), reason)
        else:
            for dim, size in enumerate(t.param_tensor(param).shape):
                if size > 1:
                    t.freeze(t.slots(param, dim), reason)
    count = len(node.meta["val"]) if isinstance(node.meta.get("val"), (list, tuple)) else 1
    return [None] * count


# -------------------------------------------------------------------- reshapes (views)
def _dim_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair up runs of dimensions with equal products (the classic view alignment)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        if i < len(src) and j < len(dst) and src[i] == dst[j]:
            groups.append(([i], [j]))
            i += 1
            j += 1
            continue
        if i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        gi, gj = [i], [j]
        pi, pj = src[i], dst[j]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:
                pi *= src[i]
                gi.append(i)
                i += 1
            else:
                pj *= dst[j]
                gj.append(j)
                j += 1
        groups.append((gi, gj))
    return groups


@register("view", "reshape", "_unsafe_view", "flatten", "unflatten", "view_copy", "reshape_as",
          "view_as")
def view(t: Tracer, node: fx.Node) -> Any:
    """Reshapes move labels with the data; a split of a labelled dim into blocks is recorded.

    Dimensions are paired into groups with equal products; a group whose labels vary is
    materialised and reshaped, the others stay broadcast. With whole-block pruning
    (reshape_channel_axis -2/0) the channels of each block are joined and the block's first
    label stands for all of them.
    """
    x = node.args[0]
    ids = t.labels_of(x)
    if ids is None:
        return None
    src, dst = t.orig_shape(x), t.orig_shape(node)
    groups = _dim_groups(src, dst)
    new_src = t.shape(x)
    label_dims = t.label_dims(x)
    labelled = [g for g in groups if label_dims & set(g[0])]
    splits = [g for g in labelled if _split_levels(dst, g[1])]
    label_dims = {d for g in labelled for d in g[0]}
    full = np.broadcast_to(ids, [new_src[d] if d in label_dims else 1 for d in range(len(src))])
    target: list[int] = []
    new_dst = list(dst)
    for gi, gj in groups:
        if (gi, gj) not in labelled:
            target += [1] * len(gj)
            continue
        n = int(np.prod([new_src[d] for d in gi]))
        sizes = [n] if len(gj) == 1 else _split_sizes(t, x, node, gi, gj, n)
        for d, size in zip(gj, sizes):
            new_dst[d] = size
        target += sizes
    out = full.reshape(target)
    levels_of = {}
    for _gi, gj in splits:
        key = (node.name, tuple(gj))
        if not t.apply_pass:
            # a split whose outer blocks all carry the same channels is a folded batch
            # (batch * heads -> batch, heads in decomposed attention), not a block layout
            t.state.split_levels[key] = [
                k for k in _split_levels(dst, gj) if _varies(out, gj[:k])
            ]
        levels_of[key] = t.state.split_levels.get(key, [])
    if len(labelled) > 1 and any(levels_of.values()):
        t.freeze(ids, "reshape of channels spread over several dimensions")
        return None
    for _gi, gj in splits:
        levels = levels_of[(node.name, tuple(gj))]
        if not levels:
            continue
        if not t.apply_pass:
            if t.whole_blocks:
                # the innermost split is the block (heads of head_dim in (3, heads, head_dim))
                for row in _rows(out, gj, levels[-1]):
                    t.union(np.full(len(row) - 1, row[0]), row[1:])
                    t.state.block_ids.append(int(row[0]))
            else:
                for k in levels:
                    t.record_split(_rows(out, gj, k), f"reshape {node.name}")
        if t.whole_blocks:
            out = _first_of_block(out, gj[levels[-1]:])
    if t.apply_pass:
        _rewrite_view(t, node, new_dst, labelled)
    return out


def _varies(out: np.ndarray, dims: list[int]) -> bool:
    return any(
        out.shape[d] > 1 and not np.array_equal(np.broadcast_to(np.take(out, [0], axis=d),
                                                                out.shape), out)
        for d in dims
    )


def _split_levels(dst: tuple[int, ...], gj: list[int]) -> list[int]:
    """Where the out dims `gj` of a reshape split into (outer blocks, inner channels), both
    larger than 1: (heads, head_dim), or (3, heads * head_dim) and (3 * heads, head_dim)."""
    sizes = [dst[d] for d in gj]
    return [
        k for k in range(1, len(sizes))
        if int(np.prod(sizes[:k])) > 1 and int(np.prod(sizes[k:])) > 1
    ]


def _rows(out: np.ndarray, gj: list[int], level: int) -> np.ndarray:
    """The split dims as (product of the first `level` dims, the rest)."""
    index = tuple(slice(None) if d in gj else 0 for d in range(out.ndim))
    block = out[index]
    return block.reshape(int(np.prod(block.shape[:level])), -1)


def _first_of_block(out: np.ndarray, inner: list[int]) -> np.ndarray:
    index = tuple(slice(0, 1) if d in inner else slice(None) for d in range(out.ndim))
    return out[index]


def _split_sizes(t: Tracer, x: fx.Node, node: fx.Node, gi, gj, n: int) -> list[int]:
    """Sizes of the split dims: original, or those the surviving channels fill."""
    dst = t.orig_shape(node)
    orig_sizes = [dst[d] for d in gj]
    if not t.apply_pass:
        return orig_sizes
    ref = t.state.labels[x.name]
    src = t.orig_shape(x)
    index = tuple(slice(None) if d in gi else 0 for d in range(len(src)))
    ref_sub = np.broadcast_to(ref[index].reshape([ref.shape[d] for d in gi]), [src[d] for d in gi])
    kept = t.kept(ref_sub).reshape(orig_sizes)
    sizes = []
    for axis in range(len(orig_sizes) - 1):
        other = tuple(a for a in range(len(orig_sizes)) if a != axis)
        sizes.append(int(kept.any(axis=other).sum()))
    rest = int(np.prod(sizes))
    if rest == 0 or n % rest:
        raise RewriteError(f"reshape {node.name}: the kept channels do not form equal blocks")
    return sizes + [n // rest]


def _rewrite_view(t: Tracer, node: fx.Node, new_dst: list[int], labelled) -> None:
    out_dims = {d for _, gj in labelled for d in gj}
    key = op_key(node)
    if key.startswith("aten.flatten"):
        return
    if key.startswith(("aten.reshape_as", "aten.view_as")):
        # the shape comes from another tensor: keep it when that one shrank alike
        if t.shape(node.args[1]) != tuple(new_dst):
            t.set_target(aten.reshape.default, (node.args[0], list(new_dst)))
        return
    if key.startswith("aten.unflatten"):
        dim = int(node.args[1]) % len(t.orig_shape(node.args[0]))
        sizes = [
            new_dst[dim + k] if isinstance(s, int) and s != -1 and dim + k in out_dims else s
            for k, s in enumerate(node.args[2])
        ]
        t.set_arg(2, sizes)
        return
    sizes = [
        new_dst[d] if isinstance(s, int) and s != -1 and d in out_dims else s
        for d, s in enumerate(node.args[1])
    ]
    t.set_arg(1, sizes)


# ------------------------------------------------------------------- products / attention
def _einsum_rule(t: Tracer, node: fx.Node, operands: list, equation: str, extra=()) -> Any:
    in_specs, out_spec = equation.split("->")
    specs = in_specs.split(",")
    labels = [t.tensor_labels(o) for o in operands]
    ranks = [len(t.orig_shape(o)) for o in operands]
    n_ell = max([r - len(s.replace("...", "")) for r, s in zip(ranks, specs) if "..." in s] or [0])
    letters = "ABCDEFGHIJ"[:n_ell]
    fills = [r - len(s.replace("...", "")) for s, r in zip(specs, ranks)]
    specs = [s.replace("...", letters[n_ell - f :]) for s, f in zip(specs, fills)]
    out_spec = out_spec.replace("...", letters)
    for e in extra:
        t.freeze(t.labels_of(e), f"{op_key(node)}: added input")
    varying = [_letters(t.label_dims(o), spec) for o, spec in zip(operands, specs)]
    return _einsum_labels(t, node, labels, varying, specs, out_spec)[0]


def _letters(dims: set[int], spec: str) -> set[str]:
    return {spec[d] for d in dims}


def _einsum_labels(t: Tracer, node, labels, varying, specs, out_spec) -> tuple[Any, set[str]]:
    """Channels meeting in a contraction are joined; labels of free letters reach the output.

    An operand whose labels vary only along letters every operand has (q and k meeting on
    heads and head_dim) is *aligned*: its channels are joined with the other operands' over
    those letters. One whose labels vary along a letter of its own that survives (v's
    head_dim) *passes* its labels to the output.
    """
    shared = set(specs[0]).intersection(*map(set, specs[1:]))
    contracted = set("".join(specs)) - set(out_spec)
    aligned = [i for i, v in enumerate(varying) if v and v <= shared]
    passing = [i for i, v in enumerate(varying) if v and not v <= shared and not v & contracted]
    for i, v in enumerate(varying):
        if v and not v <= shared and v & contracted:
            t.freeze(labels[i], f"{op_key(node)}: channels contracted along a free dimension")
    if aligned:
        letters = sorted(set().union(*(varying[i] for i in aligned)))
        grids = [_project(labels[i], specs[i], letters) for i in range(len(labels))]
        sizes = np.broadcast_shapes(*(g.shape for g in grids))
        base = np.broadcast_to(grids[0], sizes)
        for grid in grids[1:]:
            other = np.broadcast_to(grid, sizes)
            both = (base >= 0) & (other >= 0)
            t.union(base[both], other[both])
            lone = (base >= 0) ^ (other >= 0)
            t.freeze(base[lone], f"{op_key(node)}: meets data that cannot be sliced")
            t.freeze(other[lone], f"{op_key(node)}: meets data that cannot be sliced")
            base = np.where(base >= 0, base, other)
    sources = [i for i in aligned + passing if varying[i] <= set(out_spec)]
    if not sources:
        return None, set()
    if len({frozenset(varying[i]) for i in sources}) > 1:
        for i in sources:
            t.freeze(labels[i], f"{op_key(node)}: outer product of channels")
        return None, set()
    i = sources[0]
    return _to_output(labels[i], specs[i], out_spec), varying[i]


def _project(ids: np.ndarray, spec: str, letters: list[str]) -> np.ndarray:
    """Labels as a grid over `letters` (size 1 where the operand lacks a letter)."""
    index = tuple(slice(None) if spec[d] in letters else 0 for d in range(len(spec)))
    sub = ids[index]
    present = [spec[d] for d in range(len(spec)) if spec[d] in letters]
    sub = np.transpose(sub, [present.index(x) for x in letters if x in present])
    return sub.reshape([sub.shape[[x for x in letters if x in present].index(x)]
                        if x in present else 1 for x in letters])


def _to_output(ids: np.ndarray, spec: str, out_spec: str) -> np.ndarray:
    index = tuple(slice(None) if spec[d] in out_spec else 0 for d in range(len(spec)))
    sub = ids[index]
    kept = [x for x in spec if x in out_spec]
    present = [x for x in out_spec if x in kept]
    sub = np.transpose(sub, [kept.index(x) for x in present])
    return sub.reshape([sub.shape[present.index(x)] if x in present else 1 for x in out_spec])


def _matmul_spec(a_rank: int, b_rank: int) -> str:
    letters = "abcdefgh"
    if a_rank == 1 and b_rank == 1:
        return "k,k->"
    if b_rank == 1:
        batch = letters[: a_rank - 1]
        return f"{batch}k,k->{batch}"
    if a_rank == 1:
        batch = letters[: b_rank - 2]
        return f"k,{batch}kn->{batch}n"
    rank = max(a_rank, b_rank)
    batch = letters[: rank - 2]
    a_batch = batch[len(batch) - (a_rank - 2):] if a_rank > 2 else ""
    b_batch = batch[len(batch) - (b_rank - 2):] if b_rank > 2 else ""
    return f"{a_batch}mk,{b_batch}kn->{batch}mn"


@register("matmul", "mm", "bmm")
def matmul(t: Tracer, node: fx.Node) -> Any:
    a, b = node.args[0], node.args[1]
    view = _matrix_view(t, b)
    if view is not None:
        out = _by_param_matrix(t, node, a, view)
        return out.reshape((1,) * (out_ndim(node) - 1) + (-1,))
    spec = _matmul_spec(len(t.orig_shape(a)), len(t.orig_shape(b)))
    return _einsum_rule(t, node, [a, b], spec)


@register("baddbmm")
def baddbmm(t: Tracer, node: fx.Node) -> Any:
    out = _einsum_rule(t, node, [node.args[1], node.args[2]], "bmk,bkn->bmn")
    bias = t.labels_of(node.args[0])
    if bias is not None:
        t.freeze(bias, "baddbmm input")
    return out


@register("einsum")
def einsum(t: Tracer, node: fx.Node) -> Any:
    equation = node.args[0].replace(" ", "")
    operands = list(node.args[1])
    if "->" not in equation:
        return unknown_op(t, node)
    return _einsum_rule(t, node, operands, equation)


@register("scaled_dot_product_attention")
def sdpa(t: Tracer, node: fx.Node) -> Any:
    q, k, v = node.args[0], node.args[1], node.args[2]
    mask = _arg(node, 3, "attn_mask")
    gqa = bool(node.kwargs.get("enable_gqa", False))
    ndim = out_ndim(node)
    q_ids, k_ids, v_ids = (t.tensor_labels(x) for x in (q, k, v))
    if gqa:
        q_heads, kv_heads = t.orig_shape(q)[-3], t.orig_shape(k)[-3]
        rep = q_heads // kv_heads
        k_ids = _repeat_heads(k_ids, rep)
        v_ids = _repeat_heads(v_ids, rep)
    lead = "abcdefgh"[: ndim - 2]
    q_spec, k_spec, v_spec = f"{lead}sd", f"{lead}td", f"{lead}td"
    var_q, var_k, var_v = (_letters(t.label_dims(x), s) for x, s in
                           ((q, q_spec), (k, k_spec), (v, v_spec)))
    scores, var_s = _einsum_labels(
        t, node, [q_ids, k_ids], [var_q, var_k], [q_spec, k_spec], f"{lead}st"
    )
    if isinstance(mask, fx.Node):
        _attention_bias(t, mask, scores, ndim)
    out, _ = _einsum_labels(
        t, node, [scores if scores is not None else np.full((1,) * ndim, NO_LABEL), v_ids],
        [var_s, var_v], [f"{lead}st", v_spec], f"{lead}sd",
    )
    if t.apply_pass and _arg(node, 6, "scale") is None:
        # the default scale is 1/sqrt(head_dim): keep the original one when head_dim shrinks
        t.set_kwarg("scale", 1.0 / math.sqrt(t.orig_shape(q)[-1]))
    return out


def _attention_bias(t: Tracer, mask: fx.Node, scores: np.ndarray | None, ndim: int) -> None:
    """A float mask is added to the scores: a per-head bias (a relative position table)
    goes with the heads it is added to; anything else carrying channels is frozen."""
    mask_ids = t.labels_of(mask)
    if mask_ids is None:
        return
    offset = ndim - mask_ids.ndim
    dims = {d + offset for d in t.label_dims(mask)}
    if scores is None or not dims or max(dims) >= ndim - 2:
        t.freeze(mask_ids, "attention mask")
        return
    bias = mask_ids.reshape((1,) * offset + mask_ids.shape)
    bias, heads = np.broadcast_arrays(bias[..., :1, :1], scores[..., :1, :1])
    both = (bias >= 0) & (heads >= 0)
    t.union(bias[both], heads[both])
    t.freeze(bias[(bias >= 0) & (heads < 0)], "attention mask")


def _repeat_heads(ids: np.ndarray, rep: int) -> np.ndarray:
    if ids.ndim < 3 or ids.shape[-3] == 1:
        return ids
    return np.repeat(ids, rep, axis=-3)


# --------------------------------------------------------------- ops without tensor data
@register(
    "sym_size", "sym_numel", "sym_stride", "_assert_scalar", "_assert_async",
    "sym_constrain_range_for_size", "sym_constrain_range", "zeros", "ones", "full", "empty",
    "arange", "scalar_tensor", "zeros_like", "ones_like", "full_like", "empty_like",
    "new_zeros", "new_ones", "new_full", "new_empty", "rand", "randn", "randn_like",
    "rand_like", "tensor", "linspace", "tril", "triu", "eye", "_local_scalar_dense",
)
def no_channels(t: Tracer, node: fx.Node) -> Any:
    """Ops whose output carries no channel of their input (shapes, factories, masks)."""
    key = op_key(node)
    if key.startswith(("aten.zeros_like", "aten.ones_like", "aten.full_like", "aten.empty_like",
                       "aten.randn_like", "aten.rand_like", "aten.tril", "aten.triu")):
        ids = t.labels_of(node.args[0])
        if ids is not None and key.startswith(("aten.tril", "aten.triu")):
            t.freeze(ids, f"{key} over the channels")
        return None
    if key.startswith("aten._local_scalar_dense"):
        t.freeze(t.labels_of(node.args[0]), "the channels are read as a Python number")
    return None

