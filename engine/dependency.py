"""Dependency analysis: the groups of connected channels of a captured graph.

The analysis pass of :class:`~engine.tracer.Tracer` joins channel elements; here the joined
sets ("components") become *channels* of *groups*. A component is one channel: everything in
it goes or stays together. Components produced by the same layers and read by the same
layers form one group, ordered like the first member's filters.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch.fx as fx

from engine.ops import RULES, find_rule
from engine.tracer import AnalysisState, Member, Tracer


@dataclass
class MemberSlots:
    """Which group channel each filter of a member layer belongs to."""

    member: Member
    slot_index: np.ndarray  # filter index in the member's parameter dimension
    channel: np.ndarray  # group channel of that filter


@dataclass
class GroupInfo:
    name: str
    layers: list[str]  # members: producing layers, network order
    consumers: list[str]  # layers whose inputs lose these channels
    channels: int
    blocks: tuple[int, int] | None
    exact: bool
    roots: np.ndarray = field(repr=False)  # component root of each channel
    prunable: np.ndarray = field(repr=False)  # False: frozen channel
    block_index: np.ndarray | None = field(default=None, repr=False)  # (A, B) channel indices
    slots: dict[str, MemberSlots] = field(default_factory=dict, repr=False)
    frozen_reason: str | None = None
    whole_blocks: bool = False  # each channel is a whole block (an attention head)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "layers": self.layers,
            "consumers": self.consumers,
            "channels": self.channels,
            "blocks": list(self.blocks) if self.blocks else None,
            "exact": self.exact,
            "frozen_channels": int((~self.prunable).sum()),
        }


@dataclass
class FrozenInfo:
    layers: list[str]
    reason: str

    def to_dict(self) -> dict:
        return {"layers": self.layers, "reason": self.reason}


@dataclass
class Structure:
    """The groups of one graph under one block mode (whole blocks or within blocks)."""

    state: AnalysisState
    whole_blocks: bool
    groups: list[GroupInfo]
    frozen: list[FrozenInfo]
    unsupported_ops: list[str]

    def group(self, name: str) -> GroupInfo:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)


def analyze_graph(gm: fx.GraphModule, whole_blocks: bool) -> Structure:
    state = AnalysisState()
    tracer = Tracer(gm, state, whole_blocks=whole_blocks)
    tracer.run(_rule_table(), _key)
    return _build(gm, state, whole_blocks, sorted(tracer.unknown))


class _RuleTable(dict):
    def get(self, key, default=None):  # noqa: D401 - dict protocol
        return key


def _rule_table():
    return _RuleLookup()


class _RuleLookup:
    def get(self, node, default=None):
        return find_rule(node)


def _key(node: fx.Node) -> fx.Node:
    return node


def _build(gm: fx.GraphModule, state: AnalysisState, whole: bool, unknown: list[str]) -> Structure:
    roots = state.uf.roots()
    frozen_roots: dict[int, str] = {}
    for i, reason in state.frozen.items():
        frozen_roots.setdefault(int(roots[i]), reason)
    inexact_roots = {int(roots[i]) for i in state.inexact}

    order = _node_order(gm)
    members = sorted(state.members.values(), key=lambda m: (order.get(m.node, 0), m.param))
    member_keys = {(m.param, m.dim) for m in members}
    comp_members: dict[int, dict[str, int]] = defaultdict(dict)
    for m in members:
        for r in roots[state.slots[(m.param, m.dim)]]:
            comp_members[int(r)][m.layer] = comp_members[int(r)].get(m.layer, 0) + 1
    comp_consumers: dict[int, set[str]] = defaultdict(set)
    for (param, dim), ids in state.slots.items():
        if (param, dim) in member_keys:
            continue
        layer = param.rsplit(".", 1)[0] if "." in param else param
        for r in np.unique(roots[ids]):
            if int(r) in comp_members:
                comp_consumers[int(r)].add(layer)
    for binding in state.bindings.values():
        if binding.grouped:
            layer = binding.param.rsplit(".", 1)[0]
            for r in np.unique(roots[binding.reference[binding.reference >= 0]]):
                if int(r) in comp_members:
                    comp_consumers[int(r)].add(layer)

    by_signature: dict[tuple, list[int]] = defaultdict(list)
    for root, counts in comp_members.items():
        signature = (tuple(sorted(counts.items())), tuple(sorted(comp_consumers[root])))
        by_signature[signature].append(root)

    member_rank: dict[str, int] = {}
    for k, m in enumerate(members):
        member_rank.setdefault(m.layer, k)
    groups: list[GroupInfo] = []
    for (counts, consumers), comp_roots in by_signature.items():
        layers = sorted({layer for layer, _ in counts}, key=lambda x: member_rank[x])
        first = next(m for m in members if m.layer == layers[0])
        first_roots = roots[state.slots[(first.param, first.dim)]]
        position = {}
        for k, r in enumerate(first_roots):
            position.setdefault(int(r), k)
        comp_roots.sort(key=lambda r: position.get(r, 1 << 60))
        channel_of = {r: c for c, r in enumerate(comp_roots)}
        group_roots = np.array(comp_roots, dtype=np.int64)
        slots = {}
        for m in members:
            if m.layer not in layers:
                continue
            member_roots = roots[state.slots[(m.param, m.dim)]]
            idx = np.array([k for k, r in enumerate(member_roots) if int(r) in channel_of])
            if not len(idx):
                continue  # the layer's other dimension (tied weights) belongs elsewhere
            chan = np.array([channel_of[int(member_roots[k])] for k in idx], dtype=np.int64)
            slots[m.layer] = MemberSlots(m, idx.astype(np.int64), chan)
        prunable = np.array([r not in frozen_roots for r in comp_roots], dtype=bool)
        consumer_list = [c for c in consumers if c not in layers]
        groups.append(
            GroupInfo(
                name="",
                layers=layers,
                consumers=consumer_list,
                channels=len(comp_roots),
                blocks=None,
                exact=not any(r in inexact_roots for r in comp_roots),
                roots=group_roots,
                prunable=prunable,
                slots=slots,
                frozen_reason=next((frozen_roots[r] for r in comp_roots if r in frozen_roots),
                                   None),
            )
        )
    block_roots = {int(roots[i]) for i in state.block_ids}
    for g in groups:
        g.whole_blocks = bool(block_roots) and all(int(r) in block_roots for r in g.roots)
    groups.sort(key=lambda g: member_rank[g.layers[0]])
    _assign_blocks(groups, state, roots)
    _name_groups(groups)

    frozen: list[FrozenInfo] = []
    for g in groups:
        n_frozen = int((~g.prunable).sum())
        if n_frozen == g.channels:
            frozen.append(FrozenInfo(g.layers, g.frozen_reason or "frozen"))
        elif n_frozen:
            frozen.append(
                FrozenInfo(g.layers, f"{n_frozen} of {g.channels} channels: {g.frozen_reason}")
            )
    return Structure(state, whole, groups, frozen, unknown)


def _assign_blocks(groups: list[GroupInfo], state: AnalysisState, roots: np.ndarray) -> None:
    where = {}
    for gi, g in enumerate(groups):
        for c, r in enumerate(g.roots):
            where[int(r)] = (gi, c)
    layouts: dict[int, np.ndarray] = {}
    for split in state.splits:
        ids = split.ids
        if (ids < 0).any():
            continue
        located = [where.get(int(r)) for r in roots[ids].ravel()]
        if any(x is None for x in located):
            continue
        group_ids = {x[0] for x in located}
        if len(group_ids) != 1:
            for gi in group_ids:
                _freeze_group(groups[gi], f"{split.where} spans several groups")
            continue
        gi = group_ids.pop()
        rows = np.array([x[1] for x in located], dtype=np.int64).reshape(ids.shape)
        unique_rows = _unique_rows(rows)
        flat = np.sort(unique_rows.ravel())
        if len(flat) != groups[gi].channels or not np.array_equal(flat, np.arange(len(flat))):
            _freeze_group(groups[gi], f"{split.where} does not split the channels into blocks")
            continue
        if unique_rows.shape[0] < 2:
            continue
        previous = layouts.get(gi)
        if previous is not None and not _same_layout(previous, unique_rows):
            _freeze_group(groups[gi], f"{split.where}: conflicting block layouts")
            continue
        layouts[gi] = unique_rows
    for gi, layout in layouts.items():
        groups[gi].block_index = layout
        groups[gi].blocks = (int(layout.shape[0]), int(layout.shape[1]))


def _unique_rows(rows: np.ndarray) -> np.ndarray:
    seen = []
    keys = set()
    for row in rows:
        key = tuple(row.tolist())
        if key not in keys:
            keys.add(key)
            seen.append(row)
    return np.array(seen, dtype=np.int64)


def _same_layout(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    return {frozenset(r.tolist()) for r in a} == {frozenset(r.tolist()) for r in b}


def _freeze_group(group: GroupInfo, reason: str) -> None:
    group.prunable[:] = False
    group.frozen_reason = reason


def _name_groups(groups: list[GroupInfo]) -> None:
    seen: dict[str, int] = {}
    for g in groups:
        base = g.layers[0] if len(g.layers) == 1 else f"{g.layers[0]}+{len(g.layers) - 1}"
        seen[base] = seen.get(base, 0) + 1
        g.name = base if seen[base] == 1 else f"{base}#{seen[base]}"


def _node_order(gm: fx.GraphModule) -> dict[str, int]:
    return {n.name: k for k, n in enumerate(gm.graph.nodes)}


__all__ = ["FrozenInfo", "GroupInfo", "Structure", "analyze_graph", "RULES"]
