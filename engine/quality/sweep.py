"""Sweeps: prune one model over a grid of options and ratios and measure each point.

A point is exactly `prunescope prune` with those options and that ratio followed by the
evaluation `--eval-data` runs (same analysis, plan, apply and `point_quality`), so its
metric is the one `prune` reports. Points run in a local process pool or on Ray
(engine/quality/executors.py); each worker analyses the model once and keeps the analysis
(and its cached raw scores) for all the points it runs.
"""

from __future__ import annotations

import csv
import io
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.device import device_scope
from engine.errors import OptionError
from engine.io.data import DataOptions, load_calibration_data, needs_model
from engine.io.export import atomic_write_bytes, write_json
from engine.options import ALLOWED, PruningOptions, check_ratio
from engine.quality.evaluate import check_data, check_metric, evaluate, load_eval_data
from engine.quality.executors import check_executor, execute
from engine.quality.metrics import count_params, flops_samples, graph_flops
from engine.quality.recovery import check_steps, parse_methods
from engine.quality.sweep_job import (
    ModelSource,
    SweepJob,
    prime_worker_cache,
)
from engine.scoring.analysis import analyze
from engine.threads import TORCH_EXPORT_LOCK

# option name -> command-line flag, for the options that can be an axis of the grid
AXES = {
    "criterion": "--criterion",
    "policy": "--policy",
    "layer_norm": "--layer-norm",
    "group_policy": "--group-policy",
    "reshape_channel_axis": "--reshape-channel-axis",
    "step_op": "--step-op",
}
# `index` removes the filters the user names: it has no ranking for a ratio to cut
NOT_SWEEPABLE = {"criterion": ("index",)}

SweepProgress = Callable[[int, int, dict], None]


def axis_values(name: str, value: Any) -> list[Any]:
    """One axis of the grid: a single value, a comma list or a sequence, or `all`."""
    if name not in AXES:
        raise OptionError(f"{name!r} cannot be swept; axes: {', '.join(AXES)}")
    flag = AXES[name]
    sweepable = [v for v in ALLOWED[name] if v not in NOT_SWEEPABLE.get(name, ())]
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, Iterable):
        items = list(value)
    else:
        items = [value]
    if any(isinstance(v, str) and v == "all" for v in items):
        if len(items) != 1:
            raise OptionError(f"{flag}: `all` stands alone; allowed: all or a comma list")
        return list(sweepable)
    allowed_text = ", ".join(str(v) for v in sweepable) + ", all"
    values = []
    for item in items:
        if isinstance(item, str) and item == "":
            raise OptionError(f"{flag} has an empty value; allowed: {allowed_text}")
        if name == "reshape_channel_axis" and isinstance(item, str):
            try:
                item = int(item)
            except ValueError:
                pass
        if isinstance(item, bool) or item not in sweepable:
            raise OptionError(f"{flag} value {item!r} is not allowed; allowed: {allowed_text}")
        if item not in values:
            values.append(item)
    return values


def expand_grid(grid: Mapping[str, Any] | None) -> list[PruningOptions]:
    """Every combination of the grid's axes (in the order of AXES, last axis fastest).

    Keys that are not axes (step_size, seed) are single values given to every point.
    """
    grid = dict(grid or {})
    fixed = {k: grid.pop(k) for k in list(grid) if k not in AXES}
    axes = {name: axis_values(name, grid[name]) for name in AXES if name in grid}
    combos: list[dict[str, Any]] = [{}]
    for name, values in axes.items():
        combos = [{**c, name: v} for c in combos for v in values]
    return [PruningOptions.from_any({**fixed, **c}) for c in combos]


