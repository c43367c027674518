"""Sensitivity: prune one group at a time at several ratios and measure the metric drop.

Every point is a per-group ratio plan (`{group: r}`, the other groups untouched) run by the
sweep machinery, so the same executors (process pool, Ray) and the same measurement apply.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from engine.io.data import DataOptions
from engine.io.export import write_json
from engine.options import PruningOptions
from engine.quality.evaluate import HIGHER_IS_BETTER
from engine.quality.sweep import (
    SweepProgress,
    base_report,
    parse_ratios,
    prepare,
    run_points,
    runs_elsewhere,
)

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def metric_drop(metric: str, original: float, value: float) -> float:
    """How much worse `value` is than `original` (positive = worse)."""
    return original - value if HIGHER_IS_BETTER.get(metric, True) else value - original


def sensitivity(
    model: Any,
    options: PruningOptions | dict | None = None,
    ratios: str | Sequence[float] = DEFAULT_RATIOS,
    *,
    eval_data: Any,
    metric: str | None = None,
    calibration: Any = None,
    workers: int | None = None,
    ray: str | None = None,
    progress: SweepProgress | None = None,
    out_json: str | os.PathLike | None = None,
    example_inputs: tuple | None = None,
    trust_pickle: bool = False,
    input_shapes: list[tuple[int, ...]] | None = None,
    analysis: Any = None,
    seq_len: int | None = None,
    stop: Callable[[], bool] | None = None,
    device: str | None = None,
    amp: str | None = None,
    data_options: DataOptions | None = None,
) -> dict[str, Any]:
    """Per prunable group and ratio: the metric, its drop, and params/FLOPs after.

    Returns `{"model", "metric", "original", "before", "options", "ratios", "points",
    "groups": [{"name", "channels", "curve": [{"ratio", "metric", "drop", "params",
    "flops"}]}]}`; each curve starts at ratio 0 (the original model). `stop()`, asked after
    every point, ends the run early: the curves then hold the points that finished and
    `complete` is false.
    """
    options = PruningOptions.from_any(options)
    ratio_list = parse_ratios(ratios)
    prepared = prepare(model, eval_data=eval_data, metric=metric, criteria=[options.criterion],
                       calibration=calibration, ray=ray, example_inputs=example_inputs,
                       trust_pickle=trust_pickle, input_shapes=input_shapes,
                       analysis=analysis, seq_len=seq_len, device=device, amp=amp,
                       data_options=data_options, ship=runs_elsewhere(workers, ray, 2))
    groups = prepared.analysis.prunable_groups(options.prunes_whole_blocks)
    report = base_report(prepared)
    report["options"] = options.to_dict()
    report["ratios"] = ratio_list
    points = [{"options": options.to_dict(), "ratios": {g.name: r}, "group": g.name}
              for g in groups for r in ratio_list if r > 0]
    run_points(prepared, points, report, workers=workers, ray=ray, progress=progress,
               out_json=out_json, stop=stop)
    report["groups"] = curves(report, [(g.name, g.channels) for g in groups])
    if out_json is not None:
        write_json(out_json, report)
    return report


def curves(report: dict[str, Any], groups: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """Group the finished points into one curve per group, ratio 0 first."""
    metric, original, before = report["metric"], report["original"], report["before"]
    out = []
    for name, channels in groups:
        curve = [{"ratio": 0.0, "metric": original, "drop": 0.0, **before}]
        for p in report["points"]:
            if p.get("group") == name and "metric" in p:
                curve.append({"ratio": p["ratios"][name], "metric": p["metric"],
                              "drop": metric_drop(metric, original, p["metric"]),
                              "params": p["params"], "flops": p["flops"]})
        curve.sort(key=lambda c: c["ratio"])
        out.append({"name": name, "channels": channels, "curve": curve})
    return out
