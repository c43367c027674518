"""Walks an ATen graph applying the op rules of :mod:`engine.graph.ops` to channel labels.

The same walk runs twice. The *analysis* pass gives every parameter dimension fresh element
ids ("slots"), propagates them through the graph and joins (union-find) the ids that must be
pruned together. The *apply* pass replays the rules on the labels that survive a plan: it
yields each tensor's pruned layout, so the rules can rewrite shape constants, and it tells,
for every parameter dimension, which original indices to keep and in which order.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from engine.graph.frequencies import find_frequency_tables
from engine.graph.labels import (
    NO_LABEL,
    UnionFind,
    compress,
    is_labelled,
    match_positions,
    surviving,
    unique_ints,
)
from engine.graph.weighted import WEIGHTED_OPS, weighted_op


class RewriteError(RuntimeError):
    """The plan cannot be realised on this graph (an engine bug, never a user error)."""


@dataclass
class Member:
    """A producing layer: its filters are the slots of one parameter dimension."""

    layer: str
    param: str
    dim: int
    node: str  # the node whose output carries the filters (nuclear_norm reads it)
    out_dim: int  # channel dimension of that output


@dataclass
class Binding:
    param: str
    dim: int
    reference: np.ndarray  # analysis-pass activation ids matched index by index to the slots
    grouped: int = 0  # >0: grouped-conv input dim; reference has shape (groups, per_group)


@dataclass
class Split:
    """A dimension laid out as (A, B) blocks: a reshape split or a grouped convolution."""

    ids: np.ndarray  # (A, B) analysis ids
    where: str


@dataclass
class AnalysisState:
    uf: UnionFind = field(default_factory=UnionFind)
    slots: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    members: dict[tuple[str, int], Member] = field(default_factory=dict)
    bindings: dict[tuple[str, str, int], Binding] = field(default_factory=dict)
    frozen: dict[int, str] = field(default_factory=dict)  # id -> first reason
    inexact: dict[int, str] = field(default_factory=dict)
    splits: list[Split] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)  # one id of each whole block (head)
    split_levels: dict[tuple, list[int]] = field(default_factory=dict)  # reshape -> levels
    labels: dict[str, Any] = field(default_factory=dict)  # node name -> labels
    routers: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (topk node, expert ids)
    failed: dict[str, str] = field(default_factory=dict)  # node name -> why its rule failed
    # (reason, dim, labels): pieces joined along dim whose extents along their other dims
    # must survive any plan, or be frozen (checked by engine.graph.dependency)
    same_channels: list[tuple[str, int, list[np.ndarray]]] = field(default_factory=list)


@dataclass
class DerivedWeight:
    """A layer weight computed from a parameter before use (weight standardisation,
    weight norm): ``param`` has the weight's shape, its output channels map one to one."""

    param: str
    normalised: bool  # statistics over the input channels: pruning them is inexact


# ops a weight may pass through on its way to a layer and stay per-output-channel
WEIGHT_TRANSFORMS = frozenset({
    "reshape", "view", "reshape_as", "view_as", "_unsafe_view", "batch_norm",
    "_native_batch_norm_legit", "_native_batch_norm_legit_functional", "native_batch_norm",
    "var_mean", "var", "std", "std_mean", "mean", "sum", "sub", "add", "mul", "div", "sqrt",
    "rsqrt", "pow", "_weight_norm", "_weight_norm_interface", "norm", "linalg_vector_norm",
    "norm_except_dim", "clamp", "clamp_min", "abs", "neg", "_to_copy", "to", "clone",
    "contiguous", "detach", "alias", "reciprocal", "getitem", "expand", "expand_as",
})
NORMALISING = frozenset({
    "batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
    "native_batch_norm", "var_mean", "var", "std", "std_mean", "mean", "sum", "_weight_norm",
    "_weight_norm_interface", "norm", "linalg_vector_norm", "norm_except_dim",
})
# weighted layers whose output channels are dim 0 of the weight (not addmm, not transposed)
LAYER_OPS = frozenset(op.name for op in WEIGHTED_OPS.values()
                      if op.kind in ("linear", "conv") and op.transposed is not True)


def layer_name(param: str) -> str:
    """The module owning a parameter (``conv`` for ``conv.parametrizations.weight.original0``)."""
    if ".parametrizations." in param:
        return param.split(".parametrizations.", 1)[0]
    return param.rsplit(".", 1)[0] if "." in param else param


def op_key(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "__name__", str(target))