def parse_ratios(value: str | Sequence[float], flag: str = "--ratio") -> list[float]:
    """A list of pruning ratios, each 0 <= r < 1, at least one."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    else:
        items = list(value)
    if not items:
        raise OptionError(f"{flag} needs at least one ratio, e.g. {flag} 0.1,0.3,0.5")
    ratios = []
    for item in items:
        r = check_ratio(item, flag)
        if r not in ratios:
            ratios.append(r)
    return ratios


# ---------------------------------------------------------------------------- the sweep
@dataclass
class Prepared:
    """A model analysed once in this process, its evaluation data and its original metric."""

    job: SweepJob
    analysis: Any
    original: dict[str, Any]
    before: dict[str, int]


@device_scope
def prepare(
    model: Any,
    *,
    eval_data: Any,
    metric: str | None = None,
    criteria: Iterable[str] = ("l2",),
    calibration: Any = None,
    recover: str | None = None,
    recover_steps: int | None = None,
    ray: str | None = None,
    example_inputs: tuple | None = None,
    trust_pickle: bool = False,
    input_shapes: list[tuple[int, ...]] | None = None,
    analysis: Any = None,
    ship: bool = True,
    seq_len: int | None = None,
    device: str | None = None,
    amp: str | None = None,
    data_options: DataOptions | None = None,
) -> Prepared:
    """Check everything that can be checked before work starts, analyse, score, evaluate.

    `device`/`amp`: where this process scores and evaluates and every point runs
    (engine.device; on Ray each worker gets one GPU of its own).

    `data_options`: how text, datasets and images become inputs (engine.io.data).
    `analysis` reuses one this process already has (`model` still says what workers load).
    `ship=False`: every point runs in this process, so an in-memory model is not serialised.
    """
    check_executor(ray)
    check_metric(metric)
    # arrays are read (and checked) before the analysis; text and images need the model
    data = eval_data
    if isinstance(eval_data, (str, os.PathLike)) and not needs_model(eval_data):
        data = load_eval_data(eval_data, options=data_options)
    criteria = list(dict.fromkeys(criteria))
    if not needs_model(calibration):
        calibration = _calibration(calibration, options=data_options)
    if recover:
        parse_methods(recover)
        check_steps(recover_steps)
        if calibration is None:
            raise OptionError("--recover needs calibration data (--calibration F)")
    if analysis is None:
        analysis = analyze(model, example_inputs, trust_pickle=trust_pickle,
                           input_shapes=input_shapes, seq_len=seq_len)
    if isinstance(data, (str, os.PathLike)):
        data = load_eval_data(data, model=analysis.captured, options=data_options)
    calibration = _calibration(calibration, analysis.captured, options=data_options)
    check_data(analysis.captured, data)
    for criterion in criteria:
        analysis.filter_scores(criterion, calibration)  # once per criterion; forks inherit it
    # the metric as `prune --eval-data` resolves it: measured on the original first
    original = evaluate(analysis.captured, data, metric, reference=analysis.captured)
    source = _model_source(model, analysis, trust_pickle, input_shapes, ship)
    job = SweepJob(uuid.uuid4().hex, source, data, original["metric"], calibration, recover,
                   calibration, recover_steps, device=None if device is None else str(device),
                   amp=amp)
    prime_worker_cache(job, analysis)
    before = {"params": count_params(analysis.gm),
              "flops": round(graph_flops(analysis.gm) / flops_samples(analysis.captured))}
    return Prepared(job, analysis, original, before)


def run_points(
    prepared: Prepared,
    points: list[dict[str, Any]],
    report: dict[str, Any],
    *,
    workers: int | None = None,
    ray: str | None = None,
    progress: SweepProgress | None = None,
    out_json: str | os.PathLike | None = None,
    stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Run `points`, filling report["points"] (in point order) as they finish; after each,
    rewrite `out_json` atomically so an interrupted run keeps what finished. `stop()`, asked
    after every point, ends the run early (the report then says `complete: false`)."""
    check_workers(workers)
    report.update(points=[], total=len(points), complete=False)
    finished: dict[int, dict] = {}
    runner = execute(prepared.job, points, workers=workers, ray=ray)
    try:
        for index, record in runner:
            finished[index] = {"index": index, **record}
            report["points"] = [finished[i] for i in sorted(finished)]
            report["complete"] = len(finished) == len(points)
            if out_json is not None:
                _write_json(out_json, report)
            if progress is not None:
                progress(len(finished), len(points), finished[index])
            if stop is not None and stop():
                break
    finally:
        runner.close()
    return report


def check_workers(workers: int | None) -> None:
    """`--workers`: None (the cores) or an integer >= 1."""
    if workers is not None and (isinstance(workers, bool) or int(workers) < 1):
        raise OptionError(f"--workers {workers!r} must be an integer >= 1")


