"""Removing whole experts of mixtures of experts.

A router is a layer whose output channels reach a top-k (the routing): those channels are
the experts. The analysis joins them with dim 0 of the stacked expert weights the routing
feeds (:mod:`engine.graph.ops_moe`), so removing an expert slices its router row, its
weights and any per-expert bias together, and the token counts per expert (``histc``) lose
its bin.

Scores: without calibration data, the L2 norm of each expert's weights; with it, the mean of
the expert's share of routed tokens (frequency) and of routing weight (gate mass). Every
router loses ``round(expert_ratio * experts)`` experts and keeps at least its top-k.

Mask mode: the original model with the removed experts' router logits (and top-k inputs)
set to -inf. Softmax then gives them zero probability and renormalises over the others,
and top-k never picks them, which is exactly what the model without them computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from engine.errors import OptionError, PruneScopeError, one_line
from engine.graph.capture import Captured, distinct_example_inputs, reexport
from engine.graph.inputs import run_graph
from engine.graph.ops_moe import expert_params
from engine.graph.outputs import tensor_leaves
from engine.graph.tracer import Tracer
from engine.options import check_ratio
from engine.scoring.analysis import Analysis
from engine.scoring.calibration import as_calibration, batches
from engine.transform.apply import keep_mask, rewrite
from engine.transform.exactness import compare_exact


@dataclass
class Router:
    layer: str  # the router layer (its output channels are the experts)
    param: str  # the router weight
    node: str  # the node computing the router logits
    topks: list[str]  # the top-k nodes routing over these experts
    ids: np.ndarray  # analysis ids of the experts, in router order
    top_k: int
    params: list[str]  # stacked expert weights (dim 0 = experts)


def find_routers(analysis) -> list[Router]:
    """Routers whose experts can be removed: a parameter layer feeding a top-k."""
    structure = analysis.structure(False)
    state = structure.state
    roots = state.uf.roots()
    nodes = {n.name: n for n in analysis.gm.graph.nodes}
    probe = Tracer(analysis.gm, state, whole_blocks=False)
    found: dict[frozenset, Router] = {}
    for topk_name, line in state.routers:
        key = frozenset(roots[line].tolist())
        params = expert_params(probe, nodes[topk_name])
        if key in found:
            found[key].topks.append(topk_name)
            found[key].params += [p for p in params if p not in found[key].params]
            found[key].top_k = max(found[key].top_k, int(nodes[topk_name].args[1]))
            continue
        member = next((m for (p, d), m in state.members.items()
                       if d == 0 and frozenset(roots[state.slots[(p, d)]].tolist()) == key), None)
        if member is None:
            continue
        order = state.slots[(member.param, 0)]
        found[key] = Router(member.layer, member.param, member.node, [topk_name], order,
                            int(nodes[topk_name].args[1]), list(params))
    return [r for r in found.values() if r.params]


def check_expert_ratio(value: Any) -> float:
    return check_ratio(value, "--expert-ratio")


def expert_scores(analysis, router: Router, calibration: Any = None) -> np.ndarray:
    if calibration is None:
        total = np.zeros(len(router.ids))
        for name in router.params:
            w = analysis.param(name).double()
            total += (w.reshape(w.shape[0], -1) ** 2).sum(dim=1).numpy()
        return np.sqrt(total)
    return routing_scores(analysis, [router], calibration)[router.layer]


def routing_scores(analysis, routers: list[Router], calibration: Any) -> dict[str, np.ndarray]:
    """Mean of each expert's share of routed tokens and of routing weight (gate mass)."""
    final = {r.topks[-1]: r for r in routers}
    count = {r.layer: np.zeros(len(r.ids)) for r in routers}
    mass = {r.layer: np.zeros(len(r.ids)) for r in routers}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            router = final.get(n.name)
            if router is not None:
                values, indices = result
                e = len(router.ids)
                idx = indices.reshape(-1).long()
                count[router.layer] += torch.bincount(idx, minlength=e).double().numpy()
                mass[router.layer] += torch.zeros(e, dtype=torch.float64).index_add_(
                    0, idx, values.reshape(-1).double().clamp_min(0)).numpy()
            return result

    recorder = Recorder(analysis.gm)
    kwargs = analysis.captured.example_kwargs or {}
    with torch.no_grad():
        for inputs, _ in batches(analysis.captured, as_calibration(calibration, analysis.captured)):
            run_graph(recorder, inputs, kwargs)
    out = {}
    for r in routers:
        c, m = count[r.layer], mass[r.layer]
        out[r.layer] = 0.5 * c / max(c.sum(), 1e-12) + 0.5 * m / max(m.sum(), 1e-12)
    return out


def plan_experts(routers: list[Router], scores: dict[str, np.ndarray], ratio: float):
    """Router layer -> indices of the experts to remove (lowest scores first)."""
    out = {}
    for r in routers:
        n = len(r.ids)
        count = min(int(round(ratio * n)), n - r.top_k)
        order = np.argsort(scores[r.layer], kind="stable")
        out[r.layer] = np.sort(order[:max(count, 0)])
    return out


