"""Dependency analysis: the groups of connected channels of a captured graph.

The analysis pass of :class:`~engine.graph.tracer.Tracer` joins channel elements; here the joined
sets ("components") become *channels* of *groups*. A component is one channel: everything in
it goes or stays together. Components produced by the same layers and read by the same
layers form one group, ordered like the first member's filters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch.fx as fx

from engine.graph.labels import unique_ints
from engine.graph.rules import RULES, find_rule, rule_for
from engine.graph.tracer import AnalysisState, Member, Tracer, layer_name, op_key


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
    readers: list[str] = field(default_factory=list)  # layers reading these channels

    def to_dict(self) -> dict:
        return {"layers": self.layers, "reason": self.reason, "readers": self.readers}


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
    tracer.run(rule_for)
    return _build(gm, state, whole_blocks, sorted(tracer.unknown))


_SALT = np.random.default_rng(20261125).integers(1, 2**62, size=1 << 16, dtype=np.int64)


def _incidence(roots: np.ndarray, sources: list[np.ndarray], keep: np.ndarray | None = None):
    """(component root, source index, count) for every source id, vectorised."""
    n = max(len(sources), 1)
    parts = [roots[ids[ids >= 0]] * n + k for k, ids in enumerate(sources)]
    keys = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if keep is not None:
        keys = keys[keep[keys // n]]
    uniq, counts = np.unique(keys, return_counts=True)
    return uniq // n, uniq % n, counts


def _signatures(comp, source, weight, size: int) -> np.ndarray:
    """An order-independent 64-bit hash of each component's (source, weight) set."""
    salt = _SALT[source % len(_SALT)].astype(np.uint64) + source.astype(np.uint64)
    value = salt * (weight.astype(np.uint64) * np.uint64(2654435761) + np.uint64(1))
    out = np.zeros(size, dtype=np.uint64)
    np.add.at(out, comp, value)
    return out


