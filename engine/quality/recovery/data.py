"""Calibration data for recovery: checked against the model, split, scored (engine.io.data
loads it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from engine.errors import OptionError
from engine.io.data import DataSet

CHUNK = 256  # samples per forward pass when only outputs are needed


@dataclass
class CalibrationSet:
    xs: list[torch.Tensor]  # one tensor per model input, samples along dim 0
    y: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.xs[0].shape[0])

    def take(self, index: torch.Tensor) -> CalibrationSet:
        return CalibrationSet([x[index] for x in self.xs],
                              None if self.y is None else self.y[index])

    def chunks(self, size: int = CHUNK):
        for start in range(0, len(self), size):
            yield [x[start:start + size] for x in self.xs]


def expected_shapes(program: torch.export.ExportedProgram) -> list[tuple[int | None, ...]]:
    """Each user input's shape, None where the dimension is dynamic."""
    from torch.export.graph_signature import InputKind

    names = [s.arg.name for s in program.graph_signature.input_specs
             if s.kind == InputKind.USER_INPUT]
    vals = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    shapes = []
    for name in names:
        val = vals.get(name)
        if isinstance(val, torch.Tensor):
            shapes.append(tuple(s if isinstance(s, int) else None for s in val.shape))
    return shapes


def check(data: DataSet, shapes, example_inputs: tuple) -> CalibrationSet:
    """Tensors shaped and typed like the model's inputs, or a one-line error (the loader has
    checked the sample counts and the labels)."""
    where = data.where
    if len(data.inputs) != len(shapes):
        raise OptionError(f"{where} gives {len(data.inputs)} input array(s); the model takes "
                          f"{len(shapes)} (x, or x0, x1, ... in order)")
    tensors = []
    for k, (x, shape, example) in enumerate(zip(data.inputs, shapes, example_inputs)):
        if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
            want = ", ".join("N" if s is None else str(s) for s in shape)
            name = "x" if len(data.inputs) == 1 else f"x{k}"
            raise OptionError(f"{where}: {name} has shape {tuple(x.shape)}; the model takes "
                              f"({want}) (N: any number of samples)")
        if (x.dtype.kind == "f") != example.is_floating_point():
            raise OptionError(f"{where}: input {k} has dtype {x.dtype}; the model takes "
                              f"{str(example.dtype).removeprefix('torch.')}")
        tensors.append(torch.from_numpy(np.ascontiguousarray(x)).to(example.dtype))
    labels = None
    if data.labels is not None:
        labels = torch.from_numpy(np.ascontiguousarray(data.labels)).long()
    return CalibrationSet(tensors, labels)


def outputs(module: torch.nn.Module, data: CalibrationSet) -> list[torch.Tensor]:
    """The module's output leaves on every sample (chunked, no gradients)."""
    parts: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for xs in data.chunks():
            parts.append(leaves(module(*xs)))
    return [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]


def leaves(out: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def metric(student: list[torch.Tensor], teacher: list[torch.Tensor],
           y: torch.Tensor | None) -> tuple[str, float]:
    """accuracy with labels, else top-1 agreement with the original, on the first output;
    a relative output error where the output has no class dimension."""
    s, t = student[0], teacher[0]
    if s.ndim >= 2 and s.shape[-1] > 1:
        pred = s.argmax(-1)
        if y is not None and y.shape == pred.shape:
            return "accuracy", float((pred == y).float().mean())
        return "agreement", float((pred == t.argmax(-1)).float().mean())
    err = float((s - t).norm() / t.norm().clamp_min(1e-12))
    return "relative_error", err
