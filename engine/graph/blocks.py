"""Residual blocks: a branch that leaves a stream and is added back to it.

Found on the ATen graph alone, whatever the model: an ``add`` whose one operand (the
*stream*) is an ancestor of the other (the *branch*), both of the output's shape, where the
branch runs at least one weight (bottleneck blocks, transformer attention and MLP
sublayers). Removing a block makes the add's output the stream itself; whatever only the
branch computed is then dead and dropped (:mod:`engine.transform.depth`). Blocks nest
freely: a decoder layer is its attention block followed by its MLP block.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx

from engine.graph.inputs import run_graph

_ADDS = ("aten.add.Tensor", "aten.add_.Tensor")


@dataclass
class Block:
    name: str  # the module path shared by the branch's weights (model.layers.3.mlp)
    add: str  # the add node joining the branch back
    stream: str  # the stream operand
    branch: str  # the branch operand
    nodes: list[str] = field(repr=False)  # branch nodes: on a path from stream to branch
    params: list[str] = field(default_factory=list)  # parameters the branch reads
    numel: int = 0  # their total size (shared parameters included)

    def to_dict(self) -> dict:
        return {"name": self.name, "add": self.add, "params": self.numel}


def _is_add(node: fx.Node) -> bool:
    if node.op != "call_function" or len(node.args) != 2:
        return False
    if node.target is operator.add:
        return True
    return str(node.target) in _ADDS and node.kwargs.get("alpha", 1) == 1


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor) and val.is_floating_point():
        return tuple(val.shape)
    return None


def find_blocks(gm: fx.GraphModule) -> list[Block]:
    """Every residual block of the graph, in network order."""
    nodes = list(gm.graph.nodes)
    index = {n: k for k, n in enumerate(nodes)}
    sizes = {name: p.numel() for name, p in gm.named_parameters(remove_duplicate=False)}
    weights = _weights(gm)
    blocks: list[Block] = []
    for node in nodes:
        if not _is_add(node):
            continue
        a, b = node.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        out = _shape(node)
        if out is None or _shape(a) != out or _shape(b) != out:
            continue
        found = _branch(a, b, index) or _branch(b, a, index)
        if found is None:
            continue
        stream, branch, members = found
        params = sorted(_weights_read(members, stream, sizes))
        if not any(p in weights for p in params):
            continue  # x + f(x) without weights (a GELU polynomial), not a block
        blocks.append(Block(
            name=_common_prefix([p for p in params if p in weights]), add=node.name,
            stream=stream.name, branch=branch.name,
            nodes=[m.name for m in sorted(members, key=index.get)], params=params,
            numel=sum(sizes[p] for p in params),
        ))
    _unique_names(blocks)
    return blocks


def _branch(stream: fx.Node, branch: fx.Node, index: dict):
    """(stream, branch, the nodes on paths stream -> branch) when stream feeds branch."""
    if stream.op == "get_attr" or index[stream] >= index[branch]:
        return None
    ancestors: set[fx.Node] = set()
    todo = [branch]
    low = index[stream]
    while todo:
        n = todo.pop()
        if n in ancestors or index[n] < low:
            continue
        ancestors.add(n)
        todo.extend(n.all_input_nodes)
    if stream not in ancestors:
        return None
    on_path = {stream}
    for n in sorted(ancestors, key=index.get):
        if n is not stream and any(i in on_path for i in n.all_input_nodes):
            on_path.add(n)
    on_path.discard(stream)
    return stream, branch, on_path


def _weights_read(members: set[fx.Node], stream: fx.Node, params: dict[str, int],
                  depth: int = 4) -> set[str]:
    """Parameters the branch reads, directly or through a few weight-only ops (transpose,
    cast)."""
    found: set[str] = set()
    todo = [(i, 0) for m in members for i in m.all_input_nodes
            if i not in members and i is not stream]
    seen: set[fx.Node] = set()
    while todo:
        n, level = todo.pop()
        if n in seen or level > depth:
            continue
        seen.add(n)
        if n.op == "get_attr":
            if n.target in params:
                found.add(n.target)
        elif n.op == "call_function":
            todo.extend((i, level + 1) for i in n.all_input_nodes)
    return found


def _weights(gm: fx.GraphModule) -> dict[str, int]:
    """Parameter name -> size, for parameters of two dims or more (weights, not scales)."""
    return {name: p.numel() for name, p in gm.named_parameters(remove_duplicate=False)
            if p.dim() >= 2}


def _common_prefix(params: list[str]) -> str:
    parts = [p.split(".")[:-1] for p in params]
    prefix = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return ".".join(prefix) or params[0].rsplit(".", 1)[0]


def _unique_names(blocks: list[Block]) -> None:
    seen: dict[str, int] = {}
    for block in blocks:
        seen[block.name] = seen.get(block.name, 0) + 1
        if seen[block.name] > 1:
            block.name = f"{block.name}#{seen[block.name]}"


class _StreamRecorder(fx.Interpreter):
    """Runs the graph once and measures, at each block's add, the stream and the branch, and
    for each span (a run of consecutive blocks: a transformer layer) the stream entering it
    against the stream leaving it."""

    def __init__(self, gm: fx.GraphModule, blocks: list[Block],
                 spans: dict[str, tuple[str, str]], influence: bool) -> None:
        super().__init__(gm)
        self.by_add = {b.add: b for b in blocks}
        self.influence = influence
        self.total = {b.name: 0.0 for b in blocks}
        self.count = {b.name: 0 for b in blocks}
        self.starts: dict[str, list[str]] = {}
        self.ends: dict[str, list[str]] = {}
        for name, (start, end) in spans.items():
            self.starts.setdefault(start, []).append(name)
            self.ends.setdefault(end, []).append(name)
        self.before: dict[str, torch.Tensor] = {}
        self.span_total = {name: 0.0 for name in spans}
        self.span_count = {name: 0 for name in spans}

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        block = self.by_add.get(n.name)
        if block is not None:
            stream = self.env[self._node(block.stream)].detach().double()
            branch = self.env[self._node(block.branch)].detach().double()
            value = _influence(stream, stream + branch) if self.influence else \
                float(branch.norm() / stream.norm().clamp_min(1e-12))
            self.total[block.name] += value
            self.count[block.name] += 1
        for name in self.starts.get(n.name, ()):
            # kept here: the interpreter frees the stream once its last user (the first add) ran
            self.before[name] = result.detach().double().clone()
        for name in self.ends.get(n.name, ()):
            before = self.before.pop(name)
            after = result.detach().double()
            value = _influence(before, after) if self.influence else \
                float((after - before).norm() / before.norm().clamp_min(1e-12))
            self.span_total[name] += value
            self.span_count[name] += 1
        return result

    def _node(self, name: str) -> fx.Node:
        if not hasattr(self, "_names"):
            self._names = {x.name: x for x in self.module.graph.nodes}
        return self._names[name]

    def scores(self) -> tuple[dict[str, float], dict[str, float]]:
        def mean(total: dict[str, float], count: dict[str, int]) -> dict[str, float]:
            return {k: float(np.nan_to_num(total[k] / max(count[k], 1))) for k in total}

        return mean(self.total, self.count), mean(self.span_total, self.span_count)


def _influence(before: torch.Tensor, after: torch.Tensor) -> float:
    """1 - cosine similarity of the stream before and after the block, averaged over
    positions; channels are the last dim of sequences (rank <= 3), dim 1 of feature maps."""
    dim = 1 if before.dim() >= 4 else -1
    cos = torch.nn.functional.cosine_similarity(before, after, dim=dim, eps=1e-12)
    return float((1 - cos).mean())


def block_and_span_scores(
    gm: fx.GraphModule, blocks: list[Block], spans: dict[str, tuple[str, str]],
    inputs: list[tuple], kwargs: dict | None = None, *, influence: bool,
) -> tuple[dict[str, float], dict[str, float]]:
    """In one run of the graph per input: block name -> importance (block influence with
    calibration, else relative branch norm), and span name -> importance of (stream node, last
    add node): the same measures across the span. A one-block span scores as its block does
    (up to rounding)."""
    recorder = _StreamRecorder(gm, blocks, spans, influence)
    with torch.no_grad():
        for args in inputs:
            run_graph(recorder, args, kwargs)
    return recorder.scores()


def block_scores(
    gm: fx.GraphModule, blocks: list[Block], inputs: list[tuple], kwargs: dict | None = None,
    *, influence: bool,
) -> dict[str, float]:
    """Block name -> importance: block influence (calibration) or relative branch norm."""
    return block_and_span_scores(gm, blocks, {}, inputs, kwargs, influence=influence)[0]

