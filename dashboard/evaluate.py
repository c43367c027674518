"""Fidelity of a pruned model against the original on evaluation data.

Not pruning logic: it only runs both modules on the same inputs and compares the outputs
(top-1 agreement, max abs difference and, when labels exist, accuracy before and after).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

MAX_EVAL_SAMPLES = 2048


def _first_tensor(output: Any) -> torch.Tensor:
    """The first tensor of a model output (tensor, tuple/list, dict, or HF-style object)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    elif hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, list | tuple):
        for item in output:
            try:
                return _first_tensor(item)
            except TypeError:
                continue
    raise TypeError(f"model output of type {type(output).__name__} holds no tensor")


@torch.no_grad()
def predict(module: torch.nn.Module, x: np.ndarray | torch.Tensor,
            example_inputs: Sequence[torch.Tensor], batch: int = 256) -> np.ndarray:
    """Run ``module`` on the samples ``x`` (first axis) and return its first output.

    Inputs take the example input's dtype. An exported program may have a static batch
    size: when a free batch fails, the samples are fed in chunks of the example's batch
    size, padding the last chunk.
    """
    example = example_inputs[0]
    data = torch.as_tensor(np.asarray(x)).to(example.dtype)
    outs: list[torch.Tensor] = []
    try:
        for start in range(0, data.shape[0], batch):
            outs.append(_first_tensor(module(data[start:start + batch])).float().cpu())
    except Exception:
        size = int(example.shape[0]) if example.ndim else 1
        outs = []
        for start in range(0, data.shape[0], size):
            chunk = data[start:start + size]
            real = chunk.shape[0]
            if real < size:
                pad = chunk[-1:].expand(size - real, *chunk.shape[1:])
                chunk = torch.cat([chunk, pad])
            outs.append(_first_tensor(module(chunk)).float().cpu()[:real])
    return torch.cat(outs).numpy()


def _top1(out: np.ndarray) -> np.ndarray | None:
    if out.ndim < 2 or out.shape[1] < 2:
        return None
    return out.argmax(axis=1)


def fidelity(before: np.ndarray, after: np.ndarray, y: np.ndarray | None = None) -> dict:
    """Agreement of two models' outputs on the same samples, and accuracies with labels."""
    result: dict[str, Any] = {"samples": int(before.shape[0])}
    if before.shape != after.shape:
        result["note"] = f"output shapes differ: {before.shape} vs {after.shape}"
        return result
    result["max_abs_diff"] = float(np.max(np.abs(before - after))) if before.size else 0.0
    top_before, top_after = _top1(before), _top1(after)
    if top_before is not None:
        result["top1_agreement"] = float(np.mean(top_before == top_after))
        if y is not None and before.ndim == 2 and y.shape[0] == before.shape[0]:
            result["accuracy_before"] = float(np.mean(top_before == y))
            result["accuracy_after"] = float(np.mean(top_after == y))
    return result


def evaluate_pair(original: torch.nn.Module, pruned: torch.nn.Module,
                  x: np.ndarray, y: np.ndarray | None,
                  example_inputs: Sequence[torch.Tensor]) -> dict:
    """Run both models on (at most MAX_EVAL_SAMPLES of) ``x`` and compare them."""
    x = x[:MAX_EVAL_SAMPLES]
    y = y[:MAX_EVAL_SAMPLES] if y is not None else None
    before = predict(original, x, example_inputs)
    after = predict(pruned, x, example_inputs)
    return fidelity(before, after, y)
