"""Data-aware criteria: channel scores measured on calibration data (beyond the spec's list).

Every criterion gives one raw score per filter of every member layer, like the weight
criteria, so policies, layer norms and group policies apply unchanged. "Readers" below are the
convolutions and linear layers that read a group's channels as inputs (the group's weighted
consumers); a channel's column in a reader is the reader's weights that touch that input
channel (for a grouped convolution, within its own group).

- ``activation``: mean |y_c| of the member's output channel over the calibration samples and
  all positions (pixels, tokens).
- ``wanda``: the Wanda score |W_ij| * ||X_j||_2 summed over every weight the channel removes:
  the member's row (its filter, each weight times the L2 norm of the input channel it reads,
  over samples and positions; kernel taps of one input channel share that norm) plus the
  channel's column in every reader (each weight times the L2 norm of the channel itself as
  the reader sees it). An embedding's row reads one-hot tokens: ||X_j|| = sqrt(count of j).
- ``taylor``: first-order Taylor, |W * dL/dW| summed over the same weights (member row plus
  reader columns), with the gradient of the mean loss over the calibration samples. Loss:
  cross-entropy with the labels ``y`` when the calibration data has them; a causal language
  model (integer token ids in, (N, T, vocab) logits out) without labels gets the next-token
  loss on its own input; anything else without labels gets the cross-entropy with the
  model's own top-1 predictions (KL to the unchanged model itself would have a zero
  gradient).
- ``fluctuation`` (FLAP): Var(X_c) * ||W[:, c]||^2 summed over the readers, with the variance
  of the channel's input over samples and positions. Channels no reader reads (query/key
  channels that meet only in attention) are scored by the variance of the member's output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from engine.device import on_device, to_device
from engine.errors import OptionError
from engine.graph.outputs import tensor_leaves
from engine.graph.tracer import AnalysisState, Member, Tracer
from engine.graph.weighted import weighted_op
from engine.io.data import DataSet
from engine.options import CRITERIA_NEEDING_DATA
from engine.scoring.calibration import DEFAULT_SAMPLES, batches, channel_stats

# the criteria this scorer computes: those of the table that need data, but nuclear_norm
DATA_CRITERIA = tuple(c for c in CRITERIA_NEEDING_DATA if c != "nuclear_norm")
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class WeightedOp:
    """A convolution, linear layer or embedding: which weight dims are filters and inputs."""

    node: str
    x: str | None  # the node carrying the input activation (token ids for an embedding)
    x_dim: int  # channel dim of that input
    weight: str  # parameter name
    out_dim: int
    in_dim: int
    groups: int = 1
    embedding: bool = False


def weighted_ops(gm: fx.GraphModule) -> dict[str, WeightedOp]:
    """Node name -> WeightedOp for every op whose weight is a parameter (or a view of one)."""
    views = Tracer(gm, AnalysisState(), whole_blocks=False).param_views
    ops = {}
    for node in gm.graph.nodes:
        op = _weighted_op(node, views)
        if op is not None:
            ops[node.name] = op
    return ops


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _param(arg: Any, views) -> tuple[str, tuple[int, ...]] | None:
    return views.get(arg.name) if isinstance(arg, fx.Node) else None


def _weighted_op(node: fx.Node, views) -> WeightedOp | None:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    name = node.target._opname
    x = node.args[0] if node.args else None
    layer = weighted_op(node)
    kind = layer.kind if layer is not None else name
    if kind == "linear":
        w = _param(node.args[1], views)
        if w is None or w[1] != (0, 1):
            return None
        return _op(node, x, -1, w[0], 0, 1)
    if kind == "addmm":
        w = _param(node.args[2], views)
        if w is None or len(w[1]) != 2 or sorted(w[1]) != [0, 1]:
            return None
        in_dim, out_dim = w[1]
        return _op(node, node.args[1], -1, w[0], out_dim, in_dim)
    if kind == "conv":
        w = _param(node.args[1], views)
        if w is None or w[1] != tuple(range(len(w[1]))):
            return None
        transposed = layer.is_transposed(node)
        if name == "convolution":
            groups = int(node.args[8])
        else:
            groups = int(_arg(node, 6, "groups", 1))
        if transposed and groups != 1:
            return None  # frozen by the engine anyway
        out_dim = 1 if transposed else 0
        return _op(node, x, 1, w[0], out_dim, 1 - out_dim, groups)
    if name == "embedding":
        w = _param(node.args[0], views)
        if w is None or w[1] != (0, 1):
            return None
        return _op(node, node.args[1], 0, w[0], 1, 0, embedding=True)
    return None


def _op(node, x, x_dim, weight, out_dim, in_dim, groups=1, embedding=False) -> WeightedOp:
    return WeightedOp(node.name, x.name if isinstance(x, fx.Node) else None, x_dim, weight,
                      out_dim, in_dim, groups, embedding)


def _param_tensor(gm: fx.GraphModule, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def row_col_sums(
    weight: torch.Tensor,
    op: WeightedOp,
    elementwise: Callable[[torch.Tensor, slice], torch.Tensor],
    input_weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sum ``elementwise(w_rows, rows)`` (a non-negative map of the weight) per filter (row)
    and per input channel (column). With ``input_weight`` each row sum weights the input
    channel it reads by ``input_weight[channel]``. Columns are indexed by input channel
    position, grouped convolutions included; worked through in row chunks."""
    w = torch.movedim(weight.detach(), (op.out_dim, op.in_dim), (0, 1))
    n_out, per_group = int(w.shape[0]), int(w.shape[1])
    w = w.reshape(n_out, per_group, -1)
    out_per_group = n_out // op.groups
    rows = np.zeros(n_out, dtype=np.float64)
    cols = torch.zeros((op.groups, per_group), dtype=torch.float64)
    weights_in = None
    if input_weight is not None:
        weights_in = torch.as_tensor(input_weight, dtype=torch.float64).reshape(op.groups,
                                                                              per_group)
    step = max(1, _CHUNK_ELEMENTS // max(1, per_group * w.shape[2]))
    for start in range(0, n_out, step):
        stop = min(start + step, n_out)
        a = elementwise(w[start:stop], slice(start, stop)).to(torch.float64).sum(-1)
        group = torch.arange(start, stop) // out_per_group
        cols.index_add_(0, group, a)
        weighted = a * weights_in[group] if weights_in is not None else a
        rows[start:stop] = weighted.sum(1).numpy()
    return rows, cols.reshape(-1).numpy()


class DataAwareScorer:
    """Computes one data-aware criterion for every member of an analysed graph."""

    def __init__(self, gm: fx.GraphModule, captured: Any, state: AnalysisState,
                 calibration: DataSet, limit: int = DEFAULT_SAMPLES) -> None:
        self.gm = gm
        self.captured = captured
        self.state = state
        self.calibration = calibration
        self.limit = limit
        self.ops = weighted_ops(gm)
        self.roots = state.uf.roots()
        self.members: list[Member] = list(state.members.values())
        self.member_keys = {(m.param, m.dim) for m in self.members}
        nodes = {n.name: n for n in gm.graph.nodes}
        # (reader op, activation id of each input channel position)
        self.readers: list[tuple[WeightedOp, np.ndarray]] = []
        for (node, param, dim), binding in state.bindings.items():
            op = self.ops.get(node)
            if op is None or op.embedding or op.weight != param or dim != op.in_dim \
                    or (param, dim) in self.member_keys or op.x is None or node not in nodes:
                continue
            self.readers.append((op, np.asarray(binding.reference).ravel()))

    def scores(self, criterion: str) -> dict[tuple[str, int], np.ndarray]:
        if criterion not in DATA_CRITERIA:
            raise OptionError(f"criterion {criterion!r} is not data-aware; allowed: "
                              f"{', '.join(DATA_CRITERIA)}")
        return getattr(self, f"_{criterion}")()

    # ---------------------------------------------------------------- the criteria
    def _activation(self):
        stats, _ = channel_stats(self.gm, self.captured, self.calibration,
                                 {(m.node, m.out_dim) for m in self.members}, limit=self.limit)
        return {(m.param, m.dim): self._fit(stats[(m.node, m.out_dim)].mean_abs, m)
                for m in self.members}

    def _wanda(self):
        producers = {(m.param, m.dim): self.ops.get(m.node) for m in self.members}
        producers = {key: op for key, op in producers.items()
                     if op is not None and (op.weight, op.out_dim) == key and op.x is not None}
        wanted = {(op.x, op.x_dim) for op in producers.values() if not op.embedding}
        wanted |= {(op.x, op.x_dim) for op, _ in self.readers}
        counters = {op.x: _param_tensor(self.gm, op.weight).shape[op.in_dim]
                    for op in producers.values() if op.embedding}
        stats, counts = channel_stats(self.gm, self.captured, self.calibration, wanted,
                                      counters, self.limit)
        per_root = self._reader_sums(lambda w, rows: w.abs(),
                                     lambda op: stats[(op.x, op.x_dim)].l2)
        out = {}
        for m in self.members:
            op = producers.get((m.param, m.dim))
            row = np.zeros(self._size(m))
            if op is not None:
                norms = np.sqrt(counts[op.x]) if op.embedding else stats[(op.x, op.x_dim)].l2
                row = row_col_sums(self._weight(op), op, lambda w, rows: w.abs(), norms)[0]
            out[(m.param, m.dim)] = row + self._from_roots(per_root, m)
        return out

    def _taylor(self):
        grads = self._gradients()
        params = {m.param for m in self.members} | {op.weight for op, _ in self.readers}
        products = {p: (_param_tensor(self.gm, p).detach() * grads[p]).abs() for p in params}

        def taylor_map(op: WeightedOp) -> Callable:
            moved = torch.movedim(products[op.weight], (op.out_dim, op.in_dim), (0, 1))
            moved = moved.reshape(moved.shape[0], moved.shape[1], -1)
            return lambda w, rows: moved[rows]

        per_root = self._reader_sums(None, None, taylor_map)
        out = {}
        for m in self.members:
            prod = torch.movedim(products[m.param], m.dim, 0)
            row = prod.reshape(prod.shape[0], -1).to(torch.float64).sum(1).numpy()
            out[(m.param, m.dim)] = row + self._from_roots(per_root, m)
        return out

    def _fluctuation(self):
        wanted = {(op.x, op.x_dim) for op, _ in self.readers}
        wanted |= {(m.node, m.out_dim) for m in self.members}
        stats, _ = channel_stats(self.gm, self.captured, self.calibration, wanted,
                                 limit=self.limit)
        per_root = self._reader_sums(lambda w, rows: w * w,
                                     lambda op: stats[(op.x, op.x_dim)].variance)
        out = {}
        for m in self.members:
            read = per_root[self.roots[self.state.slots[(m.param, m.dim)]]]
            own = self._fit(stats[(m.node, m.out_dim)].variance, m)
            out[(m.param, m.dim)] = np.where(np.isnan(read), own, read)
        return out

    # ------------------------------------------------------------------- helpers
    def _size(self, m: Member) -> int:
        return int(_param_tensor(self.gm, m.param).shape[m.dim])

    def _weight(self, op: WeightedOp) -> torch.Tensor:
        return _param_tensor(self.gm, op.weight)

    def _fit(self, values: np.ndarray, m: Member) -> np.ndarray:
        if len(values) != self._size(m):
            raise OptionError(
                f"layer {m.layer}: its output has {len(values)} channels along dim "
                f"{m.out_dim}, its weight {self._size(m)} filters; cannot score it on data"
            )
        return np.asarray(values, dtype=np.float64)

    def _reader_sums(self, elementwise, channel_factor, map_for=None) -> np.ndarray:
        """Per root id: the sum over readers of (column sum) * (channel factor); NaN where no
        reader reads the channel."""
        totals = np.zeros(len(self.roots), dtype=np.float64)
        read = np.zeros(len(self.roots), dtype=bool)
        for op, reference in self.readers:
            fn = map_for(op) if map_for is not None else elementwise
            cols = row_col_sums(self._weight(op), op, fn)[1]
            factor = channel_factor(op) if channel_factor is not None else np.ones(len(cols))
            if len(factor) != len(cols) or len(reference) != len(cols):
                continue  # shapes the reader rules did not bind one to one
            valid = reference >= 0
            roots = self.roots[reference[valid]]
            np.add.at(totals, roots, (cols * factor)[valid])
            read[roots] = True
        totals[~read] = np.nan
        return totals

    def _from_roots(self, per_root: np.ndarray, m: Member) -> np.ndarray:
        """The readers' part of each filter's score (0 where no reader reads it)."""
        values = per_root[self.roots[self.state.slots[(m.param, m.dim)]]]
        return np.where(np.isnan(values), 0.0, values)

    def _gradients(self) -> dict[str, torch.Tensor]:
        gm = on_device(self.gm)
        named = dict(gm.named_parameters())
        grads = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in named.items()}
        flags = {name: p.requires_grad for name, p in named.items()}
        total = min(len(self.calibration), self.limit)
        try:
            for p in named.values():
                p.requires_grad_(p.is_floating_point())
            trainable = [(n, p) for n, p in named.items() if p.requires_grad]
            kwargs = to_device(self.captured.example_kwargs or {})
            with torch.enable_grad():
                for inputs, labels in batches(self.captured, self.calibration, self.limit):
                    inputs, labels = to_device(inputs), to_device(labels)
                    outputs = gm(*inputs, **kwargs)
                    loss = _loss(outputs, inputs, labels) / total
                    found = torch.autograd.grad(loss, [p for _, p in trainable],
                                                allow_unused=True)
                    for (n, _), g in zip(trainable, found):
                        if g is not None:
                            grads[n] += g.float()
        finally:
            for name, p in named.items():
                p.requires_grad_(flags[name])
        return {name: g.cpu() for name, g in grads.items()}


