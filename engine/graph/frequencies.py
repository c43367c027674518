"""Rotary frequency tables: found by what a graph does with a buffer, not by its name.

A leaf helper below the channel analysis, so that both the tracer (which gives the tables'
entries channel slots) and the Hugging Face config rules (which solve `head_dim` and the
rope fields from the kept frequencies) read the same finding.
"""

from __future__ import annotations

import torch
from torch import fx


def _op_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    return getattr(target, "__name__", str(target))


FREQUENCY_PATH = frozenset({
    "_to_copy", "to", "type_as", "clone", "contiguous", "alias", "detach", "mul", "div",
    "matmul", "bmm", "mm", "einsum", "outer", "unsqueeze", "expand", "view", "reshape",
    "_unsafe_view", "transpose", "permute", "cat", "float", "repeat_interleave", "repeat",
    "slice", "squeeze", "cos", "sin", "_assert_tensor_metadata",
})


def find_frequency_tables(gm: fx.GraphModule) -> set[str]:
    """Rotary frequency buffers (``inv_freq``): 1-D floating buffers whose values reach
    both ``cos`` and ``sin`` through the ops of :data:`FREQUENCY_PATH` only.

    Found by what the graph does with them, not by name. Their entries are channel slots:
    the cos/sin tables made from them can then be sliced with the kept frequencies.
    """
    params = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    found: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in params:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() != 1 or not val.is_floating_point() \
                or val.shape[0] < 2:
            continue
        reached: set[str] = set()
        todo, seen = list(node.users), set()
        while todo:
            user = todo.pop()
            if user.name in seen or user.op != "call_function":
                continue
            seen.add(user.name)
            short = _op_name(user)
            if short not in FREQUENCY_PATH:
                continue
            if short in ("cos", "sin"):
                reached.add(short)
                continue
            todo.extend(user.users)
        if reached == {"cos", "sin"}:
            found.add(node.target)
    return found
