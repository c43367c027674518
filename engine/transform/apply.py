"""Applying a plan: slice the weights, rewrite shape constants, re-export a smaller program."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from engine.errors import PruneScopeError
from engine.graph.capture import copy_module
from engine.graph.dependency import Structure
from engine.graph.inputs import graph_runner
from engine.graph.labels import surviving
from engine.graph.rules import rule_for
from engine.graph.tracer import RewriteError, Tracer
from engine.scoring.planning import Plan


def pruned_roots(structure: Structure, plan: Plan) -> np.ndarray:
    """Boolean over union-find roots: True where the component is removed."""
    mask = np.zeros(len(structure.state.uf), dtype=bool)
    for gp in plan.groups:
        if len(gp.pruned):
            mask[structure.group(gp.name).roots[gp.pruned]] = True
    return mask


@dataclass(frozen=True)
class ParamSlice:
    """How one weight is cut: the kept indices of each sliced dim, in order, then (grouped
    convolutions) the kept input columns of each group."""

    gathers: tuple[tuple[int, np.ndarray], ...]
    grouped: tuple[np.ndarray, ...] | None = None

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The sliced shape of a weight of `shape`."""
        out = list(shape)
        for dim, index in self.gathers:
            out[dim] = len(index)
        if self.grouped is not None and len(out) > 1:
            out[1] = len(self.grouped[0])
        return tuple(out)


def slice_tensor(data: torch.Tensor, how: ParamSlice) -> torch.Tensor:
    """`data` cut as `how` says (a new tensor, or `data` itself where nothing is cut)."""
    cuts = [(dim % data.dim(), np.asarray(index, dtype=np.int64)) for dim, index in how.gathers
            if not (len(index) == data.shape[dim] and
                    np.array_equal(index, np.arange(data.shape[dim])))]
    # whole rows (dim 0) first: the cheapest cut (contiguous copies), and it shrinks what the
    # others go through; a stable sort keeps two cuts of one dim in their order
    cuts.sort(key=lambda cut: cut[0])
    if ([dim for dim, _ in cuts] == [0, 1] and data.dim() == 2 and data.device.type == "cpu"
            and _BITS_AS.get(data.dtype) is not None and not data.requires_grad
            and all(_in_range(index, data.shape[dim]) for dim, index in cuts)):
        data = _take_rows_and_columns(data, cuts[0][1], cuts[1][1])
    else:
        for dim, index in cuts:
            data = take(data, dim, index)
    if how.grouped is not None:
        data = _gather_grouped(data, list(how.grouped))
    return data


def rewrite(gm: fx.GraphModule, structure: Structure, removed: np.ndarray,
            release: Callable[[torch.Tensor], None] | None = None,
            slices: dict[str, ParamSlice] | None = None) -> fx.GraphModule:
    """A copy of `gm` without the removed channels: sliced parameters, new shape constants.

    `slices`, when given, receives how each sliced weight (by its name in `gm`) was cut: a
    streamed prune rewrites a graph whose weights are on the meta device and cuts the stored
    weights the same way (engine/stream.py).

    With `release`, the original is being given up (a model loaded from a file): each
    original tensor is handed to `release` (which drops the caller's references) as soon as
    its slice exists, and untouched tensors are shared instead of cloned, so the original and
    the pruned weights are never all in memory together.
    """
    # copy the modules and the graph, not the weights: the sliced ones are replaced below and
    # the untouched ones cloned at the end, so peak memory stays near one model
    memo = {id(t): t for t in list(gm.parameters()) + list(gm.buffers())}
    new = copy_module(gm, memo)
    del memo  # it holds every original tensor
    tracer = Tracer(new, structure.state, whole_blocks=structure.whole_blocks, pruned=removed)
    try:
        tracer.run(rule_for)
        _slice_params(new, tracer, release, slices)
    except Exception as exc:  # noqa: BLE001 - an engine bug reaches the user as one line
        raise PruneScopeError(
            f"removing the planned channels failed: {type(exc).__name__}: {exc}".splitlines()[0]
        ) from exc
    if release is None:
        unshare(new, gm)
    _resize_param_views(new, tracer)
    _explicit_copies(new)
    new.recompile()
    return new


