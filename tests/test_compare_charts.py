"""The "Compare on accuracy" figures on hand-made frames (no model), and the auto-ratio
search on hand-made sensitivity curves against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from dashboard.charts_sweep import (
    PARETO_NAME,
    comparison_figure,
    pareto_mask,
    sensitivity_frame,
    sensitivity_heatmap,
    sweep_frame,
)
from engine.errors import OptionError
from engine.scoring.auto_ratios import check_target, choose_ratios


def _frame() -> pd.DataFrame:
    rows = []
    for k, (norm, accs) in enumerate({"tss_norm": [0.9, 0.7, 0.2],
                                      "none": [0.6, 0.5, 0.1]}.items()):
        for j, (ratio, acc) in enumerate(zip([0.1, 0.3, 0.5], accs)):
            rows.append({"index": 3 * k + j, "layer_norm": norm, "ratio": ratio,
                         "params_kept": 1 - ratio, "flops_kept": 1 - ratio * (1 + k) / 2,
                         "metric": acc})
    return pd.DataFrame(rows)


def test_one_trace_per_value_plus_the_pareto_front_and_the_original_line():
    fig = comparison_figure(_frame(), "layer_norm", "ratio", original=0.99)
    names = [t.name for t in fig.data]
    assert names == ["tss_norm", "none", PARETO_NAME, "original 0.99"]
    assert list(fig.data[0].y) == [0.9, 0.7, 0.2]
    assert list(fig.data[0].customdata) == [0, 1, 2]
    # at every ratio tss_norm is at least as good: the front is tss_norm's three points
    assert sorted(fig.data[2].customdata) == [0, 1, 2]
    assert list(fig.data[3].y) == [0.99, 0.99] and fig.data[3].line.dash == "dash"


def test_pareto_front_against_flops_kept():
    fig = comparison_figure(_frame(), "layer_norm", "flops_kept")
    # flops kept: tss 0.95/0.85/0.75, none 0.9/0.7/0.5. none@0.5 (0.1) is the smallest model;
    # none@0.7 (0.5) beats tss@0.75 (0.2); tss@0.85 (0.7) and tss@0.95 (0.9) are the best larger
    assert sorted(fig.data[-1].customdata) == [0, 1, 4, 5]


def test_pareto_mask_by_hand():
    x = np.array([1.0, 2.0, 3.0, 2.0])
    y = np.array([0.5, 0.6, 0.4, 0.6])
    # smaller x better: (1, .5) and (2, .6) are on the front (twice), (3, .4) is beaten
    assert list(pareto_mask(x, y, smaller_x_better=True)) == [True, True, False, True]
    assert list(pareto_mask(x, y, smaller_x_better=False)) == [False, True, True, True]


def test_frames_from_reports_and_the_heatmap():
    report = {"before": {"params": 100, "flops": 1000},
              "points": [{"index": 0, "options": {"layer_norm": "none"}, "ratio": 0.2,
                          "params": 80, "flops": 500, "metric": 0.5},
                         {"index": 1, "options": {"layer_norm": "none"}, "ratio": 0.4,
                          "error": "bad"}]}
    frame = sweep_frame(report)
    assert frame.to_dict("records") == [{"index": 0, "layer_norm": "none", "ratio": 0.2,
                                         "params": 80, "flops": 500, "params_kept": 0.8,
                                         "flops_kept": 0.5, "metric": 0.5}]
    sens = {"groups": [{"name": "b", "curve": [{"ratio": 0.0, "metric": 1.0, "drop": 0.0},
                                               {"ratio": 0.5, "metric": 0.75, "drop": 0.25}]},
                       {"name": "a", "curve": [{"ratio": 0.5, "metric": 0.9, "drop": 0.1}]}]}
    fig = sensitivity_heatmap(sensitivity_frame(sens))
    assert list(fig.data[0].y) == ["b", "a"]  # network order, not alphabetical
    assert [list(row) for row in fig.data[0].z] == [[0.25], [0.1]]


# ------------------------------------------------------------------------- auto ratios
def _curves(drops: dict[str, list[float]], costs: dict[str, float]) -> dict:
    """Sensitivity curves at ratios 0, 0.5, 0.9; a group removes cost*ratio of the FLOPs."""
    ratios = [0.0, 0.5, 0.9]
    return {"before": {"flops": 1000, "params": 1000},
            "groups": [{"name": g, "curve": [
                {"ratio": r, "drop": d, "flops": 1000 - 1000 * costs[g] * r,
                 "params": 1000 - 1000 * costs[g] * r} for r, d in zip(ratios, [0.0, *ds])]}
                for g, ds in drops.items()]}


def _brute_force(sens: dict, target: float, candidates: np.ndarray) -> float:
    """Least summed interpolated loss over every combination meeting the target."""
    best = np.inf
    tables = []
    for g in sens["groups"]:
        r = [c["ratio"] for c in g["curve"]]
        loss = np.maximum.accumulate([c["drop"] for c in g["curve"]])
        removed = [(1000 - c["flops"]) / 1000 for c in g["curve"]]
        tables.append([(np.interp(c, r, loss), np.interp(c, r, removed)) for c in candidates])
    for combo in itertools.product(*tables):
        if sum(rem for _, rem in combo) >= target - 1e-9:
            best = min(best, sum(lo for lo, _ in combo))
    return best


@pytest.mark.parametrize("target", [0.1, 0.25, 0.4, 0.55])
def test_choose_ratios_finds_the_least_predicted_loss(target):
    sens = _curves({"a": [0.02, 0.5], "b": [0.2, 0.3], "c": [0.01, 0.03]},
                   {"a": 0.5, "b": 0.3, "c": 0.2})
    candidates = np.round(np.arange(0, 0.901, 0.1), 2)
    choice = choose_ratios(sens, "flops", target, candidates)
    assert choice.predicted_removed >= target - 1e-3
    assert choice.predicted_loss == pytest.approx(_brute_force(sens, target, candidates),
                                                  abs=1e-9)


def test_an_unreachable_target_and_targets_outside_the_range_are_one_line():
    sens = _curves({"a": [0.1, 0.2]}, {"a": 0.5})
    with pytest.raises(OptionError, match="at most 45%"):
        choose_ratios(sens, "flops", 0.6)
    for bad in (0, 1, 1.5, -0.2, "x"):
        with pytest.raises(OptionError, match="0 < target < 1"):
            check_target(bad, "--target-flops")
