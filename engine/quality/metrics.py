"""Model metrics: parameter count, size in bytes, FLOPs and latency.

Tied weights (one tensor reachable under two names, or two parameters viewing the same
memory) are counted once, so a pruned model and its original are compared fairly.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.errors import PruneScopeError
from engine.graph.capture import has_dynamic_batch
from engine.graph.tracer import known_shape
from engine.graph.weighted import weighted_op

__all__ = ["FlopCount", "count_flops", "count_graph_flops", "count_params", "flops_samples",
           "graph_flops", "measure_latency", "model_metrics", "size_bytes"]


def _tensor_key(t: torch.Tensor) -> tuple:
    """Identity of the memory a tensor covers: equal keys = the same values stored once."""
    if t.device.type == "meta":
        return ("id", id(t))
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return ("id", id(t))
    if ptr == 0:
        # Empty tensors (and some tensor subclasses) have no storage: never merge them.
        return ("id", id(t))
    return (t.device.type, ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[tuple] = set()
    out = []
    for t in tensors:
        key = _tensor_key(t)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _check_module(module: Any) -> torch.nn.Module:
    if not isinstance(module, torch.nn.Module):
        raise PruneScopeError(f"expected a torch.nn.Module, got {type(module).__name__}")
    return module


def count_params(module: torch.nn.Module) -> int:
    """Number of parameter elements, each distinct tensor counted once (tied weights once)."""
    module = _check_module(module)
    params = (t for _, t in module.named_parameters(remove_duplicate=False))
    return sum(t.numel() for t in _unique(params))


def size_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters and buffers (numel x dtype itemsize), shared tensors once."""
    module = _check_module(module)
    tensors = [t for _, t in module.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in module.named_buffers(remove_duplicate=False)]
    return sum(t.numel() * t.element_size() for t in _unique(tensors))


def _call(module: torch.nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, Mapping):
        return module(**example_inputs)
    if isinstance(example_inputs, tuple | list):
        return module(*example_inputs)
    return module(example_inputs)


def count_flops(module: torch.nn.Module, example_inputs: Any) -> int:
    """Total FLOPs of one forward pass (torch's FlopCounterMode: a multiply-add counts 2).

    ``example_inputs``: a tuple/list of positional inputs, a dict of keyword inputs, or one
    tensor. Works on eager modules and on ``ExportedProgram.module()``.
    """
    module = _check_module(module)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        _call(module, example_inputs)
    return int(counter.get_total_flops())


def measure_latency(
    module: torch.nn.Module, example_inputs: Any, warmup: int = 2, runs: int = 10
) -> float:
    """Median wall time in seconds of ``runs`` forward passes after ``warmup`` untimed ones."""
    module = _check_module(module)
    if runs < 1 or warmup < 0:
        raise PruneScopeError(
            f"measure_latency needs runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}"
        )
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            _call(module, example_inputs)
        for _ in range(runs):
            start = time.perf_counter()
            _call(module, example_inputs)
            times.append(time.perf_counter() - start)
    return float(statistics.median(times))


def _shape(node: Any) -> tuple[int, ...]:
    val = node.meta.get("val") if hasattr(node, "meta") else None
    shape = known_shape(val)
    if shape is None and isinstance(val, torch.Tensor):
        raise _DataDependent
    return shape or ()


class _DataDependent(Exception):
    """A size the FLOPs of a node need is only known when the model runs on data."""


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


@dataclass(frozen=True)
class FlopCount:
    """`flops` of one forward pass, and the operations left out of it (`uncounted`, by node
    name): those whose sizes depend on the data (e.g. DeBERTa's relative-position span,
    computed with `.item()`), or that the caller asked to leave out."""

    flops: int
    uncounted: tuple[str, ...] = ()


def count_graph_flops(gm: torch.fx.GraphModule, skip: Collection[str] = ()) -> FlopCount:
    """FLOPs of one forward pass read off the graph's recorded shapes, without running it.

    Counts the operations FlopCounterMode counts (matrix products, convolutions, attention;
    a multiply-add is 2), at a fraction of the cost on large models. The two agree except on
    attention without a mask, which FlopCounterMode counts as 0 on the CPU (its flash kernel
    has no formula there) and this counts like the masked math path. An
    operation with a data-dependent size, or named in `skip` (to compare a pruned graph with
    its original on the same operations), is left out and named in `uncounted`.
    """
    total = 0
    uncounted = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not hasattr(node.target, "_opname"):
            continue
        try:
            flops = _node_flops(node)
        except _DataDependent:
            uncounted.append(node.name)
            continue
        if flops and node.name in skip:
            uncounted.append(node.name)
        else:
            total += flops
    return FlopCount(int(total), tuple(uncounted))


def _node_flops(node: torch.fx.Node) -> int:
    name = node.target._opname
    args = node.args
    layer = weighted_op(node)
    kind = layer.kind if layer is not None else name
    if kind == "linear":
        return 2 * _numel(_shape(node)) * _shape(args[1])[1]
    if kind in ("addmm", "mm", "bmm", "baddbmm", "matmul"):
        a = _shape(args[1] if kind in ("addmm", "baddbmm") else args[0])
        return 2 * _numel(_shape(node)) * (a[-1] if a else 1)
    if kind == "conv":
        weight = _shape(args[1])
        source = _shape(args[0]) if layer.is_transposed(node) else _shape(node)
        return 2 * _numel(source) * _numel(weight[1:])
    if name == "scaled_dot_product_attention":
        q, k, v = (_shape(a) for a in args[:3])
        return 2 * _numel(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])
    return 0


def graph_flops(gm: torch.fx.GraphModule, skip: Collection[str] = ()) -> int:
    """`count_graph_flops(gm, skip).flops`: the operations that could be counted."""
    return count_graph_flops(gm, skip).flops


def flops_samples(captured: Any) -> int:
    """How many samples one counted forward pass of `captured` holds, to report FLOPs per
    sample where the batch is dynamic (the unit a model's FLOPs are quoted in; the example
    batch then has at least two samples, torch.export's price for a symbolic batch). A fixed
    batch counts the example as given: 1."""
    inputs = captured.example_inputs
    if not inputs or not isinstance(inputs[0], torch.Tensor) or not inputs[0].dim():
        return 1
    return int(inputs[0].shape[0]) if has_dynamic_batch(captured.program) else 1


def model_metrics(module: torch.fx.GraphModule, samples: int = 1,
                  skip: Collection[str] = ()) -> dict[str, Any]:
    """The "before"/"after" entry of a report: parameters, FLOPs (per sample of a dynamic
    batch: `samples` from `flops_samples`), bytes; and "flops_uncounted", the operations the
    FLOPs leave out (data-dependent sizes, or `skip`: give a pruned graph its original's
    "flops_uncounted" so both count the same operations), only when there are some."""
    count = count_graph_flops(module, skip)
    metrics: dict[str, Any] = {
        "params": count_params(module),
        "flops": round(count.flops / samples),
        "size_bytes": size_bytes(module),
    }
    if count.uncounted:
        metrics["flops_uncounted"] = list(count.uncounted)
    return metrics