def _slice_params(new: fx.GraphModule, tracer: Tracer,
                  release: Callable[[torch.Tensor], None] | None,
                  slices: dict[str, ParamSlice] | None = None) -> None:
    by_param: dict[str, list[tuple[int, np.ndarray]]] = {name: [] for name in
                                                          tracer.grouped_gathers}
    for (param, dim), index in sorted(tracer.gathers.items()):
        by_param.setdefault(param, []).append((dim, index))
    places = tensor_places(new)
    for name, gathers in by_param.items():
        grouped = tracer.grouped_gathers.get(name)
        how = ParamSlice(tuple(gathers), tuple(grouped) if grouped is not None else None)
        if slices is not None:
            slices[name] = how
        tensor = tracer.param_tensor(name)
        data = slice_tensor(tensor.detach(), how)
        _set_tensor(new, name, tensor, data.contiguous(), places)
        if release is not None:
            release(tensor)
        del tensor, data


# numpy's take copies rows of a half-precision weight three to four times faster than
# torch's index_select along any dimension but the first (measured on a 8192 x 3072 bf16
# matrix; the slicing of a 3B model's weights took 32 of its 217 s); it sees the weight
# through an integer view of the same element size, so every bit is copied as it is. The
# result goes into a tensor torch allocates: numpy's own big arrays ask the kernel for huge
# pages, and compacting memory for them tripled the slicing time of a 0.85 B model.
# float32 and float64 stay with index_select: it is 1.5 to 2 times faster than numpy there
# (768 x 3072 and 3072 x 768 float32 matrices, either dimension; BERT-base's slicing).
_BITS_AS = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


# A big cut is shared among a few threads (numpy's take releases the GIL), each copying its
# own range of the result's rows; below this many bytes one thread does it all.
_PARALLEL_BYTES = 8 << 20
_CUT_THREADS = max(1, min(4, os.cpu_count() or 1))
# A cut of rows and columns goes through the kept rows this many bytes at a time: gathered
# into a small buffer that stays in the CPU cache, then their kept columns into the result,
# instead of through a full-size intermediate in fresh memory (its page faults cost as much
# as the copy itself: 11008 x 4096 bf16 cut to 70% both ways, 72 ms against 29 ms).
_CHUNK_BYTES = 1 << 20
_cut_pool: ThreadPoolExecutor | None = None
_cut_pool_lock = threading.Lock()


def take(data: torch.Tensor, dim: int, index: np.ndarray) -> torch.Tensor:
    """``data.index_select(dim, index)`` (a new contiguous tensor)."""
    bits = _BITS_AS.get(data.dtype)
    index = np.asarray(index, dtype=np.int64)
    dim %= max(1, data.dim())
    if bits is None or data.device.type != "cpu" or data.requires_grad or not _in_range(
            index, data.shape[dim]):
        return data.index_select(dim, torch.as_tensor(index, dtype=torch.long))
    shape = list(data.shape)
    shape[dim] = len(index)
    out = torch.empty(shape, dtype=data.dtype)
    source, target = data.view(bits).numpy(), out.view(bits).numpy()

    # mode="clip" writes straight into `target` (the indices were checked above)
    def rows(start: int, stop: int) -> None:
        if dim == 0:
            np.take(source, index[start:stop], axis=0, out=target[start:stop], mode="clip")
        else:
            np.take(source[start:stop], index, axis=dim, out=target[start:stop], mode="clip")

    _in_parts(rows, target.shape[0] if target.ndim else 0, target.nbytes)
    return out


def _in_range(index: np.ndarray, size: int) -> bool:
    return not len(index) or 0 <= int(index.min()) <= int(index.max()) < size


