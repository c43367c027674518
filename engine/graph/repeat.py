"""A graph of N identical decoder layers built from the capture of a copy with 2 of them.

torch.export traces every layer of a model, and on the meta device that costs about 0.3 s
per Llama-2-7B layer: most of a streamed prune's capture. Where the layers are identical
(same parameter shapes and layer type), layer 1 of a 2-layer capture is the pattern of every
layer after the first: its nodes are copied for layers 2 .. N-1, each copy reading the
previous layer's outputs where layer 1 reads layer 0's, and its own parameters
(``model.layers.K.…``); the nodes after the layers read the last layer's outputs.

`repeat_layers` returns None where the 2-layer graph does not have that form (a node between
the two layers, layers whose nodes differ): the caller then captures all N layers.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping

import torch
import torch.fx as fx


def layer_of(node: fx.Node, layers: str) -> int | None:
    """The index of the layer of `layers` (e.g. ``model.layers``) that `node` belongs to:
    a parameter's, or the innermost module of that list the node was traced in."""
    pattern = re.compile(rf"^{re.escape(layers)}\.(\d+)(\.|$)")
    if node.op == "get_attr":
        match = pattern.match(str(node.target))
        return int(match.group(1)) if match else None
    stack = node.meta.get("nn_module_stack") or {}
    for path, _type in reversed(list(stack.values())):
        match = pattern.match(str(path))
        if match:
            return int(match.group(1))
    return None


def _renamed(text: str, layers: str, k: int) -> str:
    return re.sub(rf"(^|\W){re.escape(layers)}\.1(\.|$)", rf"\g<1>{layers}.{k}\g<2>", text)


def _renamed_meta(meta: dict, layers: str, k: int) -> dict:
    out = copy.copy(meta)
    stack = meta.get("nn_module_stack")
    if stack:
        # the module stack also names the traced path: L['self'].model.layers[1]
        out["nn_module_stack"] = {
            _renamed(key, layers, k): (
                _renamed(path, layers, k),
                *rest) for key, (path, *rest) in stack.items()}
    return out


def repeat_layers(gm: fx.GraphModule, layers: str, count: int,
                  tensors: Mapping[str, torch.Tensor]) -> fx.GraphModule | None:
    """`gm` (an unlifted program of 2 layers of `layers`) with `count` layers; `tensors`:
    every parameter and buffer of the N-layer model by name (meta tensors), where the new
    layers' ``get_attr`` nodes find theirs. None where `gm` is not two repeats of one layer."""
    nodes = list(gm.graph.nodes)
    index = {n: layer_of(n, layers) for n in nodes}
    if count < 2 or set(index.values()) - {None} != {0, 1}:
        return None
    params = {i: [n for n in nodes if n.op == "get_attr" and index[n] == i] for i in (0, 1)}
    body = {i: [n for n in nodes if n.op != "get_attr" and index[n] == i] for i in (0, 1)}
    if not body[1] or len(body[0]) != len(body[1]) or len(params[0]) != len(params[1]):
        return None
    position = {n: p for p, n in enumerate(nodes)}
    # each layer's nodes are contiguous, layer 1 right after layer 0, its parameters likewise
    for group in (*params.values(), *body.values()):
        if position[group[-1]] - position[group[0]] != len(group) - 1:
            return None
    if position[body[1][0]] != position[body[0][-1]] + 1 or \
            position[params[1][0]] != position[params[0][-1]] + 1:
        return None
    twin = {a: b for i in (0, 1) for a, b in zip((params, body)[i][0], (params, body)[i][1])}
    for a, b in twin.items():  # layer 0 and layer 1: the same operations, in the same order
        if a.op != b.op or (a.op == "get_attr" and str(b.target) != re.sub(
                rf"^{re.escape(layers)}\.0\.", f"{layers}.1.", str(a.target))):
            return None
        if a.op != "get_attr" and (a.target != b.target or len(a.args) != len(b.args)):
            return None
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    graph._codegen = gm.graph._codegen  # how inputs and outputs are (un)flattened
    # the node that stands for each original node in layer k (1 = the original's own)
    copies: dict[int, dict[fx.Node, fx.Node]] = {k: {} for k in range(1, count)}
    env: dict[fx.Node, fx.Node] = {}
    last = {"param": params[1][-1], "body": body[1][-1]}
    layer1 = set(params[1]) | set(body[1])

    def in_layer(node: fx.Node, k: int) -> fx.Node:
        """What a node of layer k reads in place of `node` (a node of the 2-layer graph)."""
        if node in layer1:
            return copies[k][node]
        if index[node] == 0 and node.op != "get_attr" and k >= 2:
            return copies[k - 1][twin[node]]  # the previous layer's output
        return env[node]

    for node in nodes:
        if node in layer1 and index[node] == 1:
            new = graph.node_copy(node, lambda a: in_layer(a, 1))
            copies[1][node] = new
            env[node] = new
        else:
            # after the layers: read the last layer's outputs
            new = graph.node_copy(node, lambda a: copies[count - 1][a] if a in layer1
                                  else env[a])
            env[node] = new
        new.meta = copy.copy(node.meta)
        if node is last["param"] or node is last["body"]:
            group = params[1] if node is last["param"] else body[1]
            for k in range(2, count):
                for original in group:
                    if original.op == "get_attr":
                        target = _renamed(str(original.target), layers, k)
                        made = graph.get_attr(target)
                    else:
                        made = graph.node_copy(original, lambda a, k=k: in_layer(a, k))
                    made.meta = _renamed_meta(original.meta, layers, k)
                    copies[k][original] = made
    root: dict[str, object] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            name = str(node.target)
            root[name] = tensors[name] if name in tensors else _attr(gm, name)
        elif node.op == "call_module":
            root[str(node.target)] = gm.get_submodule(str(node.target))
    out = fx.GraphModule(root, graph, class_name=type(gm).__name__)
    out.meta.update(gm.meta)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(out, attr, getattr(gm, attr))
    return out


def _attr(gm: fx.GraphModule, name: str) -> object:
    owner, _, attr = name.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)
