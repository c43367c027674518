"""Op rules for mixtures of experts (entries of the one registry, :data:`engine.graph.ops.RULES`;
:mod:`engine.graph.rules` imports both).

Routed experts as ``transformers`` 5 runs them: a router linear, softmax/sigmoid, ``topk``,
tokens gathered per expert with ``index`` (the general rule in ops.py), experts stored as
3-D weights ``(experts, out, in)`` and run through a grouped matrix product
(``aten._grouped_mm`` or the custom op ``transformers.grouped_mm_fallback``), ``histc``
counting tokens per expert.

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

from engine.graph.labels import along
from engine.graph.ops import RULES, channel_ids, full_ids, out_ndim, register, unknown_op
from engine.graph.tracer import Tracer, op_key

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
        line = channel_ids(t, x_ids, -1, op_key(node))
        if line is not None:
            t.bind(param, in_dim, full_ids(line, (t.shape(x)[-1],)))
    out = t.slots(param, out_dim, member=param, out_dim=1)
    return out.reshape(1, -1)


RULES["aten._grouped_mm"] = _grouped_mm
RULES["transformers.grouped_mm_fallback"] = _grouped_mm


_GROUPED_MM = ("aten._grouped_mm", "transformers.grouped_mm_fallback")
_previous_gather = RULES.get("aten.gather")


def _routing_topk(t: Tracer, start: Any, limit: int = 24) -> fx.Node | None:
    """The router top-k a tensor of expert indices or counts comes from (a short walk back)."""
    todo = [start] if isinstance(start, fx.Node) else []
    seen = set()
    while todo and len(seen) < limit:
        n = todo.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and op_key(n).startswith("aten.topk"):
            return n
        todo.extend(n.all_input_nodes)
    return None


def expert_params(t: Tracer, router: fx.Node) -> list[str]:
    """Stacked expert weights run by grouped products routed by this top-k (dim 0 = experts)."""
    cache = t.__dict__.setdefault("_expert_params", {})
    if not cache:
        cache[None] = []
        for n in t.gm.graph.nodes:
            if n.op == "call_function" and find_key(n) in _GROUPED_MM and len(n.args) > 2:
                view = t.param_view(n.args[1])
                source = _routing_topk(t, n.args[2])
                if view is not None and source is not None and view[1][0] == 0:
                    cache.setdefault(source.name, [])
                    if view[0] not in cache[source.name]:
                        cache[source.name].append(view[0])
    return cache.get(router.name, [])


def find_key(node: fx.Node) -> str:
    key = op_key(node)
    return key.rsplit(".", 1)[0] if key.count(".") >= 2 else key


@register("topk")
def topk(t: Tracer, node: fx.Node) -> Any:
    """Top-k along channels is routing: the channels (experts) become data (indices).

    The experts are frozen for width pruning; dim 0 of the expert weights the routing feeds
    is joined with them, so removing an expert (engine.transform.experts) slices its router
    row and its weights together.
    """
    x = node.args[0]
    ids = t.labels_of(x)
    if ids is None:
        return [None, None]
    dim = int(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)) % ids.ndim
    if dim not in t.label_dims(x):
        return [ids, None]
    t.freeze(ids, ROUTING_REASON)
    line = along(ids, dim)
    if line is None:
        return [None, None]
    full = _experts_of(t, node) if t.apply_pass else line
    for param in expert_params(t, node):
        if full is not None and t.param_tensor(param).shape[0] == len(full):
            experts = t.slots(param, 0)
            t.union(experts, line)
    if not t.apply_pass:
        t.state.routers.append((node.name, line.copy()))
    return [None, None]


@register("histc")
def histc(t: Tracer, node: fx.Node) -> Any:
    """Tokens per expert: one bin per expert, so removed experts take their bins along."""
    t.freeze(t.labels_of(node.args[0]), "histc over the channels")
    router = _routing_topk(t, node.args[0])
    if t.apply_pass and router is not None:
        ids = t.labels_of(router.args[0])
        bins = int(node.args[1]) if len(node.args) > 1 else 100
        low = node.args[2] if len(node.args) > 2 else 0
        high = node.args[3] if len(node.args) > 3 else 0
        experts = _experts_of(t, router)
        if ids is not None and experts is not None and bins == len(experts) and low == 0 \
                and high == bins - 1:
            kept = int(t.kept(experts).sum())
            t.set_arg(1, kept)
            t.set_arg(2, 0)
            t.set_arg(3, kept - 1)
    return None


def _experts_of(t: Tracer, router: fx.Node) -> np.ndarray | None:
    for name, line in t.state.routers:
        if name == router.name:
            return line
    return None


@register("gather")
def gather(t: Tracer, node: fx.Node) -> Any:
    """``scores.gather(dim, topk_indices)``: the routing weights of the chosen experts."""
    x, index = node.args[0], node.args[2]
    ids = t.labels_of(x)
    dim = int(node.args[1]) % max(out_ndim(node), 1)
    if ids is not None and t.label_dims(x) == {dim} and _routing_topk(t, index, 4) is not None \
            and t.labels_of(index) is None:
        return None
    if _previous_gather is not None:
        return _previous_gather(t, node)
    return unknown_op(t, node)
