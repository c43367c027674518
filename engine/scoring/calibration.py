"""Calibration data for the data-aware criteria, run through the captured graph in batches.

The data is anything ``engine.io.data.as_data`` takes: a path to a calibration ``.npz`` or a
built-in model's name (``"demo"``: its calibration set), an array, a mapping with ``x`` (or
``x0``, ``x1``, ... for several inputs) and optional labels ``y`` (so ``np.load("calib.npz")``
works as it is), or an object with ``x``/``inputs`` and ``y``/``labels``. Only the first
``limit`` samples are used (256 by default): per-channel statistics settle long before that,
and the cost stays bounded on large calibration sets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from engine.device import calibration_autocast, on_device, to_device
from engine.errors import OptionError
from engine.graph.inputs import run_graph, sample_chunks
from engine.io.data import DataSet, as_data

DEFAULT_SAMPLES = 256
DYNAMIC_BATCH = 32


def as_calibration(data: Any, model: Any = None) -> DataSet:
    """The calibration data in any accepted form, checked (see the module docstring); text
    and images are made into the inputs of ``model`` (the captured model)."""
    return as_data(data, flag="calibration", kind="calibration", model=model)


def _dynamic_batch(program: torch.export.ExportedProgram) -> bool:
    for node in program.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() and isinstance(val.shape[0],
                                                                          torch.SymInt):
                return True
    return False


def batches(
    captured: Any, calibration: DataSet, limit: int = DEFAULT_SAMPLES
) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor | None]]:
    """(model inputs, labels) batches of the first ``limit`` samples, checked against the
    model's example inputs. A model captured with a fixed batch size gets exactly that size
    (a short last batch is dropped)."""
    examples = captured.example_inputs
    if len(calibration.inputs) != len(examples):
        raise OptionError(
            f"calibration data has {len(calibration.inputs)} input array(s), but the model "
            f"takes {len(examples)} input(s) (give x0, x1, ... in the .npz)"
        )
    tensors = []
    for k, (a, example) in enumerate(zip(calibration.inputs, examples)):
        name = "x" if len(examples) == 1 else f"x{k}"
        if a.ndim != example.dim() or tuple(a.shape[1:]) != tuple(example.shape[1:]):
            raise OptionError(
                f"calibration inputs {name} have shape {tuple(a.shape)}, but the model takes "
                f"inputs of shape (N, {', '.join(str(s) for s in example.shape[1:])})"
            )
        t = torch.as_tensor(a[:limit])
        if t.dtype != example.dtype:
            if example.dtype.is_floating_point != t.dtype.is_floating_point and \
                    not example.dtype.is_floating_point:
                raise OptionError(
                    f"calibration inputs {name} are {t.dtype}, but the model takes {example.dtype}"
                )
            t = t.to(example.dtype)
        tensors.append(t)
    labels = None if calibration.labels is None else torch.as_tensor(calibration.labels[:limit])
    dynamic = _dynamic_batch(captured.program)
    size = DYNAMIC_BATCH if dynamic else int(examples[0].shape[0])
    n = tensors[0].shape[0]
    if not dynamic and n < size:
        raise OptionError(
            f"the model was captured with batch size {size}; give at least {size} calibration "
            f"samples (got {n})"
        )
    for start, (chunk, _real) in zip(range(0, n, size),
                                     sample_chunks(tensors, size, fixed=not dynamic)):
        yield tuple(chunk), None if labels is None else labels[start : start + size]


@dataclass
class ChannelStats:
    """Streaming per-channel statistics of one tensor along one dimension (float64)."""

    count: float = 0.0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None  # sum of squared deviations (Chan et al. combination)
    abs_sum: torch.Tensor | None = None
    sq_sum: torch.Tensor | None = None

    def add(self, value: torch.Tensor, dim: int) -> None:
        v = torch.movedim(value.detach(), dim % value.dim(), -1)
        if v.device.type == "mps":  # no float64 kernels there
            v = v.cpu()
        v = v.reshape(-1, v.shape[-1]).to(torch.float64)
        n = float(v.shape[0])
        if n == 0:
            return
        mean = v.mean(0)
        m2 = ((v - mean) ** 2).sum(0)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            self.abs_sum, self.sq_sum = v.abs().sum(0), (v * v).sum(0)
            return
        total = self.count + n
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + delta * delta * (self.count * n / total)
        self.mean = self.mean + delta * (n / total)
        self.count = total
        self.abs_sum += v.abs().sum(0)
        self.sq_sum += (v * v).sum(0)

    @property
    def mean_abs(self) -> np.ndarray:
        return (self.abs_sum / self.count).cpu().numpy()

    @property
    def l2(self) -> np.ndarray:
        return self.sq_sum.sqrt().cpu().numpy()

    @property
    def variance(self) -> np.ndarray:
        return (self.m2 / self.count).cpu().numpy()  # population variance over samples x positions


def channel_stats(
    gm: fx.GraphModule,
    captured: Any,
    calibration: DataSet,
    wanted: set[tuple[str, int]],
    counters: Mapping[str, int] | None = None,
    limit: int = DEFAULT_SAMPLES,
) -> tuple[dict[tuple[str, int], ChannelStats], dict[str, np.ndarray]]:
    """Run the graph on the calibration batches; collect ``ChannelStats`` of every (node,
    channel dim) in ``wanted`` and, for ``counters`` (node -> vocabulary size), how often each
    integer value occurs (token ids read by an embedding)."""
    stats = {key: ChannelStats() for key in wanted}
    by_node: dict[str, list[int]] = {}
    for node, dim in wanted:
        by_node.setdefault(node, []).append(dim)
    counts = {node: np.zeros(size, dtype=np.float64) for node, size in (counters or {}).items()}
    record = _recorder(stats, by_node, counts)

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            record(n.name, result)
            return result

    recorder = Recorder(on_device(gm))
    ran = False
    kwargs = to_device(captured.example_kwargs or {})
    with torch.inference_mode(), calibration_autocast():
        for inputs, _ in batches(captured, calibration, limit):
            run_graph(recorder, to_device(inputs), kwargs)
            ran = True
    if not ran:
        raise OptionError("the calibration data produced no batches")
    return stats, counts


def _recorder(stats, by_node, counts) -> Callable[[str, Any], None]:
    def record(name: str, result: Any) -> None:
        if not isinstance(result, torch.Tensor):
            return
        for dim in by_node.get(name, ()):
            if not result.is_floating_point():
                raise OptionError(f"node {name} carries no floating-point activations")
            stats[(name, dim)].add(result, dim)
        if name in counts:
            ids = result.reshape(-1).to(torch.int64).cpu().numpy()
            size = len(counts[name])
            counts[name] += np.bincount(ids[(ids >= 0) & (ids < size)], minlength=size)

    return record
