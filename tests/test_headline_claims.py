"""The claims the README makes about the demo, measured here independently of the code that
makes them: sensitivity equals pruning each group alone and evaluating it; time-budgeted
distillation stays near its budget and returns its best held-back state, not its last.
(The automatic ratios' margin is in test_auto_ratios.py, where the search already runs; the
sweep executors' worker processes and Ray tasks in test_sweep.py.)"""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
from torch import nn

import engine
from engine.quality.evaluate import load_eval_data
from engine.quality.recovery import distill
from engine.quality.recovery.data import CalibrationSet

RATIOS = (0.3, 0.6)


def _accuracy(module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy, computed here rather than by the code under test."""
    with torch.no_grad():
        logits = module(torch.from_numpy(x))
    return float((logits.argmax(1).numpy() == y).mean())


# ------------------------------------------------------------------------ sensitivity
def test_sensitivity_on_the_demo_equals_each_group_pruned_alone_and_evaluated():
    data = load_eval_data("demo")
    x, y = data.inputs[0], data.labels
    report = engine.sensitivity("demo", {}, list(RATIOS), eval_data="demo", workers=1)
    analysis = engine.analyze("demo")
    original = _accuracy(analysis.gm, x, y)
    assert report["original"] == pytest.approx(original)
    names = [g.name for g in analysis.prunable_groups(False)]
    assert [g["name"] for g in report["groups"]] == names
    for group in report["groups"]:
        curve = group["curve"]
        assert [c["ratio"] for c in curve] == [0.0, *RATIOS]
        assert curve[0]["drop"] == 0.0 and curve[0]["metric"] == pytest.approx(original)
        for point in curve[1:]:
            # pruned from one analysis of the demo (the pruning reads it, never changes it)
            alone = engine.prune(analysis, ratios={group["name"]: point["ratio"]})
            accuracy = _accuracy(alone.module, x, y)
            assert point["metric"] == pytest.approx(accuracy, abs=1e-12), group["name"]
            assert point["drop"] == pytest.approx(original - accuracy, abs=1e-12)
            assert point["params"] == alone.after["params"]
            assert point["flops"] == alone.after["flops"]
            assert point["flops"] < report["before"]["flops"]
    assert _accuracy(analysis.gm, x, y) == original  # the shared analysis is untouched
    # the curves differ: each point pruned its own group, not the same one
    assert len({tuple(c["metric"] for c in g["curve"]) for g in report["groups"]}) > 1


# ----------------------------------------------------------------------- distillation
@pytest.fixture(scope="module")
def pruned():
    return engine.prune("demo", ratio=0.5)


@pytest.fixture(scope="module")
def calib() -> dict[str, np.ndarray]:
    from engine.quality.evaluate import load_calibration_data

    data = load_calibration_data("demo")
    return {"x": data.inputs[0], "y": data.labels}


@pytest.mark.slow
def test_budgeted_distillation_stays_near_its_budget(pruned, calib):
    """`distill` with a time budget (the default way it runs, 30 s; 3 s here)."""
    data = load_eval_data("demo")
    budget = 3.0
    start = time.monotonic()
    recovered = engine.recover(pruned, calib, "distill", budget_s=budget)
    wall = time.monotonic() - start
    info = recovered.report["recovery"]
    # loose: the budget bounds training; teacher outputs and checks come on top, on a
    # machine that may be shared (a loop ignoring the budget runs far longer, or 0 steps)
    assert wall < 4 * budget + 20, wall
    assert info["methods"] == ["distill"] and info["distill"]["steps"] > 0
    before = _accuracy(pruned.module, data.inputs[0], data.labels)
    assert _accuracy(recovered.module, data.inputs[0], data.labels) > before + 0.3


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("budget", [None, 0.5])
def test_distillation_returns_its_best_held_back_state_not_its_last(budget):
    """The held-back samples are labelled by the student as it starts, the training samples
    by a different teacher: every step makes the held-back loss worse, so the best state is
    the first one, and that is what must come back."""
    student = _Linear().eval()
    start = copy.deepcopy(student.state_dict())
    gen = torch.Generator().manual_seed(1)
    x_fit, x_hold = torch.randn(256, 6, generator=gen), torch.randn(64, 6, generator=gen)
    other = nn.Linear(6, 4)
    with torch.no_grad():
        other.weight.copy_(-3 * student.fc.weight)
        fit_teacher = [other(x_fit)]
        hold_teacher = [student(x_hold)]
    moved = []
    details = distill.run(student, CalibrationSet([x_fit]), fit_teacher,
                          CalibrationSet([x_hold]), hold_teacher, seconds=budget,
                          steps=None if budget else 40, seed=0,
                          progress=lambda _msg, _f: moved.append(
                              copy.deepcopy(student.state_dict())))
    assert details["steps"] > 0 and details["best_step"] == 0
    assert details["holdout_loss"] == pytest.approx(0.0, abs=1e-9)
    # training did move the weights (each check saw them elsewhere) ...
    assert moved and not torch.equal(moved[-1]["fc.weight"], start["fc.weight"])
    # ... and the start came back
    for key, value in student.state_dict().items():
        assert torch.equal(value, start[key]), key
    with torch.no_grad():
        assert float(distill.loss([student(x_hold)], hold_teacher, None)) == pytest.approx(
            details["holdout_loss"], abs=1e-9)
