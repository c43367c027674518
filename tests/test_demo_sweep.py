"""The demo's stored sweep and sensitivity curves (assets/, shown by the dashboard at once)
equal fresh measurements."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import engine
from engine.quality.evaluate import load_calibration_data
from engine.quality.sweep import sweep
from engine.quality.sweep_job import point_quality

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def test_stored_sweep_points_equal_a_fresh_sweep():
    stored = json.loads((ASSETS / "demo_sweep.json").read_text())
    assert stored["complete"] and len(stored["points"]) == stored["total"]
    grid = {"layer_norm": "tss_norm,none", "policy": "sum", "criterion": "gm",
            "group_policy": "none"}
    fresh = sweep("demo", grid, [0.3, 0.6], eval_data="demo", workers=1)
    assert fresh["original"] == stored["original"]
    by_key = {(json.dumps(p["options"], sort_keys=True), p["ratio"]): p
              for p in stored["points"]}
    for point in fresh["points"]:
        old = by_key[(json.dumps(point["options"], sort_keys=True), point["ratio"])]
        assert (old["metric"], old["params"], old["flops"]) == \
            (point["metric"], point["params"], point["flops"])


def test_stored_sensitivity_equals_fresh_measurements():
    stored = json.loads((ASSETS / "demo_sensitivity.json").read_text())
    calibration = load_calibration_data("demo")
    assert stored["eval_data"] == calibration.source  # never the evaluation set
    analysis = engine.analyze("demo")
    group = stored["groups"][1]
    for c in group["curve"][2:4]:
        result = engine.apply(analysis, engine.plan(analysis, stored["options"],
                                                    ratios={group["name"]: c["ratio"]}))
        value = point_quality(result, calibration)["value"]
        assert value == pytest.approx(c["metric"], abs=0)
        assert c["drop"] == pytest.approx(stored["original"] - value)
