"""Calibration data for recovery: checked against the model, split, scored (engine.io.data
loads it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.errors import OptionError
from engine.graph.inputs import sample_chunks, user_input_shapes
from engine.graph.outputs import tensor_leaves
from engine.quality.embedding import EMBEDDING_METRICS, embedding_metrics, mean_pool
from engine.quality.evaluate import HIGHER_IS_BETTER, choose_metric

CHUNK = 256  # samples per forward pass when only outputs are needed


@dataclass
class CalibrationSet:
    xs: list[torch.Tensor]  # one tensor per model input, samples along dim 0
    y: torch.Tensor | None = None
    # the model's fixed batch size (None: any): such a graph runs exactly this many at once
    batch: int | None = None
    # which input is the attention mask of a text model (1: a real token, 0: padding)
    mask_input: int | None = None

    @property
    def token_mask(self) -> torch.Tensor | None:
        """(samples, tokens) True at real tokens, for a text model given an attention mask."""
        return None if self.mask_input is None else self.xs[self.mask_input] > 0

    def __len__(self) -> int:
        return int(self.xs[0].shape[0])

    def take(self, index: torch.Tensor) -> CalibrationSet:
        return CalibrationSet([x[index] for x in self.xs],
                              None if self.y is None else self.y[index], self.batch,
                              self.mask_input)

    def chunks(self, size: int = CHUNK):
        """Consecutive input chunks of `size` samples; with a fixed batch, chunks of exactly
        that batch, the remainder (fewer samples) left out."""
        fixed = self.batch is not None
        for chunk, _real in sample_chunks(self.xs, self.batch if fixed else size, fixed=fixed):
            yield chunk


def expected_shapes(program: torch.export.ExportedProgram) -> list[tuple[int | None, ...]]:
    """Each user input's shape, None where the dimension is dynamic."""
    return user_input_shapes(program)


def captured_batch(shapes: list[tuple[int | None, ...]]) -> int | None:
    """The batch size the model was captured with where it is fixed (dim 0 of its first
    input is a number), None where the batch is dynamic."""
    if shapes and shapes[0] and shapes[0][0] is not None:
        return int(shapes[0][0])
    return None


def with_attention_mask(xs: list[np.ndarray], input_names: Sequence[str]) -> \
        tuple[list[np.ndarray], list[str]]:
    """A transformers text model captured with (input_ids, attention_mask) and given token
    ids only: the mask the capture used, all ones (every token attended). Returns the
    arrays and the names of the inputs filled in."""
    names = list(input_names)
    if len(xs) == 1 and names[:2] == ["input_ids", "attention_mask"] and len(names) == 2 \
            and xs[0].ndim == 2 and xs[0].dtype.kind in "iu":
        return [xs[0], np.ones(xs[0].shape, dtype=np.int64)], ["attention_mask"]
    return xs, []


def attention_mask_input(xs: Sequence[torch.Tensor], input_names: Sequence[str]) -> int | None:
    """The position of a text model's attention mask among its inputs, when it is an integer
    (samples, tokens) mask over the first input's token ids; None otherwise."""
    names = list(input_names)
    if "attention_mask" not in names or not xs or xs[0].is_floating_point() or xs[0].ndim != 2:
        return None
    k = names.index("attention_mask")
    if k >= len(xs) or xs[k].shape != xs[0].shape or xs[k].is_floating_point():
        return None
    return k


def check(xs: list[np.ndarray], y: np.ndarray | None, shapes, example_inputs: tuple,
          where: str, names: Sequence[str] | None = None,
          input_names: Sequence[str] = ()) -> CalibrationSet:
    """Tensors shaped and typed like the model's inputs, or a one-line error. Dim 0 holds
    the samples, any number of them; a model captured with a fixed batch B runs them B at
    a time, so it needs at least B. `names`: what the errors call each array (default x,
    or x0, x1, ...); `input_names`: the model's forward() keyword of each input (a
    transformers model), which tells the attention mask apart."""
    if len(xs) != len(shapes):
        raise OptionError(f"{where} gives {len(xs)} input array(s); the model takes "
                          f"{len(shapes)} (x, or x0, x1, ... in order)")
    batch = captured_batch(shapes)
    per_batch = "" if batch is None else \
        f", at least {batch}: the model was captured with a fixed batch of {batch} and runs " \
        f"{batch} sample(s) at a time"
    tensors = []
    for k, (x, shape, example) in enumerate(zip(xs, shapes, example_inputs)):
        fits = x.ndim == len(shape) and all(s is None or s == d
                                            for s, d in zip(shape[1:], x.shape[1:]))
        if not fits or x.shape[0] < 1:
            want = ", ".join(["N", *("N" if s is None else str(s) for s in shape[1:])])
            name = names[k] if names else "x" if len(xs) == 1 else f"x{k}"
            raise OptionError(f"{where}: {name} has shape {tuple(x.shape)}; the model takes "
                              f"({want}) (N: any number of samples{per_batch})")
        if x.dtype.kind == "f" and example.is_floating_point():
            tensors.append(torch.from_numpy(np.ascontiguousarray(x)).to(example.dtype))
        elif x.dtype.kind in "iub" and not example.is_floating_point():
            tensors.append(torch.from_numpy(np.ascontiguousarray(x)).to(example.dtype))
        else:
            raise OptionError(f"{where}: input {k} has dtype {x.dtype}; the model takes "
                              f"{str(example.dtype).removeprefix('torch.')}")
    if batch is not None and tensors[0].shape[0] < batch:
        want = ", ".join([f"N>={batch}", *("N" if s is None else str(s) for s in shapes[0][1:])])
        raise OptionError(f"{where} holds {tensors[0].shape[0]} sample(s); the model was "
                          f"captured with a fixed batch of {batch} and runs {batch} sample(s) "
                          f"at a time: give at least {batch}, x of shape ({want})")
    # the loader (engine.io.data) has checked the sample counts and the labels
    labels = None if y is None else torch.from_numpy(np.ascontiguousarray(y)).long()
    return CalibrationSet(tensors, labels, batch, attention_mask_input(tensors, input_names))