def _loss(outputs: Any, inputs: tuple, labels: torch.Tensor | None) -> torch.Tensor:
    """Summed (not averaged) loss of one batch; see the module docstring for the choice."""
    leaves = [o for o in tensor_leaves(outputs) if o.is_floating_point() and o.dim() >= 2]
    if not leaves:
        raise OptionError("criterion taylor needs a model output of shape (N, ..., classes)")
    logits = leaves[0]
    if labels is not None:
        y = labels.to(torch.int64) if not labels.is_floating_point() else None
        if y is None or tuple(y.shape) != tuple(logits.shape[:-1]):
            def shape(dims) -> str:
                return "(" + ", ".join(["N", *(str(int(d)) for d in dims)]) + ")"

            raise OptionError(
                f"criterion taylor: calibration labels y have shape {shape(labels.shape[1:])} "
                f"({labels.dtype}); the model's output {shape(logits.shape[1:])} needs integer "
                f"class indices of shape {shape(logits.shape[1:-1])}"
            )
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                               reduction="sum")
    tokens = inputs[0]
    if (logits.dim() == 3 and not tokens.is_floating_point() and tokens.dim() == 2
            and tuple(tokens.shape) == tuple(logits.shape[:2]) and tokens.shape[1] > 1):
        # causal language model: predict token t+1 from positions <= t; the per-sample sum
        # is normalised to one unit per sequence so the scale matches the classifier case
        per_token = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                    tokens[:, 1:].reshape(-1).to(torch.int64), reduction="sum")
        return per_token / (tokens.shape[1] - 1)
    predicted = logits.detach().argmax(-1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), predicted.reshape(-1),
                           reduction="sum")
