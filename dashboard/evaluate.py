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
BASELINE_KEY = "eval_baseline"  # in a model's cache: the original's outputs and task metric
PAIR_KEY = "eval_pair"  # in a model's cache: the last Prune's pair and its numbers
BASELINE_MAX_BYTES = 256 * 2**20  # larger outputs (big vocabularies) are not kept


def evaluate_pair(original: torch.nn.Module, pruned: torch.nn.Module,
                  data: DataSet, example_inputs: Sequence[torch.Tensor],
                  cache: dict[str, Any] | None = None,
                  remember: bool = False) -> dict[str, Any]:
    """Both models on (at most MAX_EVAL_SAMPLES of) ``data``: the task metric before and after
    (accuracy with labels, perplexity for a language model), agreement and relative error.

    With ``cache`` (the model's per-session cache) the original is run on ``data`` once, not
    once per Prune and twice per Recover; with ``remember`` the pair's numbers are kept there
    too, so that Recover's "pruned" column (the Prune step's pair) is not measured again.
    Entries are matched by object identity: the same original module, pruned module and data
    set.
    """
    seen = cache.get(PAIR_KEY) if cache is not None else None
    if seen is not None and seen[0] is original and seen[1] is pruned and seen[2] is data:
        return dict(seen[3])
    example = tuple(example_inputs)
    head = data.head(MAX_EVAL_SAMPLES)
    reference, task = _baseline(original, data, head, example, cache)
    result: dict[str, Any] = {"samples": len(head)}
    if task["metric"] in ("accuracy", "perplexity"):
        after = evaluate(pruned, head, task["metric"], reference=reference,
                         example_inputs=example)
        result["metric"] = task["metric"]
        result[f"{task['metric']}_before"] = task["value"]
        result[f"{task['metric']}_after"] = after["value"]
    if reference.ndim >= 2 and reference.shape[-1] >= 2:
        result["top1_agreement"] = evaluate(pruned, head, "agreement", reference=reference,
                                            example_inputs=example)["value"]
    result["relative_error"] = evaluate(pruned, head, "relative_error", reference=reference,
                                        example_inputs=example)["value"]
    if cache is not None and remember:
        cache[PAIR_KEY] = (original, pruned, data, dict(result))
    return result


def _baseline(original: torch.nn.Module, data: DataSet, head: DataSet, example: tuple,
              cache: dict[str, Any] | None) -> tuple[Any, dict[str, Any]]:
    """The original's outputs on ``head`` (the evaluated part of ``data``) and its task
    metric (from the cache when the same original was already run on the same data)."""
    seen = cache.get(BASELINE_KEY) if cache is not None else None
    if seen is not None and seen[0] is original and seen[1] is data:
        return seen[2], seen[3]
    reference = predict(original, head, example_inputs=example)
    task = evaluate(original, head, reference=reference, example_inputs=example)
    if cache is not None and reference.nbytes <= BASELINE_MAX_BYTES:
        cache[BASELINE_KEY] = (original, data, reference, task)
    return reference, task