def sweep(
    model: Any,
    grid: Mapping[str, Any] | None,
    ratios: str | Sequence[float],
    *,
    eval_data: Any,
    metric: str | None = None,
    recover: str | None = None,
    calibration: Any = None,
    recover_steps: int | None = None,
    workers: int | None = None,
    ray: str | None = None,
    progress: SweepProgress | None = None,
    out_json: str | os.PathLike | None = None,
    example_inputs: tuple | None = None,
    trust_pickle: bool = False,
    input_shapes: list[tuple[int, ...]] | None = None,
    seq_len: int | None = None,
    stop: Callable[[], bool] | None = None,
    device: str | None = None,
    amp: str | None = None,
    data_options: DataOptions | None = None,
) -> dict[str, Any]:
    """Prune `model` at every point of `grid` x `ratios` and measure each pruned model
    (on `device`, calibration passes in `amp` autocast: engine.device).

    `grid` maps option names to a value, a list or "all"; `eval_data` is an EvalData or a
    file/name for `load_eval_data` (text, datasets and images read as `data_options` say).
    Returns (and, after every point, atomically writes to `out_json`) `{"model", "metric",
    "original", "before", "axes", "ratios", "points", "complete"}`; each point has its
    `options`, `ratio`, `params`, `flops`, `metric` (`recovered` with `recover`) and
    `seconds`. An interrupted sweep keeps finished points;
    so does one that `stop()` (asked after every point) ends.
    """
    options_list = expand_grid(grid)
    ratio_list = parse_ratios(ratios)
    check_workers(workers)  # before the analysis, scoring and evaluation, not after them
    prepared = prepare(model, eval_data=eval_data, metric=metric,
                       criteria=[o.criterion for o in options_list], calibration=calibration,
                       recover=recover, recover_steps=recover_steps, ray=ray,
                       example_inputs=example_inputs, trust_pickle=trust_pickle,
                       input_shapes=input_shapes, seq_len=seq_len, device=device, amp=amp,
                       data_options=data_options,
                       ship=runs_elsewhere(workers, ray, len(options_list) * len(ratio_list)))
    report = base_report(prepared)
    report["axes"] = {name: axis_values(name, grid[name]) for name in AXES
                      if name in (grid or {})}
    report["ratios"] = ratio_list
    if recover:
        report["recover"] = recover
    points = [{"options": o.to_dict(), "ratio": r} for o in options_list for r in ratio_list]
    return run_points(prepared, points, report, workers=workers, ray=ray, progress=progress,
                      out_json=out_json, stop=stop)


def runs_elsewhere(workers: int | None, ray: str | None, points: int) -> bool:
    """Whether points run in other processes (which must load the model themselves)."""
    return ray is not None or min(int(workers or os.cpu_count() or 1), points) > 1


def base_report(prepared: Prepared) -> dict[str, Any]:
    return {
        "model": prepared.job.model.name,
        "eval_data": getattr(prepared.job.eval_data, "source", None),
        "metric": prepared.original["metric"],
        "original": prepared.original["value"],
        "samples": prepared.original["samples"],
        "before": prepared.before,
    }


def _model_source(model, analysis, trust_pickle, input_shapes, ship: bool) -> ModelSource:
    if isinstance(model, (str, os.PathLike)) and not Path(model).is_dir():
        name = os.fspath(model)
        return ModelSource(name, name, trust_pickle=trust_pickle, input_shapes=input_shapes)
    name = getattr(getattr(model, "captured", None), "source", None) or type(model).__name__
    if not ship:  # this process's analysis is primed for the points; nothing to load
        return ModelSource(name)
    # an in-memory model (or a model folder, captured here with its config's inputs)
    # travels as the .pt2 file of the program this process captured; the
    # file is ours (torch.export.save may pickle its example inputs), so workers may trust it
    import torch

    buffer = io.BytesIO()
    with TORCH_EXPORT_LOCK:
        torch.export.save(analysis.captured.program, buffer)
    return ModelSource(name, None, buffer.getvalue(), trust_pickle=True)


def _calibration(calibration: Any, model: Any = None,
                 options: DataOptions | None = None) -> Any:
    """A calibration file read once here (the points, and Ray workers, get the arrays);
    text and images are made into the inputs of `model` (captured)."""
    if not isinstance(calibration, (str, os.PathLike)):
        return calibration
    return load_calibration_data(calibration, flag="calibration", model=model,
                                 options=options)


def _write_json(path, report: dict) -> None:
    write_json(path, report)


# ---------------------------------------------------------------------------- tables
def sweep_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One flat row per point: every option, ratio, params, FLOPs, metric(s), seconds."""
    rows = []
    for p in report["points"]:
        row = {**p["options"], "ratio": p["ratio"]}
        for key in ("params", "flops", "metric", "recovered", "seconds", "error"):
            if key in p:
                row[key] = p[key]
        rows.append(row)
    return rows


def write_csv(path: str | os.PathLike, report: Mapping[str, Any]) -> None:
    """The points as CSV, written atomically."""
    rows = sweep_rows(report)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, text.getvalue().encode())