def outputs(module: torch.nn.Module, data: CalibrationSet) -> list[torch.Tensor]:
    """The module's output leaves on every sample (chunked, no gradients)."""
    with torch.no_grad():
        if data.batch is not None:
            return forward(module, data.xs, data.batch)
        parts = [tensor_leaves(module(*xs)) for xs in data.chunks()]
    return [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]


def forward(module: torch.nn.Module, xs: Sequence[torch.Tensor],
            batch: int | None) -> list[torch.Tensor]:
    """The module's output leaves on the samples `xs` (gradients as the caller has them).
    A model with a fixed batch runs them `batch` at a time, the last chunk filled up with
    copies of its last sample and the copies' outputs dropped, so every output must hold
    the samples along dim 0."""
    if batch is None:
        return tensor_leaves(module(*xs))
    parts = []
    for chunk, real in sample_chunks(xs, batch, fixed=True, fill=True):
        out = tensor_leaves(module(*chunk))
        if any(t.ndim == 0 or t.shape[0] != batch for t in out):
            shapes = ", ".join(str(tuple(t.shape)) for t in out)
            raise OptionError(f"recovery runs this fixed-batch model {batch} sample(s) at a "
                              f"time and needs outputs with the samples along dim 0; its "
                              f"outputs have shapes {shapes}")
        parts.append([t[:real] for t in out])
    return [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]


def fitting_metric(first: torch.Tensor, data, held: CalibrationSet,
                   model_class: str | None) -> tuple[str, str]:
    """The held-back measure: the metric evaluation would choose for this model and data
    (engine.quality.evaluate.choose_metric, against the original as reference), why, and
    relative error where top-1 agreement means nothing (an output without a class axis).
    `first`: the original's first output on `held`; `data`: the loaded calibration set."""
    name, why = choose_metric(data, first, held.xs, True, model_class)
    if name == "agreement" and (first.ndim < 2 or first.shape[-1] <= 1):
        return "relative_error", (f"the first output {tuple(first.shape)} has no class axis: "
                                  "||pruned - original|| / ||original||")
    return name, why


def pooled(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the real tokens (mask True) of (samples, tokens, features) hidden states:
    engine.quality.embedding.mean_pool in torch, so that distillation can differentiate it."""
    if mask is None:
        return hidden.mean(1)
    weight = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weight).sum(1) / weight.sum(1).clamp_min(1.0)


def metric_value(name: str, student: list[torch.Tensor], teacher: list[torch.Tensor],
                 data: CalibrationSet) -> float:
    """`name` (from `fitting_metric`) of the student's first output against the teacher's."""
    s, t = student[0].double(), teacher[0].double()
    mask = data.token_mask
    if name == "accuracy":
        return float((s.argmax(-1) == data.y).double().mean())
    if name == "agreement":
        return float((s.argmax(-1) == t.argmax(-1)).double().mean())
    if name in EMBEDDING_METRICS:
        return embedding_metrics(mean_pool(s, mask), mean_pool(t, mask))[name]
    if name == "perplexity":
        targets = data.xs[0][:, 1:].long()
        nll = torch.nn.functional.cross_entropy(s[:, :-1].transpose(1, 2), targets,
                                                reduction="none")
        real = torch.ones_like(nll) if mask is None else mask[:, 1:].to(nll.dtype)
        return float(torch.exp((nll * real).sum() / real.sum().clamp_min(1.0)))
    return float((s - t).norm() / t.norm().clamp_min(1e-12))


def better(name: str, value: float, than: float) -> bool:
    """Whether `value` of metric `name` is strictly better than `than`."""
    return value > than if HIGHER_IS_BETTER[name] else value < than
