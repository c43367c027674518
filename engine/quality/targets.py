"""Prune to a target (a fraction of params, FLOPs or measured latency to remove) with automatic
per-group ratios, and compare them with the uniform global ratio that removes as much."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.errors import OptionError
from engine.options import PruningOptions
from engine.pipeline import apply, prune_unverified
from engine.quality.evaluate import (
    EvalData,
    evaluate,
    load_calibration_data,
    load_eval_data,
    predict,
)
from engine.quality.latency_costs import (
    add_latency,
    group_latency,
    measured_saving,
    saved_fraction,
)
from engine.quality.metrics import flops_samples, model_metrics
from engine.quality.sensitivity import DEFAULT_RATIOS, metric_drop, sensitivity
from engine.quality.sweep_job import point_quality
from engine.scoring.analysis import analyze, plan
from engine.scoring.auto_ratios import (
    check_target,
    fit_ratios,
    greedy_measured,
    ratio_levels,
    refine_pairs,
    uniform_ratio,
)

SCREEN_SAMPLES = 384  # the search screens its candidates on this many samples of its data


def ratios_for_target(
    model: Any,
    options: PruningOptions | dict | None = None,
    *,
    target_params: float | None = None,
    target_flops: float | None = None,
    target_latency: float | None = None,
    sensitivity_data: Any = None,
    eval_data: Any = None,
    metric: str | None = None,
    sensitivity_report: dict | None = None,
    sensitivity_ratios: Sequence[float] = DEFAULT_RATIOS,
    calibration: Any = None,
    workers: int | None = None,
    ray: str | None = None,
    progress=None,
    analysis: Any = None,
    **load_kwargs: Any,
) -> dict[str, Any]:
    """Per-group ratios that remove the target with the least predicted metric loss.

    The sensitivity curves are measured on `sensitivity_data` (or read from a saved
    `sensitivity_report`). With `eval_data`, the chosen ratios and the uniform global ratio
    removing as much are both evaluated there. Returns the `auto_ratios` section of
    report.json: `{"target", "ratios", "predicted_loss", "removed", "uniform", "sensitivity",
    "comparison"}`.
    """
    targets = {"params": target_params, "flops": target_flops, "latency": target_latency}
    given = [name for name, value in targets.items() if value is not None]
    if len(given) != 1:
        raise OptionError("give one target: --target-params F, --target-flops F or "
                          "--target-latency F")
    resource = given[0]
    flag = f"--target-{resource}"
    target = check_target(targets[resource], flag)
    options = PruningOptions.from_any(options)
    if analysis is None:
        analysis = analyze(model, **load_kwargs)
    if isinstance(sensitivity_data, str):
        sensitivity_data = load_calibration_data(sensitivity_data, model=analysis.captured)
    start = time.perf_counter()
    if sensitivity_report is None:
        if sensitivity_data is None:
            raise OptionError(f"{flag} needs data to measure each group's sensitivity: "
                              "--calibration F (or --eval-data F)")
        sensitivity_report = sensitivity(
            model, options, sensitivity_ratios, eval_data=sensitivity_data, metric=metric,
            calibration=calibration, workers=workers, ray=ray, progress=progress,
            analysis=analysis, **load_kwargs)
    sensitivity_seconds = time.perf_counter() - start
    costs = None
    if resource == "latency":  # measured per group on this machine (cached), not from FLOPs
        costs = group_latency(analysis, options, calibration=calibration)
        add_latency(sensitivity_report, costs)
    total = sensitivity_report["before"][resource]
    if resource != "latency":
        # stored curves may count in other units (an older version's FLOPs): this model's
        # own size is the reference the pruned candidates are measured against
        total = model_metrics(analysis.gm, flops_samples(analysis.captured))[resource]
    light: dict[tuple, Any] = {}
    removals: dict[tuple, float] = {}
    losses: dict[tuple, float] = {}

    def planned(ratios: dict[str, float] | None, ratio: float | None):
        the_plan = plan(analysis, options, ratio=ratio, ratios=ratios, calibration=calibration)
        # ratios that round to the same channels are the same model: measured once
        return the_plan, tuple(tuple(g.pruned.tolist()) for g in the_plan.groups)

    def pruned(ratios: dict[str, float] | None, ratio: float | None):
        """The pruned graph (unverified: the plan finally kept is applied for real)."""
        the_plan, key = planned(ratios, ratio)
        if key not in light:
            light.clear()  # keep one pruned model in memory at a time
            light[key] = prune_unverified(analysis, the_plan)
        return key, light[key]

    def removed(ratios, ratio) -> float:
        the_plan, key = planned(ratios, ratio)
        if key not in removals:
            if costs is not None:  # the measured per-group savings, added up
                removals[key] = saved_fraction(costs, {g.name: len(g.pruned) / max(g.n, 1)
                                                       for g in the_plan.groups})
            else:
                removals[key] = 1.0 - pruned(ratios, ratio)[1][1][resource] / total
        return removals[key]

    method = "curves"
    trail: list[dict] = []
    search: dict[str, Any] = {}
    if sensitivity_data is not None:
        # measured greedy on the sensitivity data (never the evaluation data)
        data = _as_eval_data(sensitivity_data)
        # the original's outputs once, instead of running it again for every measurement
        reference = predict(analysis.captured, data)
        counted = {"losses": 0, "screens": 0}

        def measure_loss(ratios: dict[str, float], sample, ref, cache: dict) -> float:
            key = planned(ratios, None)[1]
            if key not in cache:
                counted["losses" if cache is losses else "screens"] += 1
                gm = pruned(ratios, None)[1][0]
                value = evaluate(gm, sample, metric, reference=ref,
                                 example_inputs=analysis.captured.example_inputs)
                cache[key] = metric_drop(value["metric"], 0.0, value["value"])
            return cache[key]

        def loss_of(ratios: dict[str, float]) -> float:
            return measure_loss(ratios, data, reference, losses)

        screen_of = None
        if len(data) >= 2 * SCREEN_SAMPLES:
            # a fixed, seeded subset: candidates are screened there, moves confirmed on all
            rows = np.sort(np.random.default_rng(0).permutation(len(data))[:SCREEN_SAMPLES])
            sample = EvalData(tuple(x[rows] for x in data.inputs),
                              None if data.labels is None else data.labels[rows],
                              f"{data.source}, {SCREEN_SAMPLES} samples", data.flag)
            screens: dict[tuple, float] = {}

            def screen_of(ratios: dict[str, float]) -> float:
                return measure_loss(ratios, sample, reference[rows], screens)

        _reuse_sensitivity(sensitivity_report, options, data, metric, resource, total,
                           planned, removals, losses)
        sizes = {g["name"]: int(g["channels"]) for g in sensitivity_report["groups"]}

        def counts_at(r: float) -> dict[str, int]:
            the_plan = plan(analysis, options, ratios={name: r for name in sizes},
                            calibration=calibration)
            return {g.name: len(g.pruned) for g in the_plan.groups}

        search_start = time.perf_counter()
        levels = ratio_levels(counts_at, sizes)
        start, _, trail = greedy_measured(sensitivity_report, resource, target, removed,
                                          screen_of or loss_of, levels=levels)
        greedy_loss = loss_of(start)
        chosen, _, moves = refine_pairs(levels, start, target, lambda r: removed(r, None),
                                        loss_of, screen_of)
        achieved = removed(chosen, None)
        trail = trail + [{"refine": m} for m in moves]
        predicted = None
        method = "measured greedy + pair refinement"
        search = {"greedy_ratios": start, "greedy_loss": greedy_loss,
                  "loss": loss_of(chosen), "measured": counted["losses"],
                  "screened": counted["screens"],
                  "seconds": round(time.perf_counter() - search_start, 2)}
    else:
        choice, achieved = fit_ratios(sensitivity_report, resource, target, removed)
        chosen, predicted = choice.ratios, choice.predicted_loss
    uniform, uniform_removed = uniform_ratio(resource, target, removed)
    section: dict[str, Any] = {
        "target": {"resource": resource, "remove": target},
        "ratios": chosen,
        "method": method,
        "predicted_loss": predicted,
        "removed": achieved,
        "steps": trail,
        "search": search,
        "uniform": {"ratio": uniform, "removed": uniform_removed},
        "sensitivity": {
            "data": sensitivity_report.get("eval_data"),
            "metric": sensitivity_report["metric"],
            "ratios": sensitivity_report["ratios"],
            "seconds": round(sensitivity_seconds, 2),
        },
    }
    if costs is not None:
        section["latency_costs"] = {
            "device": costs["device"], "original_ms": round(costs["original_s"] * 1e3, 4),
            "ratios": costs["ratios"], "cached": costs["cached"],
            "groups": costs["groups"],
            "measured": measured_saving(analysis, planned(chosen, None)[0]),
        }
    if eval_data is not None:
        data = _as_eval_data(eval_data)
        original = evaluate(analysis.captured, data, metric, reference=analysis.captured)
        metric = original["metric"]
        auto = point_quality(apply(analysis, planned(chosen, None)[0]), data, metric)
        flat = point_quality(apply(analysis, planned(None, uniform)[0]), data, metric)
        section["comparison"] = {"metric": auto["metric"], "data": data.source,
                                 "original": original["value"], "auto": auto["value"],
                                 "uniform": flat["value"]}
    return section


def _reuse_sensitivity(report: dict, options: PruningOptions, data: Any, metric: str | None,
                       resource: str, total: float, planned, removals: dict,
                       losses: dict) -> None:
    """The sensitivity points are one group pruned alone, measured on the same data with the
    same options: the search starts with them known instead of measuring them again."""
    same = (report.get("eval_data") == data.source and report.get("options") == options.to_dict()
            and (metric is None or metric == report.get("metric")))
    if not same:
        return
    same_units = resource == "latency" or report.get("before", {}).get(resource) == total
    for point in report.get("points", []):
        if "metric" not in point or "ratios" not in point:
            continue
        key = planned(point["ratios"], None)[1]
        losses.setdefault(key, metric_drop(report["metric"], 0.0, point["metric"]))
        if same_units:
            removals.setdefault(key, 1.0 - point[resource] / total)


def _as_eval_data(data: Any):
    return load_eval_data(data) if isinstance(data, str) else data
