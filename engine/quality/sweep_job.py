"""One sweep point, as every executor runs it (engine/quality/executors.py).

A `SweepJob` holds what a worker needs besides the point (the model source, the evaluation
data); `run_point` prunes at one point and measures it exactly as `prunescope prune
--eval-data` does. Each worker process analyses the model once and keeps the analysis.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.demo import is_builtin
from engine.device import using
from engine.errors import PruneScopeError
from engine.pipeline import apply
from engine.quality.evaluate import evaluate
from engine.quality.recovery import recover
from engine.scoring.analysis import analyze, plan


@dataclass
class ModelSource:
    """What a worker loads: a name or path it can open, or the .pt2 file's bytes."""

    name: str
    path: str | None = None
    data: bytes | None = field(default=None, repr=False)
    suffix: str = ".pt2"
    trust_pickle: bool = False
    input_shapes: list[tuple[int, ...]] | None = None

    def load(self):
        kwargs = {"trust_pickle": self.trust_pickle, "input_shapes": self.input_shapes}
        if self.data is None:
            return analyze(self.path, **kwargs)
        with tempfile.TemporaryDirectory(prefix="prunescope-worker-") as tmp:
            path = Path(tmp) / f"model{self.suffix}"
            path.write_bytes(self.data)
            return analyze(str(path), **kwargs)

    def with_bytes(self) -> ModelSource:
        """The same source carrying its file, for workers on other machines."""
        if self.data is not None or self.path is None or is_builtin(self.path):
            return self  # a built-in model ships with the engine on every worker
        return ModelSource(self.name, self.path, Path(self.path).read_bytes(),
                           Path(self.path).suffix, self.trust_pickle, self.input_shapes)


@dataclass
class SweepJob:
    """Everything a worker needs besides the point itself (shipped once per worker)."""

    key: str
    model: ModelSource
    eval_data: Any
    metric: str | None
    calibration: Any = None
    recover: str | None = None
    recover_data: Any = None
    recover_steps: int | None = None
    recover_budget: float | None = 30
    device: str | None = None  # where each point's model runs ("cuda" on a Ray GPU worker)
    amp: str | None = None


_WORKER_ANALYSIS: dict[str, Any] = {}


def job_analysis(job: SweepJob):
    """This process's analysis of the job's model (one per process; re-plans are cheap)."""
    if job.key not in _WORKER_ANALYSIS:
        _WORKER_ANALYSIS.clear()
        _WORKER_ANALYSIS[job.key] = job.model.load()
    return _WORKER_ANALYSIS[job.key]


def prime_worker_cache(job: SweepJob, analysis) -> None:
    """Let forked workers (and the serial path) use an analysis this process already has."""
    _WORKER_ANALYSIS.clear()
    _WORKER_ANALYSIS[job.key] = analysis


def point_quality(result, data, metric: str | None = None) -> dict[str, Any]:
    """The metric of a pruned model on evaluation data: the call `quality_report` makes for
    report["quality"]["pruned"] in `prune --eval-data` (the original is the reference)."""
    return evaluate(result, data, metric, reference=result.analysis.captured)


def run_point(job: SweepJob, point: Mapping[str, Any]) -> dict[str, Any]:
    """Prune at one point and measure it (what `prune --eval-data` does), on the job's device.

    `point` holds `options` and either a global `ratio` or per-group `ratios`.
    """
    with using(job.device, job.amp):
        return _run_point(job, point)


def _run_point(job: SweepJob, point: Mapping[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = dict(point)
    analysis = job_analysis(job)  # a worker's first point loads the model: not timed
    start = time.perf_counter()
    try:
        the_plan = plan(analysis, point["options"], ratio=point.get("ratio"),
                        ratios=point.get("ratios"), calibration=job.calibration)
        result = apply(analysis, the_plan)
        record["params"] = result.after["params"]
        record["flops"] = result.after["flops"]
        record["metric"] = point_quality(result, job.eval_data, job.metric)["value"]
        if job.recover:
            record["recovered"] = _recovered_metric(job, result)
    except PruneScopeError as exc:
        record["error"] = str(exc)
    record["seconds"] = round(time.perf_counter() - start, 4)
    # where the point ran: the executors' work is checkable (a pool's points are not this
    # process's; a Ray point also names its task, see engine.quality.executors)
    record["pid"] = os.getpid()
    return record


def _recovered_metric(job: SweepJob, result) -> float:
    # a fixed number of steps (seeded) makes the recovered metric the same on every executor;
    # without it distillation is bounded by its time budget and may differ run to run
    recovered = recover(result, job.recover_data, methods=job.recover, steps=job.recover_steps,
                        budget_s=job.recover_budget)
    return point_quality(recovered, job.eval_data, job.metric)["value"]
