"""Depth pruning: remove whole residual blocks (found by :mod:`engine.graph.blocks`).

A removed block's add returns the stream itself; the branch's nodes and weights are dropped.
The least important blocks go: with calibration inputs by *block influence* (1 - cosine
similarity of the stream before and after the block), otherwise by the branch's output norm
relative to the stream's on the example inputs. Mask mode for depth is the original model
with the removed branches' outputs zeroed at their adds, which the pruned model must equal.

With ``block_unit="layer"`` the units scored and removed are whole transformer layers: the
consecutive blocks in the same numbered layer (``model.layers.3``: its attention and MLP
blocks, grouped as engine/io/hf_depth.py groups them), scored across the layer (the stream
before its first block against the stream after its last add), so hf/ can still be written.
A block outside any numbered layer (or a layer of one block: a ResNet bottleneck) is its own
layer.

Combined with width pruning, blocks are removed first and the smaller model is re-captured;
width pruning then plans on what remains (scores of removed blocks never compete).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from engine.errors import OptionError
from engine.graph.blocks import Block, block_and_span_scores, block_scores, find_blocks
from engine.graph.capture import Captured, copy_module, distinct_example_inputs, reexport
from engine.graph.inputs import graph_runner
from engine.graph.outputs import tensor_leaves
from engine.io.hf_depth import after_depth, layer_of
from engine.options import check_ratio
from engine.scoring.analysis import Analysis
from engine.scoring.calibration import as_calibration, batches
from engine.transform.apply import unshare
from engine.transform.exactness import compare_exact

BLOCK_UNITS = ("block", "layer")


def check_block_unit(block_unit: Any) -> str:
    if block_unit not in BLOCK_UNITS:
        raise OptionError(f"--block-unit={block_unit!r} is not allowed; allowed: "
                          f"{', '.join(BLOCK_UNITS)}")
    return block_unit


def blocks_to_remove(n_blocks: int, block_ratio: Any = None, remove_blocks: Any = None,
                     unit: str = "residual block") -> int:
    """How many blocks (or layers: `unit`) go; one-line errors for values outside what is
    allowed."""
    if block_ratio is not None and remove_blocks is not None:
        raise OptionError("give --block-ratio R or --remove-blocks N, not both")
    if block_ratio is not None:
        ratio = check_ratio(block_ratio, "--block-ratio")
        count = int(round(ratio * n_blocks))
        return min(count, max(n_blocks - 1, 0))
    if remove_blocks is None:
        return 0
    if isinstance(remove_blocks, bool):
        raise OptionError(f"--remove-blocks={remove_blocks!r} is not an integer; allowed: 0 <= N")
    try:
        count = int(str(remove_blocks).strip()) if isinstance(remove_blocks, str) \
            else int(remove_blocks)
        if count != remove_blocks and not isinstance(remove_blocks, str):
            raise ValueError
    except (TypeError, ValueError):
        raise OptionError(
            f"--remove-blocks={remove_blocks!r} is not an integer; allowed: 0 <= N"
        ) from None
    if count < 0:
        raise OptionError(f"--remove-blocks={count} is negative; allowed: 0 <= N")
    if count and count >= n_blocks:
        raise OptionError(
            f"--remove-blocks={count}: the model has {n_blocks} removable {unit}"
            f"{'s' if n_blocks != 1 else ''}; allowed: 0 <= N < {max(n_blocks, 1)}"
            if n_blocks else f"--remove-blocks={count}: the model has no removable residual "
            "blocks (a branch added back to the stream it leaves)"
        )
    return count


def choose(scores: dict[str, float], count: int) -> list[str]:
    """The `count` lowest-scoring blocks (ties: the later block goes first)."""
    names = list(scores)
    order = sorted(range(len(names)), key=lambda k: (scores[names[k]], -k))
    return [names[k] for k in order[:count]]


def remove(gm: fx.GraphModule, removed: list[Block]) -> fx.GraphModule:
    """A copy of `gm` without the removed blocks' branches and weights."""
    memo = {id(t): t for t in list(gm.parameters()) + list(gm.buffers())}
    new = copy_module(gm, memo)
    nodes = {n.name: n for n in new.graph.nodes}
    used_before = {n.target for n in new.graph.nodes if n.op == "get_attr"}
    branch_nodes: set[fx.Node] = set()
    # consecutive blocks (a layer's attention, then its MLP): the later block's stream is the
    # earlier block's add, itself replaced by its own stream
    replaced: dict[str, str] = {}
    for block in removed:
        stream = block.stream
        while stream in replaced:
            stream = replaced[stream]
        replaced[block.add] = stream
        nodes[block.add].replace_all_uses_with(nodes[stream])
        branch_nodes.update(nodes[name] for name in block.nodes)
    _drop_dead(new.graph, branch_nodes)
    used_after = {n.target for n in new.graph.nodes if n.op == "get_attr"}
    for name in used_before - used_after:
        owner_path, _, attr = name.rpartition(".")
        owner = new.get_submodule(owner_path) if owner_path else new
        if hasattr(owner, attr):
            delattr(owner, attr)
    unshare(new, gm)
    new.graph.lint()
    new.recompile()
    return new


def _drop_dead(graph: fx.Graph, branch_nodes: set[fx.Node]) -> None:
    """Erase nodes nothing uses. Side-effect nodes (assertions, in-place writes) are erased
    only where they act on what the removed branches computed."""
    region = set(branch_nodes)
    for node in graph.nodes:
        if node not in region and any(i in region for i in node.all_input_nodes):
            region.add(node)
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op in ("placeholder", "output") or node.users:
                continue
            if node.op == "call_module":
                continue
            if node.is_impure() and node not in region:
                continue
            graph.erase_node(node)
            changed = True