def _short_op(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    return getattr(target, "__name__", str(target))


def concrete(size: Any) -> int:
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        if hint is None:
            hint = size.node.shape_env.size_hint(size.node.expr)
        return int(hint)
    return int(size)


def val_shape(val: Any) -> tuple[int, ...] | None:
    if isinstance(val, torch.Tensor):
        return tuple(concrete(s) for s in val.shape)
    return None


def is_data_dependent(size: Any) -> bool:
    """A size torch.export could not bound from the inputs' shapes (an unbacked symbol, from
    `.item()`, `nonzero` and the like): it has no value until the model runs on data."""
    return (isinstance(size, torch.SymInt) and size.node.hint is None
            and bool(free_unbacked_symbols(size.node.expr)))


def known_shape(val: Any) -> tuple[int, ...] | None:
    """`val_shape`, or None where a size is data-dependent (`is_data_dependent`)."""
    if isinstance(val, torch.Tensor) and any(is_data_dependent(s) for s in val.shape):
        return None
    return val_shape(val)


class Tracer:
    """Runs the rules over a graph module; `pruned` is None in the analysis pass."""

    def __init__(
        self,
        gm: fx.GraphModule,
        state: AnalysisState,
        *,
        whole_blocks: bool,
        pruned: np.ndarray | None = None,
    ) -> None:
        self.gm = gm
        self.state = state
        self.whole_blocks = whole_blocks
        self.apply_pass = pruned is not None
        self.pruned_root = pruned  # bool per root id (apply pass)
        self.roots = state.uf.roots() if self.apply_pass else None
        self.labels: dict[str, Any] = {}
        self.node: fx.Node | None = None
        self.param_of: dict[str, str] = {}
        self._owners: dict[str, torch.nn.Module] = {}
        self.gathers: dict[tuple[str, int], np.ndarray] = {}
        self.grouped_gathers: dict[str, list[np.ndarray]] = {}
        self.unknown: set[str] = set()
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                self.param_of[node.name] = node.target
        self.param_views = self._find_param_views(gm)
        self.derived_weights = self._find_derived_weights(gm)
        self.derived_sources = {d.param for d in self.derived_weights.values()}
        # inside-head pruning only: with whole heads the tables meet no channel of their own
        self.frequency_tables = set() if whole_blocks else find_frequency_tables(gm)

    # ----------------------------------------------------------------- queries for rules
    def labels_of(self, arg: Any) -> np.ndarray | None:
        if isinstance(arg, fx.Node):
            value = self.labels.get(arg.name)
            if isinstance(value, np.ndarray):
                return value
        return None

    def label_dims(self, arg: Any) -> set[int]:
        """Dimensions along which a tensor's labels vary, as found by the analysis pass.

        In the apply pass a labelled dimension may have shrunk to size 1, so array shapes
        alone cannot tell it from a broadcast one.
        """
        if not isinstance(arg, fx.Node):
            return set()
        ref = (self.state.labels if self.apply_pass else self.labels).get(arg.name)
        if not isinstance(ref, np.ndarray):
            return set()
        return {d for d in range(ref.ndim) if ref.shape[d] > 1}

    def orig_shape(self, arg: Any) -> tuple[int, ...] | None:
        if isinstance(arg, fx.Node):
            return val_shape(arg.meta.get("val"))
        return None

    def shape(self, arg: Any) -> tuple[int, ...] | None:
        """The tensor's shape in this pass: original, or pruned in the apply pass."""
        shape = self.orig_shape(arg)
        if shape is None or not self.apply_pass:
            return shape
        ids = self.labels_of(arg)
        ref = self.state.labels.get(arg.name)
        if ids is None or not isinstance(ref, np.ndarray):
            return shape
        return tuple(ids.shape[d] if ref.shape[d] > 1 else shape[d] for d in range(len(shape)))

    def tensor_labels(self, arg: Any) -> np.ndarray | None:
        """Labels of a tensor argument; unlabelled tensors get an all -1 array."""
        ids = self.labels_of(arg)
        if ids is not None:
            return ids
        shape = self.orig_shape(arg)
        if shape is None:
            return None
        return np.full((1,) * len(shape), NO_LABEL, dtype=np.int64)

    def param(self, arg: Any) -> str | None:
        if isinstance(arg, fx.Node):
            return self.param_of.get(arg.name)
        return None

    def param_view(self, arg: Any) -> tuple[str, tuple[int, ...]] | None:
        """A parameter, or a transpose/permute of one (decomposed graphs feed `addmm` with
        ``permute(weight)``): its name and which parameter dim each of its dims is."""
        if isinstance(arg, fx.Node):
            return self.param_views.get(arg.name)
        return None

    def _find_param_views(self, gm: fx.GraphModule) -> dict[str, tuple[str, tuple[int, ...]]]:
        views: dict[str, tuple[str, tuple[int, ...]]] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                val = node.meta.get("val")
                rank = val.dim() if isinstance(val, torch.Tensor) else 0
                views[node.name] = (node.target, tuple(range(rank)))
                continue
            if node.op != "call_function" or not node.args:
                continue
            source = views.get(getattr(node.args[0], "name", None))
            name = getattr(node.target, "__name__", "")
            if source is None:
                continue
            param, dims = source
            if name.startswith(("t.", "numpy_T")) and len(dims) == 2:
                views[node.name] = (param, (dims[1], dims[0]))
            elif name.startswith("permute"):
                views[node.name] = (param, tuple(dims[d] for d in node.args[1]))
            elif name.startswith("transpose"):
                a, b = (int(d) % len(dims) for d in node.args[1:3])
                swapped = list(dims)
                swapped[a], swapped[b] = swapped[b], swapped[a]
                views[node.name] = (param, tuple(swapped))
            elif name.startswith(("expand", "view", "reshape", "_unsafe_view", "unsqueeze")):
                # batch dims put in front of a weight matrix (decomposed linear -> bmm)
                out = val_shape(node.meta.get("val"))
                src = val_shape(node.args[0].meta.get("val"))
                if out is None or src is None or len(dims) < 2 or len(out) < 2:
                    continue
                if out[-2:] == src[-2:] and all(d == -1 for d in dims[:-2]):
                    views[node.name] = (param, (-1,) * (len(out) - 2) + tuple(dims[-2:]))
        return views

    def _find_derived_weights(self, gm: fx.GraphModule) -> dict[str, DerivedWeight]:
        """Weights of linear/conv layers computed from one parameter by per-channel ops."""
        found: dict[str, DerivedWeight] = {}
        for node in gm.graph.nodes:
            op = weighted_op(node)
            if op is None or op.name not in LAYER_OPS:
                continue
            if op.name == "convolution" and (len(node.args) < 7 or op.is_transposed(node)):
                continue  # transposed: the output channels are dim 1
            weight = node.args[1] if len(node.args) > 1 else None
            if not isinstance(weight, fx.Node) or weight.op != "call_function":
                continue
            derived = self._trace_weight(weight)
            if derived is not None:
                found[weight.name] = derived
        return found

    def _trace_weight(self, weight: fx.Node) -> DerivedWeight | None:
        shape = val_shape(weight.meta.get("val"))
        todo, seen, params, normalised = [weight], set(), [], False
        while todo:
            node = todo.pop()
            if node.name in seen:
                continue
            seen.add(node.name)
            if node.op == "get_attr":
                params.append(node.target)
                continue
            if node.op != "call_function" or _short_op(node) not in WEIGHT_TRANSFORMS:
                return None
            normalised |= _short_op(node) in NORMALISING
            todo.extend(node.all_input_nodes)
        main = [p for p in params if isinstance(self.param_tensor(p), torch.nn.Parameter)
                and tuple(self.param_tensor(p).shape) == shape]
        if len(main) != 1 or shape is None or len(shape) < 2:
            return None
        return DerivedWeight(main[0], normalised)

    def param_tensor(self, name: str) -> torch.Tensor:
        module_path, _, attr = name.rpartition(".")
        owner = self._owners.get(module_path)
        if owner is None:  # modules stay, their tensors may be replaced: cache the owner only
            owner = self.gm.get_submodule(module_path) if module_path else self.gm
            self._owners[module_path] = owner
        return getattr(owner, attr)

    def kept(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which positions survive the plan (unlabelled ones always do)."""
        ids = np.asarray(ids)
        if not self.apply_pass:
            return np.ones(ids.shape, dtype=bool)
        return surviving(ids, self.roots, self.pruned_root)

    # ------------------------------------------------------------- slots and bindings
    def slots(self, param: str, dim: int, *, member: str | None = None, out_dim: int = 1):
        """Ids of a parameter dimension: all of them, or the surviving ones in the apply pass."""
        key = (param, dim)
        state = self.state
        if key not in state.slots:
            if self.apply_pass:
                raise RewriteError(f"parameter {param} dim {dim} was not seen in the analysis")
            size = self.param_tensor(param).shape[dim]
            state.slots[key] = state.uf.allocate(size)
        if member is not None and key not in state.members and not self.apply_pass:
            state.members[key] = Member(member, param, dim, self.node.name, out_dim)
        ids = state.slots[key]
        if self.apply_pass:
            keep = self.kept(ids)
            self._record_gather(param, dim, np.nonzero(keep)[0])
            return ids[keep]
        return ids

    def bind(self, param: str, dim: int, act_ids: np.ndarray) -> None:
        """Parameter dimension `dim` is indexed by the activation channels `act_ids` (1-D)."""
        act_ids = np.asarray(act_ids, dtype=np.int64).ravel()
        key = (self.node.name, param, dim)
        if not self.apply_pass:
            slots = self.slots(param, dim)
            if len(slots) != len(act_ids):
                self.freeze(act_ids, f"{self.op_name()}: parameter {param} does not match")
                return
            self.state.bindings[key] = Binding(param, dim, act_ids)
            self.state.uf.union_pairs(slots, act_ids)
            return
        binding = self.state.bindings.get(key)
        if binding is None:
            return
        self._record_gather(param, dim, match_positions(binding.reference, act_ids))

    def bind_grouped(self, param: str, act_ids: np.ndarray, groups: int) -> None:
        """Input dim (1) of a grouped convolution weight: each group gathers its own columns."""
        act_ids = np.asarray(act_ids, dtype=np.int64).ravel()
        key = (self.node.name, param, 1)
        if not self.apply_pass:
            self.state.bindings[key] = Binding(param, 1, act_ids.reshape(groups, -1), groups)
            self.record_split(act_ids.reshape(groups, -1), f"grouped conv input {param}")
            return
        binding = self.state.bindings[key]
        rows = act_ids.reshape(groups, -1)
        self.grouped_gathers[param] = [
            match_positions(binding.reference[g], rows[g]) for g in range(groups)
        ]

    def _record_gather(self, param: str, dim: int, index: np.ndarray) -> None:
        key = (param, dim)
        previous = self.gathers.get(key)
        if previous is not None and not np.array_equal(previous, index):
            raise RewriteError(f"parameter {param} dim {dim} is sliced two different ways")
        self.gathers[key] = np.asarray(index, dtype=np.int64)

    # ------------------------------------------------------------------- constraints
    def freeze(self, ids: np.ndarray | None, reason: str) -> None:
        if ids is None or self.apply_pass:
            return
        for i in unique_ints(ids):
            if i >= 0:
                self.state.frozen.setdefault(int(i), reason)

    def inexact(self, ids: np.ndarray | None, reason: str) -> None:
        if ids is None or self.apply_pass:
            return
        for i in unique_ints(ids):
            if i >= 0:
                self.state.inexact.setdefault(int(i), reason)

    def defer_cat_check(self, labels: list[np.ndarray], dim: int, reason: str) -> None:
        """Pieces joined along `dim` must keep their extents along their other dims under
        any plan (checked once groups and blocks are known); otherwise frozen with `reason`."""
        if not self.apply_pass:
            self.state.same_channels.append((reason, dim, [np.array(x) for x in labels]))

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        if not self.apply_pass:
            self.state.uf.union_pairs(a, b)

    def record_split(self, ids_2d: np.ndarray, where: str) -> None:
        if not self.apply_pass and is_labelled(ids_2d):
            self.state.splits.append(Split(np.array(ids_2d, dtype=np.int64), where))

    def align(self, args: list[Any], ndim: int, reason: str) -> np.ndarray:
        """Elementwise ops: positions that meet must share their channel.

        A labelled position that meets unlabelled data which is not broadcast along the
        labelled dimensions (a computed tensor the engine cannot slice) is frozen.
        """
        varying = {
            d + ndim - len(self.orig_shape(a)) for a in args for d in self.label_dims(a)
        }
        operands = [_rank(self._operand_labels(a, ndim, varying), ndim) for a in args]
        for k, a in enumerate(args):
            # one channel broadcast over other channels (a scalar gate times the hidden
            # stream): joining it with every channel would fuse them all into one
            size = (1,) * (ndim - len(self.orig_shape(a))) + self.orig_shape(a)
            if is_labelled(operands[k]) and not self.label_dims(a) and any(
                    size[d] == 1 for d in varying):
                self.freeze(operands[k], f"{self.op_name()}: one channel broadcast over "
                            "other channels")
                operands[k] = np.full(operands[k].shape, NO_LABEL, dtype=np.int64)
        label_sets = [
            frozenset(d + ndim - len(self.orig_shape(a)) for a in [arg] for d in self.label_dims(a))
            for arg in args
        ]
        label_sets = [s for s in label_sets if s]
        if any(not (a <= b or b <= a) for a in label_sets for b in label_sets):
            # channels of one operand meet channels of another along other dimensions
            for o in operands:
                self.freeze(o, f"{self.op_name()}: channels cross other channels")
            return np.full((1,) * ndim, NO_LABEL, dtype=np.int64)
        shapes = [(1,) * (ndim - len(s)) + s for s in (self.orig_shape(a) for a in args)]
        active = [
            o
            for a, o, s in zip(args, operands, shapes)
            if self.label_dims(a) or is_labelled(o) or any(s[d] > 1 for d in varying)
        ]
        if not active:
            return operands[0]
        label_shape = _label_shape(ndim, active)
        full = [np.broadcast_to(o, label_shape) for o in active]
        out = full[0].copy()
        for other in full[1:]:
            both = (out >= 0) & (other >= 0)
            if not self.apply_pass and both.any():
                self.state.uf.union_pairs(out[both], other[both])
            lone = (out >= 0) ^ (other >= 0)
            if lone.any():
                self.freeze(out[lone & (out >= 0)], reason)
                self.freeze(other[lone & (other >= 0)], reason)
            out = np.where(out >= 0, out, other)
        return out

    def _operand_labels(self, arg: Any, ndim: int, varying: set[int]) -> np.ndarray:
        """A parameter met elementwise (position embeddings, layer scales) is sliced along
        the one labelled dimension it meets."""
        ids = self.tensor_labels(arg)
        param = self.param(arg)
        if param is None or is_labelled(ids):
            return ids
        shape = self.orig_shape(arg)
        offset = ndim - len(shape)
        dims = [d for d in range(len(shape)) if shape[d] > 1 and d + offset in varying]
        if len(dims) != 1:
            return ids
        slots = self.slots(param, dims[0])
        out = [1] * len(shape)
        out[dims[0]] = len(slots)
        return slots.reshape(out)

    def op_name(self) -> str:
        target = self.node.target if self.node is not None else "?"
        return getattr(target, "__name__", str(target)) if not isinstance(target, str) else target

    # -------------------------------------------------------------------- rewriting
    def set_arg(self, index: int, value: Any) -> None:
        if self.apply_pass:
            args = list(self.node.args)
            while len(args) <= index:
                args.append(None)
            args[index] = value
            self.node.args = tuple(args)

    def set_kwarg(self, name: str, value: Any) -> None:
        if self.apply_pass:
            kwargs = dict(self.node.kwargs)
            kwargs[name] = value
            self.node.kwargs = kwargs

    def set_target(self, target: Callable, args: tuple, kwargs: dict | None = None) -> None:
        if self.apply_pass:
            self.node.target = target
            self.node.args = args
            self.node.kwargs = kwargs or {}

    # ------------------------------------------------------------------------ walk
    def run(self, rule_for: Callable[[fx.Node], Callable]) -> None:
        """One pass over the graph; `rule_for(node)` is the op rule to run (engine.graph.rules)."""
        for node in list(self.gm.graph.nodes):
            self.node = node
            if node.op == "get_attr":
                self.labels[node.name] = self._param_labels(node)
            elif node.op == "call_function":
                if node.target is operator.getitem:
                    source = self.labels.get(node.args[0].name)
                    picked = source[node.args[1]] if isinstance(source, list) else None
                    self.labels[node.name] = picked
                    continue
                self.labels[node.name] = self._run_rule(node, rule_for(node))
            elif node.op == "output":
                for leaf in _flatten_nodes(node.args):
                    ids = self.labels_of(leaf)
                    if ids is not None:
                        self.freeze(ids, "reaches a model output")
            elif node.op == "call_module":
                for arg in _flatten_nodes((node.args, node.kwargs)):
                    if is_labelled(self.labels_of(arg)) and not node.target.startswith("_guards"):
                        self.freeze(self.labels_of(arg), f"submodule {node.target}")
        if not self.apply_pass:
            self.state.labels = self.labels

    def _run_rule(self, node: fx.Node, rule: Callable) -> Any:
        """A rule that meets arguments it does not expect freezes what the op touches.

        The analysis pass records the failure, so the apply pass skips the rule rather than
        meet the same arguments again; an error there is an engine bug (RewriteError).
        """
        if node.name in self.state.failed:
            return None
        size_before = self.state.uf.size
        members_before = set(self.state.members)
        try:
            return self._conform(node, rule(self, node))
        except RewriteError:
            if self.apply_pass:
                raise
            problem = "the rule gave labels it cannot place"
        except Exception as exc:  # noqa: BLE001 - any rule bug must freeze, never crash
            if self.apply_pass:
                raise RewriteError(f"{self.op_name()} at {node.name}: "
                                   f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc
            problem = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
        self._freeze_failed(node, problem, size_before, members_before)
        return None

    def _freeze_failed(self, node: fx.Node, problem: str, size_before: int,
                       members_before: set) -> None:
        reason = f"{op_key(node)}: unexpected arguments ({problem})"
        self.state.failed[node.name] = reason
        for arg in _flatten_nodes((node.args, node.kwargs)):
            self.freeze(self.labels_of(arg), reason)
            view = self.param_view(arg)
            if view is not None:
                for (param, _dim), ids in self.state.slots.items():
                    if param == view[0]:
                        self.freeze(ids, reason)
        self.freeze(np.arange(size_before, self.state.uf.size), reason)
        for key in set(self.state.members) - members_before:
            self.freeze(self.state.slots[key], reason)
        for key in [k for k in self.state.bindings if k[0] == node.name]:
            self.freeze(self.state.bindings.pop(key).reference, reason)

    def _param_labels(self, node: fx.Node) -> np.ndarray | None:
        """A parameter used as data carries the slots of its one non-trivial dimension."""
        shape = self.orig_shape(node)
        if shape is None:
            return None
        if node.target in self.frequency_tables:
            # rotary frequencies: entry j turns the channel pair (j, j + d/2) of every head it
            # meets; slicing the table with the kept pairs keeps the rotation exact
            ids = self.slots(node.target, 0)
            return ids
        if not isinstance(self.param_tensor(node.target), torch.nn.Parameter):
            return None  # other buffers (position ids, masks) carry no channels
        big = [d for d, s in enumerate(shape) if s > 1]
        if node.target in self.derived_sources:
            big = [0]  # a weight transformed before use: its output channels
        if len(big) != 1:
            return None
        d = big[0]
        ids = self.slots(node.target, d)
        out_shape = [1] * len(shape)
        out_shape[d] = len(ids)
        return ids.reshape(out_shape)

    def _conform(self, node: fx.Node, result: Any) -> Any:
        val = node.meta.get("val")
        if isinstance(result, list):
            vals = list(val) if isinstance(val, (list, tuple)) else [None] * len(result)
            return [self._conform_one(v, r, node, i) for i, (v, r) in enumerate(zip(vals, result))]
        return self._conform_one(val, result, node, None)

    def _conform_one(self, val: Any, ids: Any, node: fx.Node, index: int | None) -> Any:
        if ids is None or not isinstance(val, torch.Tensor):
            return None
        if ids.ndim != val.dim():
            raise RewriteError(f"rule for {node.target} gave labels of the wrong rank")
        if not self.apply_pass:
            if not is_labelled(ids):
                return None
            compressed = compress(ids)
            # a tensor that is one channel throughout keeps its extent: it can vanish whole
            if compressed.size == 1 and ids.size > 1:
                return ids
            return compressed
        ref = self.state.labels.get(node.name)
        if index is not None and isinstance(ref, list):
            ref = ref[index]
        if not isinstance(ref, np.ndarray):
            return None
        index_1 = tuple(slice(0, 1) if ref.shape[d] == 1 else slice(None) for d in range(ids.ndim))
        return ids[index_1]


# ops a rotary frequency table passes through on its way to its cos/sin tables: dtype and
# device moves, products with positions, the (freqs, freqs) concatenation, views
def _rank(ids: np.ndarray, ndim: int) -> np.ndarray:
    if ids.ndim < ndim:
        return ids.reshape((1,) * (ndim - ids.ndim) + ids.shape)
    return ids


def _label_shape(ndim: int, operands: list[np.ndarray]) -> tuple[int, ...]:
    sizes = [1] * ndim
    for o in operands:
        for d in range(ndim):
            sizes[d] = max(sizes[d], o.shape[d])
    return tuple(sizes)


def _flatten_nodes(tree: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    if isinstance(tree, fx.Node):
        out.append(tree)
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            out.extend(_flatten_nodes(item))
    elif isinstance(tree, dict):
        for item in tree.values():
            out.extend(_flatten_nodes(item))
    return out