class _ExpertMasked(fx.Interpreter):
    """The original graph with removed experts' router logits and top-k inputs at -inf."""

    def __init__(self, gm, structure, removed_roots: np.ndarray, routers: list[Router]):
        super().__init__(gm)
        roots = structure.state.uf.roots()
        labels = structure.state.labels
        names = {n.name: n for n in gm.graph.nodes}
        self.logits: dict[str, Any] = {}
        self.topk_inputs: dict[str, Any] = {}
        for r in routers:
            self.logits[r.node] = keep_mask(labels.get(r.node), roots, removed_roots)
            for name in r.topks:
                source = names[name].args[0]
                self.topk_inputs[name] = keep_mask(labels.get(source.name), roots, removed_roots)

    def run_node(self, n: fx.Node):
        keep = self.topk_inputs.get(n.name)
        if keep is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            x = args[0].masked_fill(keep == 0, float("-inf"))
            return self.call_function(n.target, (x, *args[1:]), kwargs)
        result = super().run_node(n)
        keep = self.logits.get(n.name)
        if keep is not None and isinstance(result, torch.Tensor):
            result = result.masked_fill(keep == 0, float("-inf"))
        return result


def prune_experts(analysis, expert_ratio: Any, calibration: Any = None):
    """Remove the least important experts: (the re-captured Analysis, the report section)."""
    ratio = check_expert_ratio(expert_ratio)
    routers = find_routers(analysis)
    if ratio > 0 and not routers:
        raise OptionError("--expert-ratio: the model has no routed experts (a router layer "
                          "whose top-k picks stacked expert weights)")
    if calibration is not None and routers:
        scores = routing_scores(analysis, routers, calibration)
    else:
        scores = {r.layer: expert_scores(analysis, r) for r in routers}
    chosen = plan_experts(routers, scores, ratio)
    structure = analysis.structure(False)
    roots = structure.state.uf.roots()
    removed = np.zeros(len(roots), dtype=bool)
    for r in routers:
        removed[roots[r.ids[chosen[r.layer]]]] = True
    report = {
        "criterion": "routing" if calibration is not None else "weights",
        "ratio": ratio,
        "routers": [{"layer": r.layer, "experts": len(r.ids), "top_k": r.top_k,
                     "weights": r.params, "scores": scores[r.layer].tolist(),
                     "removed": chosen[r.layer].tolist()} for r in routers],
    }
    if not removed.any():
        return analysis, report
    inputs = analysis.captured.example_inputs
    kwargs = analysis.captured.example_kwargs or {}
    # a repeated sample is verified once, as the width verification does
    sample = distinct_example_inputs(analysis.captured)
    try:
        pruned = rewrite(analysis.gm, structure, removed)
        for r in routers:
            _resize_routing_constants(pruned, structure, r, len(r.ids) - len(chosen[r.layer]))
        pruned.recompile()
        with torch.no_grad():
            got = tensor_leaves(pruned(*sample, **kwargs))
    except Exception as exc:  # noqa: BLE001 - a routing the engine cannot shrink
        raise PruneScopeError(
            f"experts of {', '.join(r.layer for r in routers)} cannot be removed: the routing "
            f"computes shapes from the number of experts ({one_line(exc, limit=200)})"
        ) from None
    with torch.no_grad():
        expected = tensor_leaves(run_graph(
            _ExpertMasked(analysis.gm, structure, removed, routers), sample, kwargs))
    report["verification"] = compare_exact(expected, got, "expert",
                                             "with the removed experts' router logits at -inf")
    program = reexport(pruned, analysis.captured)
    captured = Captured(program, inputs, analysis.captured.source, analysis.captured.example_kwargs)
    return Analysis(captured), report


_SHAPED = ("aten.expand.default", "aten.view.default", "aten.reshape.default",
           "aten._unsafe_view.default")


def _resize_routing_constants(gm: fx.GraphModule, structure, router: Router, kept: int) -> None:
    """Masks built from shapes inside the routing (DeepSeek's group mask, expanded to the
    number of experts) hold no channel labels for the rewrite to follow: where such a tensor
    between the router and its top-k ends in the expert count, it ends in the kept count."""
    experts = len(router.ids)
    if kept == experts:
        return
    nodes = {n.name: n for n in gm.graph.nodes}
    start = nodes[router.node]
    ancestors: set[fx.Node] = set()
    todo = [nodes[name].args[0] for name in router.topks]
    while todo:
        n = todo.pop()
        if isinstance(n, fx.Node) and n not in ancestors and n is not start:
            ancestors.add(n)
            todo.extend(n.all_input_nodes)
    labels = structure.state.labels
    for n in ancestors:
        if str(n.target) not in _SHAPED or isinstance(labels.get(n.name), np.ndarray):
            continue
        sizes = list(n.args[1])
        if sizes and sizes[-1] == experts:
            sizes[-1] = kept
            n.args = (n.args[0], sizes, *n.args[2:])

