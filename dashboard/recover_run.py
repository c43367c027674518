"""One "Recover" click: engine.recover on the pruned result, engine.save (model.onnx on
demand, as for Prune), and the original / pruned / recovered comparison on the evaluation
data, as plain data (testable without Streamlit). Recovery itself is the engine's; this only
orchestrates and measures."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dashboard.evaluate import evaluate_pair
from engine.io.data import DataSet
from engine.options import RECOVERY_DATA_LIGHT, RECOVERY_METHODS

METHOD_CHOICES = RECOVERY_METHODS
DEFAULT_METHODS = RECOVERY_DATA_LIGHT


@dataclass
class RecoverRun:
    prune_signature: str  # the pruned result it recovered (a newer Prune makes it stale)
    methods: list[str]
    budget_s: float
    files: dict[str, Path]
    recovery: dict[str, Any]  # report["recovery"]
    params: dict[str, int]  # original / pruned / recovered
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # measure -> model -> v
    scored_on: str = ""
    result: Any = field(default=None, repr=False)  # the recovered PruneResult (for its ONNX)


def run_recover(engine: Any, result: Any, original: Any, calibration: Any, methods: list[str],
                budget_s: float, out_dir: Path, eval_data: DataSet | None, signature: str,
                progress: Callable[[str, float], None] = lambda _m, _f: None,
                stop: Callable[[], bool] | None = None,
                cache: dict[str, Any] | None = None) -> RecoverRun:
    """Recover, compare on the evaluation data, then save (report.json then carries the
    comparison as ``quality``). ``stop()`` ends the recovery early with what is done.
    ``cache`` (the model's per-session cache) holds the original's outputs and the Prune
    step's numbers when they were measured on the same data (dashboard/evaluate.py)."""
    recovered = engine.recover(result, calibration, methods, budget_s=budget_s,
                               progress=progress, stop=stop)
    scores: dict[str, dict[str, float]] = {}
    scored_on = ""
    example = tuple(result.example_inputs)
    if eval_data is not None and len(example) == 1:
        progress("Comparing original, pruned and recovered on the evaluation data…", 1.0)
        pruned = evaluate_pair(original, result.module, eval_data, example, cache=cache)
        after = evaluate_pair(original, recovered.module, eval_data, example, cache=cache)
        metric = pruned.get("metric")
        if metric is not None:
            scores[metric.capitalize()] = {"original": pruned[f"{metric}_before"],
                                           "pruned": pruned[f"{metric}_after"],
                                           "recovered": after[f"{metric}_after"]}
            recovered.report["quality"] = {
                "metric": metric, "original": pruned[f"{metric}_before"],
                "pruned": pruned[f"{metric}_after"], "recovered": after[f"{metric}_after"],
                "samples": pruned["samples"], "data": eval_data.source}
        if "top1_agreement" in pruned:
            scores["Top-1 agreement with the original"] = {
                "original": 1.0, "pruned": pruned["top1_agreement"],
                "recovered": after["top1_agreement"]}
        scored_on = f"{eval_data.source} ({pruned['samples']} samples)"
    progress("Writing model.pt2 and report.json (engine.save)…", 1.0)
    saved = engine.save(recovered, out_dir, onnx=False)
    return RecoverRun(
        prune_signature=signature,
        methods=list(methods),
        budget_s=budget_s,
        files={name: Path(p) for name, p in saved.items()},
        recovery=recovered.report["recovery"],
        params={"original": result.before["params"], "pruned": result.after["params"],
                "recovered": recovered.after["params"]},
        scores=scores,
        scored_on=scored_on,
        result=recovered,
    )


def comparison_rows(run: RecoverRun) -> list[dict[str, str]]:
    """Original / pruned / recovered side by side."""
    rows = [{"Measure": "Parameters", **{k.capitalize(): f"{v:,}" for k, v in
                                          run.params.items()}}]
    for measure, values in run.scores.items():
        fmt = "{:.4g}" if measure == "Perplexity" else "{:.2%}"
        rows.append({"Measure": measure,
                     **{k.capitalize(): fmt.format(v) for k, v in values.items()}})
    info = run.recovery
    if info.get("metric") is not None:
        rows.append({"Measure": f"{info['metric']} on {info['holdout_samples']} held-back "
                                "calibration samples",
                     "Original": "", "Pruned": f"{info['metric_before']:.2%}",
                     "Recovered": f"{info['metric_after']:.2%}"})
    return rows