class _DepthMasked(fx.Interpreter):
    """The original graph with each removed block's branch zeroed at its add."""

    def __init__(self, gm: fx.GraphModule, removed: list[Block]) -> None:
        super().__init__(gm)
        self.zeroed = {b.add: b for b in removed}
        self.names = {n.name: n for n in gm.graph.nodes}

    def run_node(self, n: fx.Node):
        block = self.zeroed.get(n.name)
        if block is None:
            return super().run_node(n)
        stream = self.env[self.names[block.stream]]
        return stream + torch.zeros_like(self.env[self.names[block.branch]])


def masked_depth(gm: fx.GraphModule, removed: list[Block]) -> Callable:
    return graph_runner(_DepthMasked(gm, removed))


def score_inputs(analysis, calibration: Any) -> list[tuple]:
    """The example inputs, or the calibration batches."""
    if calibration is None:
        return [tuple(analysis.captured.example_inputs)]
    data = as_calibration(calibration, analysis.captured)
    return [inputs for inputs, _labels in batches(analysis.captured, data)]


def layers_of(blocks: list[Block]) -> dict[str, list[Block]]:
    """Layer name -> its blocks, in network order: consecutive blocks of the same numbered
    layer (engine.io.hf_depth.layer_of) form one; any other block is a layer of its own."""
    layers: dict[str, list[Block]] = {}
    previous: tuple[tuple[str, int] | None, str] = (None, "")
    for block in blocks:
        # "layers.0#2": the second block named after layers.0 (engine.graph.blocks)
        place = layer_of(block.name.split("#", 1)[0])
        if place is not None and place == previous[0]:
            layers[previous[1]].append(block)
            continue
        name = f"{place[0]}.{place[1]}" if place is not None else block.name
        if name in layers:  # not consecutive with its namesake: keep it apart
            name = block.name
        layers[name] = [block]
        previous = (place, name)
    return layers


def plan_depth(
    analysis, *, block_ratio: Any = None, remove_blocks: Any = None,
    calibration: np.ndarray | None = None, block_unit: str = "block",
) -> tuple[list[Block], dict]:
    """Every block with its score and whether it would go (nothing is removed here)."""
    check_block_unit(block_unit)
    blocks = find_blocks(analysis.gm)
    if block_unit == "layer":
        return blocks, _plan_layers(analysis, blocks, block_ratio, remove_blocks, calibration)
    count = blocks_to_remove(len(blocks), block_ratio, remove_blocks)
    kwargs = analysis.captured.example_kwargs or {}
    scores = block_scores(analysis.gm, blocks, score_inputs(analysis, calibration), kwargs,
                          influence=calibration is not None) if blocks else {}
    chosen = set(choose(scores, count))
    report = {
        "criterion": "block_influence" if calibration is not None else "relative_branch_norm",
        "unit": "block",
        "blocks": [{"name": b.name, "score": scores[b.name], "removed": b.name in chosen,
                    "params": b.numel} for b in blocks],
    }
    return blocks, report


def _plan_layers(analysis, blocks: list[Block], block_ratio: Any, remove_blocks: Any,
                 calibration: Any) -> dict:
    layers = layers_of(blocks)
    count = blocks_to_remove(len(layers), block_ratio, remove_blocks, unit="layer")
    kwargs = analysis.captured.example_kwargs or {}
    inputs = score_inputs(analysis, calibration) if blocks else []
    influence = calibration is not None
    spans = {name: (members[0].stream, members[-1].add) for name, members in layers.items()}
    block_score, layer_score = block_and_span_scores(
        analysis.gm, blocks, spans, inputs, kwargs, influence=influence) if blocks else ({}, {})
    chosen = set(choose(layer_score, count))
    gone = {b.name for name in chosen for b in layers[name]}
    return {
        "criterion": "block_influence" if influence else "relative_branch_norm",
        "unit": "layer",
        "layers": [{"name": name, "blocks": [b.name for b in members],
                    "score": layer_score[name], "removed": name in chosen}
                   for name, members in layers.items()],
        "removed_layers": [name for name in layers if name in chosen],
        "blocks": [{"name": b.name, "score": block_score[b.name], "removed": b.name in gone,
                    "params": b.numel} for b in blocks],
    }


def prune_depth(
    analysis, *, block_ratio: Any = None, remove_blocks: Any = None,
    calibration: np.ndarray | None = None, block_unit: str = "block",
):
    """Remove the least important blocks (or whole layers, `block_unit="layer"`): (the
    re-captured Analysis, the report section)."""
    blocks, report = plan_depth(analysis, block_ratio=block_ratio, remove_blocks=remove_blocks,
                                calibration=calibration, block_unit=block_unit)
    chosen = {b["name"] for b in report["blocks"] if b["removed"]}
    removed = [b for b in blocks if b.name in chosen]
    kwargs = analysis.captured.example_kwargs or {}
    if not removed:
        return analysis, report
    pruned = remove(analysis.gm, removed)
    inputs = analysis.captured.example_inputs
    # a repeated sample is verified once, as the width verification does
    sample = distinct_example_inputs(analysis.captured)
    with torch.no_grad():
        expected = tensor_leaves(masked_depth(analysis.gm, removed)(*sample, **kwargs))
        got = tensor_leaves(pruned(*sample, **kwargs))
    report["verification"] = compare_exact(expected, got, "depth",
                                             "with the removed blocks' branches zeroed")
    program = reexport(pruned, analysis.captured)
    # a transformers model keeps its hf/ export when whole layers went (engine/io/hf_depth.py)
    hf = after_depth(analysis.captured.hf, blocks, removed)
    captured = Captured(program, inputs, analysis.captured.source,
                        analysis.captured.example_kwargs, hf)
    return Analysis(captured), report