def _take_rows_and_columns(data: torch.Tensor, rows: np.ndarray,
                           columns: np.ndarray) -> torch.Tensor:
    """``data[rows][:, columns]`` of a 2-D half-precision CPU tensor, bit for bit."""
    bits = _BITS_AS[data.dtype]
    out = torch.empty((len(rows), len(columns)), dtype=data.dtype)
    source, target = data.view(bits).numpy(), out.view(bits).numpy()
    step = max(1, _CHUNK_BYTES // max(1, source.shape[1] * source.itemsize))

    def part(start: int, stop: int) -> None:
        buffer = np.empty((min(step, stop - start), source.shape[1]), dtype=source.dtype)
        for first in range(start, stop, step):
            last = min(first + step, stop)
            chunk = buffer[: last - first]
            np.take(source, rows[first:last], axis=0, out=chunk, mode="clip")
            np.take(chunk, columns, axis=1, out=target[first:last], mode="clip")

    _in_parts(part, len(rows), target.nbytes)
    return out


def _in_parts(work: Callable[[int, int], None], count: int, nbytes: int) -> None:
    """`work(start, stop)` over ``range(count)``: in one call where small, else in one range
    per cut thread, run side by side."""
    parts = _CUT_THREADS if nbytes >= _PARALLEL_BYTES else 1
    parts = min(parts, count)
    if parts <= 1:
        work(0, count)
        return
    bounds = np.linspace(0, count, parts + 1).astype(int)
    futures = [_pool().submit(work, int(a), int(b)) for a, b in zip(bounds, bounds[1:])]
    for future in futures:
        future.result()


def _pool() -> ThreadPoolExecutor:
    global _cut_pool
    with _cut_pool_lock:
        if _cut_pool is None:
            _cut_pool = ThreadPoolExecutor(_CUT_THREADS, thread_name_prefix="prunescope-cut")
        return _cut_pool


def _resize_param_views(gm: fx.GraphModule, tracer: Tracer) -> None:
    """Shape constants of views of a weight (``expand(permute(w), [b, in, out])``) follow
    the weight's new shape."""
    for node in gm.graph.nodes:
        view = tracer.param_views.get(node.name)
        name = getattr(node.target, "__name__", "")
        if view is None or node.op != "call_function" or not name.startswith(
            ("expand", "view", "reshape", "_unsafe_view")
        ):
            continue
        param, dims = view
        shape = tracer.param_tensor(param).shape
        sizes = list(node.args[1])
        for k in (-2, -1):
            if isinstance(sizes[k], int) and sizes[k] != -1:
                sizes[k] = int(shape[dims[k]])
        node.args = (node.args[0], sizes, *node.args[2:])


_STRIDE_OPS = ("transpose", "permute", "t", "swapaxes", "movedim")


def _explicit_copies(gm: fx.GraphModule) -> None:
    """``contiguous()`` after a transpose becomes a real copy.

    Attention kernels return (batch, tokens, heads, head_dim) storage on CPU, so in
    ``sdpa(...).transpose(1, 2).contiguous().reshape(...)`` the ``contiguous`` is a no-op at
    capture and the reshape a view. The ONNX exporter drops the no-op, then decomposes
    attention into plain products whose output is laid out the other way, and the view
    fails (Swin: "Cannot view a tensor with shape ..."). A clone is never dropped.
    """
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.contiguous.default:
            continue
        source = node.args[0]
        if getattr(getattr(source, "target", None), "_opname", None) in _STRIDE_OPS:
            node.target = torch.ops.aten.clone.default
            node.kwargs = {"memory_format": torch.contiguous_format}


def unshare(new: fx.GraphModule, old: fx.GraphModule) -> None:
    """Clone the tensors the pruned model still shares with the original."""
    originals = {id(t) for t in list(old.parameters()) + list(old.buffers())}
    clones: dict[int, torch.Tensor] = {}
    for module in new.modules():
        for store in (module._parameters, module._buffers):
            for key, value in store.items():
                if value is not None and id(value) in originals:
                    if id(value) not in clones:
                        data = value.detach().clone()
                        clones[id(value)] = (
                            torch.nn.Parameter(data, requires_grad=value.requires_grad)
                            if isinstance(value, torch.nn.Parameter) else data
                        )
                    store[key] = clones[id(value)]


def _gather_grouped(weight: torch.Tensor, columns: list[np.ndarray]) -> torch.Tensor:
    groups = len(columns)
    rows = weight.shape[0] // groups
    parts = []
    for g, cols in enumerate(columns):
        block = weight[g * rows : (g + 1) * rows]
        parts.append(block.index_select(1, torch.as_tensor(cols, dtype=torch.long)))
    widths = {p.shape[1] for p in parts}
    if len(widths) != 1:
        raise RewriteError("grouped convolution groups would keep different channel counts")
    return torch.cat(parts, dim=0)


def tensor_places(gm: fx.GraphModule) -> dict[int, set[tuple[str, str]]]:
    """Every (module path, attribute) holding each parameter or buffer, by tensor id: one walk
    over the modules instead of one per replaced tensor."""
    places: dict[int, set[tuple[str, str]]] = {}
    for module_name, module in gm.named_modules(remove_duplicate=False):
        for store in (module._parameters, module._buffers):
            for attr_name, value in store.items():
                if value is not None:
                    places.setdefault(id(value), set()).add((module_name, attr_name))
    return places


def _set_tensor(gm: fx.GraphModule, name: str, old: torch.Tensor, data: torch.Tensor,
                places: dict[int, set[tuple[str, str]]]) -> None:
    """Replace a tensor everywhere it is registered (tied weights have several names)."""
    if data.data_ptr() == old.data_ptr():
        data = data.clone()
    if isinstance(old, torch.nn.Parameter):
        new: torch.Tensor = torch.nn.Parameter(data, requires_grad=old.requires_grad)
    else:
        new = data
    owner_path, _, attr = name.rpartition(".")
    where = places.pop(id(old), set()) | {(owner_path, attr)}
    places[id(new)] = where
    for module_name, attr_name in where:
        owner = gm.get_submodule(module_name) if module_name else gm
        if attr_name in owner._parameters:
            owner._parameters[attr_name] = new
        elif attr_name in owner._buffers:
            owner._buffers[attr_name] = new
        else:
            setattr(owner, attr_name, new)


class MaskedInterpreter(fx.Interpreter):
    """Runs the original graph with every removed channel zeroed after each op (mask mode)."""

    def __init__(self, gm: fx.GraphModule, structure: Structure, removed: np.ndarray,
                 record_shapes: bool = False) -> None:
        super().__init__(gm)
        roots = structure.state.uf.roots()
        self.masks: dict[str, object] = {}
        weights_only = _weights_only(gm)
        for name, ids in structure.state.labels.items():
            if name not in weights_only:
                self.masks[name] = keep_mask(ids, roots, removed)
        # with record_shapes: each node's output shape in this run (see `output_shapes`)
        self.shapes: dict[str, tuple | list[tuple]] | None = {} if record_shapes else None

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if self.shapes is not None:
            shape = output_shapes(result)
            if shape is not None:
                self.shapes[n.name] = shape
        mask = self.masks.get(n.name)
        if mask is None:
            return result
        if isinstance(mask, list):
            return type(result)(
                _apply_mask(r, m) for r, m in zip(result, mask)
            ) if isinstance(result, (list, tuple)) else result
        return _apply_mask(result, mask)


def output_shapes(value: object) -> tuple[int, ...] | list[tuple[int, ...]] | None:
    """A node's output shape: one tuple for a tensor, a list for a list/tuple of tensors,
    None for anything else."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, torch.Tensor) for v in value):
        return [tuple(v.shape) for v in value]
    return None


def _weights_only(gm: fx.GraphModule) -> set[str]:
    """Nodes computed from parameters alone (a weight standardised or normalised before
    use). They are not activations: zeroing them would divide zero by zero in a norm, and
    the layer they feed is masked anyway."""
    out: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (node.op == "call_function" and node.all_input_nodes and
                                     all(a.name in out for a in node.all_input_nodes)):
            out.add(node.name)
    return out


def keep_mask(ids, roots, removed):
    """1 where a channel stays, 0 where it goes, shaped like `ids` (None: nothing goes)."""
    if isinstance(ids, list):
        masks = [keep_mask(i, roots, removed) for i in ids]
        return masks if any(m is not None for m in masks) else None
    if not isinstance(ids, np.ndarray):
        return None
    keep = surviving(ids, roots, removed)
    if keep.all():
        return None
    return torch.from_numpy(keep.astype(np.float32))


def _apply_mask(value, mask):
    if mask is None or not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return value
    if mask.device != value.device:
        mask = mask.to(device=value.device)
    # set to zero, not multiplied by it: a removed channel may hold an infinity (a statistic
    # over tokens, zeroed, then rsqrt or divided by), and 0 * inf = NaN would reach the kept
    # channels through the next op, where the pruned model has no such channel
    return value.masked_fill(mask == 0, 0)


def masked_module(gm: fx.GraphModule, structure: Structure, removed: np.ndarray):
    """A callable computing the original model with the removed channels zeroed."""
    return graph_runner(MaskedInterpreter(gm, structure, removed))
