"""Fidelity of a pruned model against the original on evaluation data, measured by the engine.

The dashboard does not compute metrics itself: every number comes from ``engine.evaluate``
(the task metric before and after, top-1 agreement and relative output error against the
original), so it is the number ``prunescope evaluate`` and ``report.json`` give.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from engine.io.data import DataSet
from engine.quality.evaluate import evaluate, predict

MAX_EVAL_SAMPLES = 2048


def evaluate_pair(original: torch.nn.Module, pruned: torch.nn.Module,
                  data: DataSet, example_inputs: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Both models on (at most MAX_EVAL_SAMPLES of) ``data``: the task metric before and after
    (accuracy with labels, perplexity for a language model), agreement and relative error."""
    data = data.head(MAX_EVAL_SAMPLES)
    example = tuple(example_inputs)
    reference = predict(original, data, example_inputs=example)
    result: dict[str, Any] = {"samples": len(data)}
    task = evaluate(original, data, reference=reference, example_inputs=example)
    if task["metric"] in ("accuracy", "perplexity"):
        after = evaluate(pruned, data, task["metric"], reference=reference,
                         example_inputs=example)
        result["metric"] = task["metric"]
        result[f"{task['metric']}_before"] = task["value"]
        result[f"{task['metric']}_after"] = after["value"]
    if reference.ndim >= 2 and reference.shape[-1] >= 2:
        result["top1_agreement"] = evaluate(pruned, data, "agreement", reference=reference,
                                            example_inputs=example)["value"]
    result["relative_error"] = evaluate(pruned, data, "relative_error", reference=reference,
                                        example_inputs=example)["value"]
    return result
