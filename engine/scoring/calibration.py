"""Calibration data for the data-aware criteria: what the user gives, normalised, fingerprinted
and run through the captured graph in batches.

Accepted forms (the same layout as a calibration ``.npz``): a path to one, or a built-in
model's name (``"demo"``: its calibration set); an array (the inputs ``x``); a
mapping with ``x`` (or ``x0``, ``x1``, ... for several inputs) and optional labels ``y`` (so
``np.load("calib.npz")`` works as it is), or an object with attributes ``x``/``inputs`` and
``y``/``labels``. Only the first ``limit`` samples are used (256 by default): per-channel
statistics settle long before that, and the cost stays bounded on large calibration sets.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from engine.errors import OptionError

DEFAULT_SAMPLES = 256
DYNAMIC_BATCH = 32


@dataclass(frozen=True)
class CalibrationSet:
    inputs: tuple[np.ndarray, ...]  # one array per model input, samples along dim 0
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0])

    def fingerprint(self, limit: int = DEFAULT_SAMPLES) -> str:
        """A digest of the samples that are actually used: equal data hits the score cache
        even when it arrives as a new object (a reloaded file, a copied array)."""
        digest = hashlib.blake2b(digest_size=16)
        arrays = list(self.inputs) + ([self.labels] if self.labels is not None else [None])
        for a in arrays:
            if a is None:
                digest.update(b"no-labels")
                continue
            used = np.ascontiguousarray(a[:limit])
            digest.update(f"{a.dtype.str}{a.shape}".encode())
            digest.update(used.tobytes())
        return digest.hexdigest()


def as_calibration(data: Any) -> CalibrationSet:
    """Normalise the accepted calibration forms (see the module docstring)."""
    if isinstance(data, CalibrationSet):
        return data
    labels = None
    if isinstance(data, (str, os.PathLike)):  # a file or a built-in model's name ("demo")
        from engine.quality.recovery.data import load

        inputs, labels = load(data)
        data = {**{f"x{k}": a for k, a in enumerate(inputs)},
                **({"y": labels} if labels is not None else {})}
    if isinstance(data, (np.ndarray, torch.Tensor)):
        inputs = [data]
    elif isinstance(data, Mapping) or hasattr(data, "files"):  # dict or np.load's NpzFile
        keys = list(data.files if hasattr(data, "files") else data.keys())
        if "x" in keys:
            inputs = [data["x"]]
        else:
            numbered = sorted((k for k in keys if k[1:].isdigit() and k[0] == "x"),
                              key=lambda k: int(k[1:]))
            inputs = [data[k] for k in numbered]
        labels = data["y"] if "y" in keys else None
    elif hasattr(data, "x") or hasattr(data, "inputs"):
        found = getattr(data, "inputs", None)
        inputs = list(found) if isinstance(found, (list, tuple)) else [data.x]
        labels = getattr(data, "y", None) if hasattr(data, "y") else getattr(data, "labels",
                                                                              None)
    else:
        raise OptionError(
            f"calibration data must be an array or an .npz-like mapping with x (or x0, x1, ...) "
            f"and optional y, not {type(data).__name__}"
        )
    if not inputs:
        raise OptionError("calibration data has no inputs: give an array x (or x0, x1, ...)")
    arrays = tuple(_array(a) for a in inputs)
    n = arrays[0].shape[0] if arrays[0].ndim else 0
    if arrays[0].ndim and n == 0:
        raise OptionError(
            f"calibration data has no samples (x has shape {arrays[0].shape}): it gives no "
            "feature maps to score"
        )
    if any(a.ndim == 0 or a.shape[0] != n for a in arrays):
        raise OptionError(
            "calibration inputs must be arrays with the same number of samples (>= 1) along "
            f"dim 0; got shapes {', '.join(str(a.shape) for a in arrays)}"
        )
    if labels is not None:
        labels = _array(labels)
        if labels.ndim == 0 or labels.shape[0] != n:
            raise OptionError(
                f"calibration labels y have shape {labels.shape}, but there are {n} samples"
            )
    return CalibrationSet(arrays, labels)


def _array(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _dynamic_batch(program: torch.export.ExportedProgram) -> bool:
    for node in program.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() and isinstance(val.shape[0],
                                                                          torch.SymInt):
                return True
    return False


def batches(
    captured: Any, calibration: CalibrationSet, limit: int = DEFAULT_SAMPLES
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
    for start in range(0, n, size):
        chunk = tuple(t[start : start + size] for t in tensors)
        if chunk[0].shape[0] != size and not dynamic:
            break
        yield chunk, None if labels is None else labels[start : start + size]


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
        return (self.abs_sum / self.count).numpy()

    @property
    def l2(self) -> np.ndarray:
        return self.sq_sum.sqrt().numpy()

    @property
    def variance(self) -> np.ndarray:
        return (self.m2 / self.count).numpy()  # population variance over samples x positions


def channel_stats(
    gm: fx.GraphModule,
    captured: Any,
    calibration: CalibrationSet,
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

    recorder = Recorder(gm)
    ran = False
    with torch.inference_mode():
        for inputs, _ in batches(captured, calibration, limit):
            recorder.run(*inputs, **(captured.example_kwargs or {}))
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
            ids = result.reshape(-1).to(torch.int64).numpy()
            size = len(counts[name])
            counts[name] += np.bincount(ids[(ids >= 0) & (ids < size)], minlength=size)

    return record
