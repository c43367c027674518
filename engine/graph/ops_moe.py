"""Op rules for mixtures of experts (entries of the one registry, :data:`engine.graph.ops.RULES`).

Routed experts as ``transformers`` 5 runs them: a router linear, softmax/sigmoid, ``topk``,
tokens gathered per expert with ``index``, experts stored as 3-D weights ``(experts, out, in)``
and run through a grouped matrix product (``aten._grouped_mm`` or the custom op
``transformers.grouped_mm_fallback``), ``histc`` counting tokens per expert.

Width: channel ``j`` of a stacked 3-D expert weight is one channel of every expert (the
stacked tensor must stay rectangular), scored on all experts' weights together.
Whole experts: the router's output channels are the experts; they are never width-pruned
(frozen with a reason) but removed whole by :mod:`engine.transform.experts`, which joins them
here with dim 0 of every expert weight.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.fx as fx

from engine.graph.ops import RULES, _channel_ids, _full, _ndim, op_key, register, unknown_op
from engine.graph.tracer import Tracer

ROUTING_REASON = "expert routing (top-k over the experts): experts go whole, with --expert-ratio"


def _grouped_mm(t: Tracer, node: fx.Node) -> Any:
    """``x (tokens, in) @ w[e] (in, out)`` for the tokens of each expert ``e``."""
    x, w = node.args[0], node.args[1]
    view = t.param_view(w)
    shape = t.orig_shape(x)
    if view is None or len(view[1]) != 3 or view[1][0] != 0 or shape is None or len(shape) != 2:
        return unknown_op(t, node)
    param, (_, in_dim, out_dim) = view
    x_ids = t.labels_of(x)
    if x_ids is not None:
        line = _channel_ids(t, x_ids, -1, op_key(node))
        if line is not None:
            t.bind(param, in_dim, _full(line, (t.shape(x)[-1],)))
    out = t.slots(param, out_dim, member=param, out_dim=1)
    return out.reshape(1, -1)


RULES["aten._grouped_mm"] = _grouped_mm
RULES["transformers.grouped_mm_fallback"] = _grouped_mm


@register("index.Tensor", "index.Tensor_hacked_twin", "_unsafe_index.Tensor")
def index_tensor(t: Tracer, node: fx.Node) -> Any:
    """``x[i0, i1, ...]`` with index tensors: rows picked by data (tokens per expert).

    Labels of the dimensions that are not indexed move with the data; indexing along a
    labelled dimension, or indices computed from channels, freeze the channels involved.
    """
    x, indices = node.args[0], list(node.args[1])
    for index in indices:
        if isinstance(index, fx.Node):
            t.freeze(t.labels_of(index), "channels used as indices")
    ids = t.labels_of(x)
    if ids is None:
        return None
    indexed = [d for d, index in enumerate(indices) if index is not None]
    if not indexed or set(indexed) & t.label_dims(x):
        t.freeze(ids, f"{op_key(node)} along the channels")
        return None
    kept = [d for d in range(ids.ndim) if d not in indexed]
    index_rank = _ndim(node) - len(kept)
    rest = np.take(ids, [0], axis=indexed[0])
    for d in indexed[1:]:
        rest = np.take(rest, [0], axis=d)
    rest = rest.reshape([ids.shape[d] for d in kept])
    adjacent = indexed == list(range(indexed[0], indexed[-1] + 1))
    at = sum(1 for d in kept if d < indexed[0]) if adjacent else 0
    shape = list(rest.shape[:at]) + [1] * index_rank + list(rest.shape[at:])
    return rest.reshape(shape)


@register("topk")
def topk(t: Tracer, node: fx.Node) -> Any:
    """Top-k along channels is routing: the channels become data (expert indices)."""
    x = node.args[0]
    ids = t.labels_of(x)
    if ids is None:
        return [None, None]
    dim = int(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)) % ids.ndim
    if dim in t.label_dims(x):
        t.freeze(ids, ROUTING_REASON)
        if not t.apply_pass:
            t.state.routers.append((node.name, ids.reshape(-1).copy()))
        return [None, None]
    return [ids, None]