def _build(gm: fx.GraphModule, state: AnalysisState, whole: bool, unknown: list[str]) -> Structure:
    roots = state.uf.roots()
    frozen_roots: dict[int, str] = {}
    for i, reason in state.frozen.items():
        frozen_roots.setdefault(int(roots[i]), reason)
    inexact_roots = np.zeros(len(roots), dtype=bool)
    inexact_roots[roots[list(state.inexact)]] = True
    frozen_mask = np.zeros(len(roots), dtype=bool)
    frozen_mask[list(frozen_roots)] = True

    order = _node_order(gm)
    members = sorted(state.members.values(), key=lambda m: (order.get(m.node, 0), m.param))
    member_keys = {(m.param, m.dim) for m in members}
    member_slots = [state.slots[(m.param, m.dim)] for m in members]
    m_comp, m_source, m_count = _incidence(roots, member_slots)
    is_member_comp = np.zeros(len(roots), dtype=bool)
    is_member_comp[m_comp] = True

    consumer_layers: list[str] = []
    consumer_ids: list[np.ndarray] = []
    for (param, dim), ids in state.slots.items():
        if (param, dim) not in member_keys:
            consumer_layers.append(layer_name(param))
            consumer_ids.append(ids)
    for binding in state.bindings.values():
        if binding.grouped:
            consumer_layers.append(layer_name(binding.param))
            consumer_ids.append(binding.reference.ravel())
    c_comp, c_source, _ = _incidence(roots, consumer_ids, keep=is_member_comp)
    c_layer_index = np.array(
        [sorted(set(consumer_layers)).index(x) for x in consumer_layers], dtype=np.int64
    )
    c_layer = c_layer_index[c_source] if len(c_source) else c_source
    n_layers = max(len(c_layer_index), 1)
    c_keys = unique_ints(c_comp * n_layers + c_layer)  # 1-D keys: far faster than axis=1
    c_pairs = np.stack([c_keys // n_layers, c_keys % n_layers])
    layer_index = {layer: i for i, layer in enumerate(sorted({m.layer for m in members}))}
    m_layer = np.array([layer_index[members[k].layer] for k in range(len(members))],
                       dtype=np.int64)[m_source] if len(m_source) else m_source
    size = len(roots)
    member_sig = _signatures(m_comp, m_layer, m_count, size)
    consumer_sig = _signatures(c_pairs[0], c_pairs[1] + (1 << 15), np.ones_like(c_pairs[0]),
                               size)
    comps = unique_ints(m_comp)
    keys = member_sig[comps] * np.uint64(0x9E3779B97F4A7C15) + consumer_sig[comps]
    _, group_of = np.unique(keys, return_inverse=True)
    sorted_layers = sorted(set(consumer_layers))
    by_signature: dict[tuple, list[int]] = {}
    for gid in range(int(group_of.max()) + 1 if len(comps) else 0):
        group_comps = comps[group_of.ravel() == gid]
        rep = group_comps[0]
        counts = tuple(sorted(
            (members[k].layer, int(c)) for k, c in zip(m_source[m_comp == rep],
                                                       m_count[m_comp == rep])
        ))
        readers = tuple(sorted({sorted_layers[i] for i in c_pairs[1][c_pairs[0] == rep]}))
        by_signature[(counts, readers, gid)] = group_comps.tolist()

    member_rank: dict[str, int] = {}
    for k, m in enumerate(members):
        member_rank.setdefault(m.layer, k)
    block_roots = np.zeros(len(roots), dtype=bool)
    block_roots[roots[state.block_ids]] = True
    groups: list[GroupInfo] = []
    for (counts, consumers, _), comp_roots in by_signature.items():
        layers = sorted({layer for layer, _ in counts}, key=lambda x: member_rank[x])
        first = next(k for k, m in enumerate(members) if m.layer == layers[0])
        group_roots = np.array(comp_roots, dtype=np.int64)
        # channel order: the first member's filter order
        first_roots = roots[member_slots[first]]
        uniq, first_index = np.unique(first_roots, return_index=True)
        position = np.full(len(group_roots), len(first_roots), dtype=np.int64)
        found = np.isin(group_roots, uniq)
        position[found] = first_index[np.searchsorted(uniq, group_roots[found])]
        group_roots = group_roots[np.argsort(position, kind="stable")]
        sorted_roots = np.argsort(group_roots)
        slots = {}
        for k, m in enumerate(members):
            if m.layer not in layers or m.layer in slots:
                continue
            member_roots = roots[member_slots[k]]
            inside = np.isin(member_roots, group_roots)
            if not inside.any():
                continue  # the layer's other dimension (tied weights) belongs elsewhere
            idx = np.flatnonzero(inside)
            chan = sorted_roots[np.searchsorted(group_roots[sorted_roots], member_roots[idx])]
            slots[m.layer] = MemberSlots(m, idx.astype(np.int64), chan.astype(np.int64))
        prunable = ~frozen_mask[group_roots]
        frozen_here = group_roots[~prunable]
        groups.append(
            GroupInfo(
                name="",
                layers=layers,
                consumers=[c for c in consumers if c not in layers],
                channels=len(group_roots),
                blocks=None,
                exact=not inexact_roots[group_roots].any(),
                roots=group_roots,
                prunable=prunable,
                slots=slots,
                frozen_reason=frozen_roots[int(frozen_here[0])] if len(frozen_here) else None,
                whole_blocks=bool(block_roots[group_roots].all()),
            )
        )
    groups.sort(key=lambda g: member_rank[g.layers[0]])
    _assign_blocks(groups, state, roots)
    _check_joined_pieces(groups, state, roots, whole)
    _name_groups(groups)

    frozen: list[FrozenInfo] = []
    for g in groups:
        n_frozen = int((~g.prunable).sum())
        if n_frozen == g.channels:
            frozen.append(FrozenInfo(g.layers, g.frozen_reason or "frozen", g.consumers))
        elif n_frozen:
            frozen.append(FrozenInfo(
                g.layers, f"{n_frozen} of {g.channels} channels: {g.frozen_reason}", g.consumers
            ))
    frozen.extend(_outside_groups(gm, state, groups, roots))
    return Structure(state, whole, groups, frozen, unknown)


def _outside_groups(gm: fx.GraphModule, state: AnalysisState, groups: list[GroupInfo],
                    roots: np.ndarray) -> list[FrozenInfo]:
    """Layers with parameters that belong to no group: never left alone unexplained."""
    in_groups = np.zeros(len(roots), dtype=bool)
    for g in groups:
        in_groups[g.roots] = True
    covered = {param for (param, _), ids in state.slots.items()
               if len(ids) and in_groups[roots[ids]].any()}
    # tied weights have several names: one covered name covers the tensor
    names = dict(gm.named_parameters(remove_duplicate=False))
    covered_tensors = {id(names[p]) for p in covered if p in names}
    uses = _param_uses(gm)
    by_layer: dict[str, list[str]] = {}
    for name, value in gm.named_parameters():
        if id(value) in covered_tensors or sum(s > 1 for s in value.shape) == 0:
            continue
        by_layer.setdefault(layer_name(name), []).append(name)
    covered_layers = {layer_name(p) for p in covered}
    out = []
    for layer, params in by_layer.items():
        if layer in covered_layers:
            # a layer reading a group's channels may still keep weights of its own whole
            params = [p for p in params if sum(s > 1 for s in gm.get_parameter(p).shape) > 1]
            if not params:
                continue
        reason = _why_outside(params[0], uses.get(params[0]), state)
        out.append(FrozenInfo([layer], reason))
    return out


def _param_uses(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """The first op reading each parameter, past views of it."""
    firsts: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        todo = [u for u in node.users if not op_key(u).startswith("aten._assert")]
        while todo:
            user = todo.pop(0)
            if user.op == "call_function" and op_key(user).split(".")[1:2] in (
                ["t"], ["permute"], ["transpose"], ["expand"], ["view"], ["reshape"],
                ["_to_copy"], ["to"], ["detach"], ["alias"], ["contiguous"],
            ) and find_rule(user) is not None and len(user.users) == 1:
                todo.extend(user.users)
                continue
            firsts.setdefault(node.target, user)
            break
    return firsts


def _why_outside(param: str, user: fx.Node | None, state: AnalysisState) -> str:
    if user is None:
        return f"{param} is not used by the captured graph (or only checked, never computed)"
    if user.op == "call_module":
        return f"{param} is used inside submodule {user.target}, which is not analysed"
    key = op_key(user)
    if user.name in state.failed:
        return state.failed[user.name]
    if find_rule(user) is None:
        return f"{param} is read by {key}, which has no channel rule"
    for (p, _), ids in state.slots.items():
        reasons = [state.frozen[int(i)] for i in ids if int(i) in state.frozen]
        if p == param and reasons:
            return reasons[0]
    if any(p == param for p, _ in state.slots):
        return f"{param}: its channels meet no prunable layer (model inputs or constants)"
    return f"{param} is read by {key} as data, not as a layer's weight"


def _assign_blocks(groups: list[GroupInfo], state: AnalysisState, roots: np.ndarray) -> None:
    group_of = np.full(len(roots), -1, dtype=np.int64)  # by component root
    channel_of = np.full(len(roots), -1, dtype=np.int64)
    for gi, g in enumerate(groups):
        group_of[g.roots] = gi
        channel_of[g.roots] = np.arange(len(g.roots))
    layouts: dict[int, np.ndarray] = {}
    for split in state.splits:
        ids = split.ids
        if (ids < 0).any() or not ids.size:
            continue
        located = roots[ids]
        if located.shape[0] > 1:
            located = _without_shared_columns(located)
            if located is None:
                for gi in unique_ints(group_of[roots[ids]]).tolist():
                    if gi >= 0:
                        _freeze_group(groups[gi], f"{split.where}: channels shared by every "
                                      "block also sit apart in some")
                continue
            if not located.size:
                continue
        split_groups = group_of[located]
        if (split_groups < 0).any():
            continue
        spanned = unique_ints(split_groups)
        if len(spanned) > 1:
            # e.g. a fused qkv viewed as (3, heads, head_dim): q/k and v would have to keep
            # equally many channels per head, which the planner cannot promise
            for gi in spanned.tolist():
                _freeze_group(groups[gi], f"{split.where} spans several groups")
            continue
        _layout(groups, layouts, int(spanned[0]), channel_of[located], split.where)
    for gi, layout in layouts.items():
        groups[gi].block_index = layout
        groups[gi].blocks = (int(layout.shape[0]), int(layout.shape[1]))


def _check_joined_pieces(groups: list[GroupInfo], state: AnalysisState, roots: np.ndarray,
                         whole: bool) -> None:
    """Deferred checks of Tracer.defer_cat_check: pieces joined along one dim that carry
    channels along other dims too must keep their extent along those dims, or the join
    fails. A slice along such a dim never vanishes when it holds a whole group's channels
    (a group never loses all of them), a whole block of a group (inside-head pruning keeps
    every block) or a frozen channel; otherwise the groups involved are frozen."""
    group_of = np.full(len(roots), -1, dtype=np.int64)
    for gi, g in enumerate(groups):
        group_of[g.roots] = gi
    for reason, dim, pieces in state.same_channels:
        located = [np.where(p >= 0, roots[np.maximum(p, 0)], -1) for p in pieces]
        if all(_slices_survive(x, dim, groups, group_of, whole) for x in located):
            continue
        for x in located:
            for gi in unique_ints(group_of[x[x >= 0]]).tolist():
                if gi >= 0:
                    _freeze_group(groups[gi], reason)


def _slices_survive(located: np.ndarray, dim: int, groups: list[GroupInfo],
                    group_of: np.ndarray, whole: bool) -> bool:
    for d in range(located.ndim):
        if d == dim or located.shape[d] == 1:
            continue
        for k in range(located.shape[d]):
            kept = set(unique_ints(np.take(located, k, axis=d)).tolist())
            # an unlabelled position is never removed
            if -1 not in kept and not _never_emptied(kept, groups, group_of, whole):
                return False
    return True


def _never_emptied(kept: set[int], groups: list[GroupInfo], group_of: np.ndarray,
                   whole: bool) -> bool:
    for r in kept:
        gi = int(group_of[r])
        if gi < 0:
            return True  # not in any group: never pruned
        g = groups[gi]
        position = int(np.flatnonzero(g.roots == r)[0])
        if not g.prunable[position] or kept.issuperset(g.roots.tolist()):
            return True
        if g.block_index is not None and not whole:
            row = g.block_index[(g.block_index == position).any(axis=1)]
            if len(row) and kept.issuperset(g.roots[row[0]].tolist()):
                return True
    return False


def _without_shared_columns(located: np.ndarray) -> np.ndarray | None:
    """The split's columns less those holding the same channel in every block.

    Rotary attention joins channel j of every head with frequency j of one table, so every
    head holds the same channels there: removing one removes that position from every head,
    which keeps the blocks equal without a constraint. None: a shared channel also sits in
    a column of its own somewhere (no consistent layout).
    """
    shared = (located == located[:1]).all(axis=0)
    if not shared.any():
        return located
    rest = located[:, ~shared]
    if np.isin(rest, located[0, shared]).any():
        return None
    return rest


def _layout(groups, layouts, gi: int, rows: np.ndarray, where: str) -> None:
    """Record the block layout `rows` for group `gi` (or freeze it when it conflicts)."""
    unique_rows = _unique_rows(rows)
    flat = np.sort(unique_rows.ravel())
    if len(flat) != groups[gi].channels or not np.array_equal(flat, np.arange(len(flat))):
        _freeze_group(groups[gi], f"{where} does not split the channels into blocks")
        return
    if unique_rows.shape[0] < 2:
        return
    previous = layouts.get(gi)
    if previous is not None and not _same_layout(previous, unique_rows):
        _freeze_group(groups[gi], f"{where}: conflicting block layouts")
        return
    layouts[gi] = unique_rows


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
