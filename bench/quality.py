"""6. Quality: what pruning leaves of the demo's accuracy, per criterion, recovery and ratio.

For the demo (and ``demo-lm`` once its assets exist): ``l2`` and every data-aware criterion
x recovery (none; data-light ``bn,bias,lsq,norm``; ``distill`` for 30 s) x ratio (0.2, 0.3,
0.5), default options otherwise. Calibration = the model's own calibration set (the training
split); the metric is measured on its held-out evaluation set, never on calibration data.
Seconds: pruning (plan + apply; the criterion's scores are computed once per criterion and
timed separately) plus the recovery. Recovery needs ``engine.recover``; where the engine has
none yet the recovery rows say so instead of guessing.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

import engine
from bench.common import Goal, Section, md_table
from engine.demo import BUILTINS, builtin_data_path
from engine.scoring.data_aware import DATA_CRITERIA

NAME = "quality"
TITLE = "7. Quality: criteria x recovery x ratio on the demo models"
RATIOS = (0.2, 0.3, 0.5)
CRITERIA = ("l2", *DATA_CRITERIA)
DATA_LIGHT = "bn,bias,lsq,norm"
DISTILL_BUDGET_S = 30.0
RECOVERIES = (("none", None), ("data-light", DATA_LIGHT), ("distill", "distill"))


def _load(name: str, kind: str) -> dict[str, np.ndarray]:
    with np.load(builtin_data_path(name, kind), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _metric(name: str, module: Any) -> tuple[str, float]:
    """(metric, value) on the evaluation set: the engine's evaluate when it exists, else
    top-1 accuracy computed here (the demo is a classifier)."""
    evaluate = getattr(engine, "evaluate", None)
    if evaluate is not None:
        found = evaluate(module, name)
        return found["metric"], float(found["value"])
    data = _load(name, "eval")
    with torch.no_grad():
        logits = module(torch.from_numpy(data["x"]))
    return "accuracy", float((logits.argmax(-1).numpy() == data["y"]).mean())


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if metric in ("accuracy", "agreement") else f"{value:.3g}"


def _recover_function():
    recover = getattr(engine, "recover", None)
    if recover is None:
        try:
            from engine.quality.recovery import recover
        except ImportError:
            return None
    return recover


def _recover(result, calibration: dict, methods: str, quick: bool):
    recover = _recover_function()
    if recover is None:
        return None
    budget = 5.0 if quick else DISTILL_BUDGET_S
    return recover(result, calibration, methods=methods, budget_s=budget)


def measure(name: str, quick: bool) -> tuple[str, list[list[str]], dict]:
    analysis = engine.analyze(name)
    calibration = _load(name, "calibration")
    metric, original = _metric(name, analysis.gm)
    rows = []
    found: dict[tuple[str, str, float], float | None] = {}
    criteria = CRITERIA[:2] if quick else CRITERIA
    for criterion in criteria:
        data = None if criterion == "l2" else calibration
        start = time.perf_counter()
        analysis.filter_scores(criterion, data)
        scoring = time.perf_counter() - start
        for label, methods in RECOVERIES:
            cells = [f"`{criterion}`", label]
            for ratio in RATIOS:
                start = time.perf_counter()
                plan = engine.plan(analysis, {"criterion": criterion}, ratio=ratio,
                                   calibration=data)
                result = engine.apply(analysis, plan)
                if methods is not None:
                    result = _recover(result, calibration, methods, quick)
                seconds = time.perf_counter() - start
                if result is None:
                    found[(criterion, label, ratio)] = None
                    cells.append("TODO (no engine.recover yet)")
                    continue
                value = _metric(name, result.module)[1]
                found[(criterion, label, ratio)] = value
                cells.append(f"{_fmt(metric, value)} ({seconds:.1f} s)")
            cells.append(f"{scoring:.2f} s")
            rows.append(cells)
    return metric, rows, {"original": original, "values": found}


def run(quick: bool = False) -> Section:
    parts = []
    goals = []
    for name in BUILTINS:
        model_path = BUILTINS[name][0]
        if not model_path.is_file():
            parts.append(f"### {name}\n\nnot measured: {model_path.name} is missing (its "
                         f"assets are built by `make {BUILTINS[name][3]}`).")
            continue
        metric, rows, values = measure(name, quick)
        headers = ["criterion", "recovery", *(f"ratio {r}" for r in RATIOS), "scoring"]
        parts.append(
            f"### {name}\n\n{metric} on the held-out evaluation set; original "
            f"{_fmt(metric, values['original'])}. Each cell: {metric} (seconds for plan + "
            f"apply + recovery). Scoring: the criterion's raw scores, computed once and "
            f"reused by every ratio.\n\n{md_table(headers, rows)}"
        )
        if name == "demo":
            goals += _demo_goals(values["values"])
    note = ("Default options (`layer_norm standard_score`, `policy average`), global ratio. "
            f"Data-light = `{DATA_LIGHT}`; distill = `distill` with a {DISTILL_BUDGET_S:.0f} s "
            "budget (5 s with --quick).")
    return Section(NAME, TITLE, note + "\n\n" + "\n\n".join(parts), goals)


def _demo_goals(values: dict) -> list[Goal]:
    light = values.get(("l2", "data-light", 0.5))
    distilled = values.get(("l2", "distill", 0.5))
    return [
        Goal(NAME, "demo at 0.5, l2, data-light recovery >= 90%",
             _fmt("accuracy", light) if light is not None else "recovery not in main yet",
             None if light is None else light >= 0.90),
        Goal(NAME, "demo at 0.5, l2, distill within 30 s >= 98.5%",
             _fmt("accuracy", distilled) if distilled is not None
             else "recovery not in main yet",
             None if distilled is None else distilled >= 0.985),
    ]
