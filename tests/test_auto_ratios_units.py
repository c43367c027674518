"""The automatic-ratio search's building blocks on tiny synthetic curves (no model, each test
milliseconds): the target check, the interpolated tables, the knapsack against brute force,
the shortfall loop, the global-ratio bisection and the measured greedy, with every expected
value worked out by hand. Part of the `auto-ratios` mutation target (bench/mutation.py); the
search on the demo (test_auto_ratios.py, `slow`) checks the whole."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from engine.errors import OptionError
from engine.scoring import auto_ratios
from engine.scoring.auto_ratios import (
    check_target,
    choose_ratios,
    fit_ratios,
    greedy_measured,
    group_tables,
    uniform_ratio,
)


@pytest.mark.parametrize(("value", "expected"), [("0.5", 0.5), (0.01, 0.01), (0.99, 0.99)])
def test_a_target_is_a_fraction_strictly_between_zero_and_one(value, expected):
    assert check_target(value, "--target-flops") == expected


@pytest.mark.parametrize(("value", "message"), [
    (0, "--target-flops=0 is out of range; allowed: 0 < target < 1 (the fraction to remove)"),
    (1.0, "--target-flops=1.0 is out of range; allowed: 0 < target < 1 (the fraction to "
          "remove)"),
    ("half", "--target-flops='half' is not a number; allowed: 0 < target < 1 (the fraction "
             "to remove)"),
    (None, "--target-flops=None is not a number; allowed: 0 < target < 1 (the fraction to "
           "remove)"),
])
def test_a_bad_target_is_one_line_naming_the_flag(value, message):
    with pytest.raises(OptionError) as info:
        check_target(value, "--target-flops")
    assert str(info.value) == message


def _curve(points):
    """(ratio, drop, params left of 100) -> a sensitivity curve."""
    return [{"ratio": r, "drop": d, "params": p, "flops": 2 * p} for r, d, p in points]


def test_group_tables_interpolate_the_sorted_curve_made_non_decreasing():
    # unsorted; the drop dips at 0.5 (0.3 -> 0.2) and is negative at 0: made 0.3 and 0
    sensitivity = {"before": {"params": 100.0, "flops": 200.0}, "groups": [
        {"name": "a", "curve": _curve([(0.5, 0.2, 80.0), (0.0, -0.1, 100.0),
                                       (0.25, 0.3, 90.0)])},
        {"name": "b", "curve": _curve([(0.0, 0.0, 100.0), (0.9, 0.6, 10.0)])},
    ]}
    tables = group_tables(sensitivity, "params")
    cand, loss, removed = tables["a"]
    np.testing.assert_allclose(cand, np.arange(0, 0.501, 0.025), atol=1e-12)
    at = {round(float(c), 4): (float(lo), float(rm)) for c, lo, rm in zip(cand, loss, removed)}
    assert at[0.0] == pytest.approx((0.0, 0.0))
    assert at[0.125] == pytest.approx((0.15, 0.05))
    assert at[0.375] == pytest.approx((0.3, 0.15))
    assert at[0.5] == pytest.approx((0.3, 0.2))
    cand, loss, removed = tables["b"]
    assert len(cand) == 37 and float(cand[-1]) == pytest.approx(0.9)
    assert float(loss[12]) == pytest.approx(0.2) and float(removed[12]) == pytest.approx(0.3)
    # FLOPs: the same fractions of 200
    assert float(group_tables(sensitivity, "flops")["a"][2][-1]) == pytest.approx(0.2)


def _knapsack_problem():
    """Three groups on the ratios 0, .25, .5, .75 (params left, drop), made up."""
    curves = {
        "a": [(0.0, 0.0, 100.0), (0.25, 0.01, 92.0), (0.5, 0.05, 85.0), (0.75, 0.2, 77.0)],
        "b": [(0.0, 0.0, 100.0), (0.25, 0.04, 88.0), (0.5, 0.06, 76.0), (0.75, 0.3, 64.0)],
        "c": [(0.0, 0.0, 100.0), (0.25, 0.005, 95.0), (0.5, 0.1, 90.0), (0.75, 0.11, 83.0)],
    }
    return {"before": {"params": 100.0},
            "groups": [{"name": n, "curve": _curve(c)} for n, c in curves.items()]}


def _brute_force(sensitivity, target):
    """Every combination of the four ratios: the least summed drop whose summed removal
    (counted in 0.1% units, as the search resolves it) reaches the target."""
    per = {g["name"]: {c["ratio"]: (c["drop"], (100 - c["params"]) / 100) for c in g["curve"]}
           for g in sensitivity["groups"]}
    best = None
    for combo in itertools.product([0.0, 0.25, 0.5, 0.75], repeat=3):
        loss = sum(per[n][r][0] for n, r in zip("abc", combo))
        units = sum(math.floor(per[n][r][1] * 1000 + 1e-9) for n, r in zip("abc", combo))
        if units >= math.ceil(target * 1000 - 1e-9) and (best is None or loss < best[0] - 1e-12):
            best = (loss, dict(zip("abc", combo)))
    return best


@pytest.mark.parametrize("target", [0.05, 0.13, 0.2, 0.3, 0.4, 0.49, 0.76])
def test_choose_ratios_is_the_brute_force_optimum(target):
    sensitivity = _knapsack_problem()
    candidates = np.array([0.0, 0.25, 0.5, 0.75])
    choice = choose_ratios(sensitivity, "params", target, candidates)
    loss, ratios = _brute_force(sensitivity, target)
    assert choice.predicted_loss == pytest.approx(loss, abs=1e-12)
    assert list(choice.ratios) == ["a", "b", "c"]
    per = {g["name"]: {c["ratio"]: (c["drop"], (100 - c["params"]) / 100)
                       for c in g["curve"]} for g in sensitivity["groups"]}
    assert sum(per[n][r][0] for n, r in choice.ratios.items()) == pytest.approx(loss)
    removed = sum(per[n][r][1] for n, r in choice.ratios.items())
    assert choice.predicted_removed == pytest.approx(removed) and removed >= target - 1e-9
    assert choice.ratios == ratios  # no ties in this problem


def test_choose_ratios_by_hand():
    # 30% of the params: a .25 (8, drop .01) + b .5 (24, .06) = 32, drop .07, is the least
    # (a .5 + c .75: .16; a .25 + b .25 + c .5: .15; b .5 + c .25 removes only 29)
    choice = choose_ratios(_knapsack_problem(), "params", 0.3,
                           np.array([0.0, 0.25, 0.5, 0.75]))
    assert choice.ratios == {"a": 0.25, "b": 0.5, "c": 0.0}
    assert choice.predicted_loss == pytest.approx(0.07)
    assert choice.predicted_removed == pytest.approx(0.32)


def test_choose_ratios_refuses_an_unreachable_target_and_an_unknown_resource():
    with pytest.raises(OptionError) as info:
        choose_ratios(_knapsack_problem(), "params", 0.8, np.array([0.0, 0.25, 0.5, 0.75]))
    assert str(info.value) == ("the target removes 80% of the params, but pruning every group "
                               "as far as its curve goes removes at most 76%")
    with pytest.raises(OptionError) as info:
        choose_ratios(_knapsack_problem(), "memory", 0.3)
    assert str(info.value) == ("resource 'memory' is not allowed; allowed: "
                               "('params', 'flops', 'latency')")


def test_fit_ratios_raises_the_aim_by_the_shortfall_until_the_measure_meets_the_target(
        monkeypatch):
    """The measured removal is 0.04 below the curves' sum: the first choice (aim .3: a .25
    + b .5, removal .32, measured .28) falls short by .02, so the aim becomes
    .3 + .02 + .001 = .321, and the brute-force choice for .321 is met for real."""
    sensitivity = _knapsack_problem()
    aims, measured = [], []
    grid = np.array([0.0, 0.25, 0.5, 0.75])

    def choose(s, resource, aim):
        aims.append(aim)
        return choose_ratios(s, resource, aim, grid)

    def measure(ratios, ratio):
        assert ratio is None
        left = {g["name"]: {c["ratio"]: c["params"] for c in g["curve"]}
                for g in sensitivity["groups"]}
        measured.append(sum(100 - left[n][r] for n, r in ratios.items()) / 100 - 0.04)
        return measured[-1]

    monkeypatch.setattr(auto_ratios, "choose_ratios", choose)
    choice, achieved = fit_ratios(sensitivity, "params", 0.3, measure)
    assert aims == pytest.approx([0.3, 0.321])
    assert measured[0] == pytest.approx(0.28)
    loss, _ = _brute_force(sensitivity, 0.321)
    assert choice.predicted_loss == pytest.approx(loss)
    assert achieved == measured[1] and achieved >= 0.3


def test_fit_ratios_gives_up_after_six_rounds_in_one_line():
    """The measure always says 19%: the aim rises by .011 a round, six rounds, then one
    line."""
    calls = []

    def measure(ratios, ratio):
        calls.append(ratios)
        return 0.19

    with pytest.raises(OptionError) as info:
        fit_ratios(_knapsack_problem(), "params", 0.2, measure)
    assert len(calls) == 6
    assert str(info.value) == ("could not reach 20% of the params removed with per-group "
                               "ratios (reached 19.0%); try more sensitivity ratios")


def test_uniform_ratio_is_the_smallest_global_ratio_meeting_the_target():
    """removal = ratio^2: the target .25 needs ratio .5; bisection of [0, .99] to 1e-3."""
    calls = []

    def measure(ratios, ratio):
        assert ratios is None
        calls.append(ratio)
        return ratio ** 2

    ratio, removed = uniform_ratio("params", 0.25, measure)
    assert 0.5 <= ratio <= 0.501
    assert 0.25 <= removed == pytest.approx(ratio ** 2, abs=1e-4)
    assert calls[0] == 0.99 and calls[1] == pytest.approx(0.495)
    assert len(calls) == 1 + 10  # 0.99 / 2^10 < 1e-3 <= 0.99 / 2^9
    assert ratio == round(ratio, 4)


def test_uniform_ratio_refuses_a_target_no_global_ratio_meets():
    with pytest.raises(OptionError) as info:
        uniform_ratio("flops", 0.6, lambda ratios, ratio: 0.5)
    assert str(info.value) == ("a global ratio of 0.99 removes only 50% of the flops; the "
                               "target 60% cannot be met with a global ratio")


# -------------------------------------------------------------------------- the greedy

SLOPE = {"free": 0.5, "costly": 0.5}  # removal per unit ratio
COST = {"free": 0.0, "costly": 1.0}  # loss per unit ratio


def _greedy_sensitivity():
    ratios = [0.0, 0.3, 0.6, 0.9]
    return {"before": {"params": 1.0}, "groups": [
        {"name": n, "curve": [{"ratio": r, "drop": COST[n] * r, "params": 1 - SLOPE[n] * r}
                              for r in ratios]} for n in ("costly", "free")]}


def _measure(ratios, ratio):
    return sum(SLOPE[n] * r for n, r in ratios.items())


def _loss(ratios):
    return sum(COST[n] * r for n, r in ratios.items())


def test_greedy_takes_the_free_group_first_then_shortens_the_last_step():
    """`free` costs nothing: it goes to 0.6 in steps of 0.1 (removal .3); .33 needs .06 of
    `costly`, whose step .1 overshoots and is bisected in [0, .1] to .005: .05 (.325, low),
    .075 (.3375, high), .0625 (.33125, high), .05625 (low), .059375 (low): .0625."""
    levels = {"free": [0.0, 0.2, 0.4, 0.6], "costly": [0.0, 0.2, 0.4, 0.6, 0.8]}
    ratios, removed, trail = greedy_measured(_greedy_sensitivity(), "params", 0.33, _measure,
                                             _loss, steps=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6))
    assert ratios == {"costly": 0.0625, "free": 0.6}
    assert removed == pytest.approx(0.33125)
    assert [(t["group"], t["ratio"]) for t in trail] == [
        ("free", 0.1), ("free", 0.2), ("free", 0.3), ("free", 0.4), ("free", 0.5),
        ("free", 0.6), ("costly", 0.0625)]
    assert trail[-1]["removed"] == pytest.approx(0.33125)
    assert trail[-1]["loss"] == pytest.approx(0.0625)
    # with channel-count levels a step is one level and the last one is not shortened; a
    # free step ends its round (nothing measured after it can be better): the loss is
    # measured once at the start and once a round
    losses = []

    def loss(ratios):
        losses.append(ratios)
        return _loss(ratios)

    ratios, removed, trail = greedy_measured(_greedy_sensitivity(), "params", 0.33, _measure,
                                             loss, levels=levels)
    assert len(losses) == 1 + 4
    assert ratios == {"costly": 0.2, "free": 0.6} and removed == pytest.approx(0.4)
    assert [(t["group"], t["ratio"]) for t in trail] == [
        ("free", 0.2), ("free", 0.4), ("free", 0.6), ("costly", 0.2)]
    assert [t["loss"] for t in trail] == pytest.approx([0.0, 0.0, 0.0, 0.2])


def test_greedy_skips_a_step_that_removes_nothing():
    """`free` removes nothing at .2 (the step rule swallows it): the step goes on to .4."""

    def measure(ratios, ratio):
        r = ratios["free"]
        return SLOPE["free"] * (0.0 if r < 0.3 else r) + SLOPE["costly"] * ratios["costly"]

    levels = {"free": [0.0, 0.2, 0.4, 0.6], "costly": [0.0, 0.2, 0.4]}
    ratios, removed, trail = greedy_measured(_greedy_sensitivity(), "params", 0.2, measure,
                                             _loss, levels=levels)
    assert ratios == {"costly": 0.0, "free": 0.4} and removed == pytest.approx(0.2)
    assert [(t["group"], t["ratio"]) for t in trail] == [("free", 0.4)]


def test_greedy_picks_the_cheaper_loss_per_removed_unit():
    """Both groups cost; `b` removes twice as much per unit of loss: it goes first."""
    slope, cost = {"a": 0.2, "b": 0.4}, {"a": 1.0, "b": 1.0}
    sensitivity = {"before": {"params": 1.0}, "groups": [
        {"name": n, "curve": [{"ratio": r, "drop": cost[n] * r, "params": 1 - slope[n] * r}
                              for r in (0.0, 0.5, 1.0)]} for n in ("a", "b")]}
    levels = {"a": [0.0, 0.5], "b": [0.0, 0.5, 1.0]}

    def measure(ratios, ratio):
        return sum(slope[n] * r for n, r in ratios.items())

    def loss(ratios):
        return sum(cost[n] * r for n, r in ratios.items())

    ratios, removed, trail = greedy_measured(sensitivity, "params", 0.5, measure, loss,
                                             levels=levels)
    # b .5 (.2), b 1.0 (.4), then only a is left: a .5 (.5)
    assert [(t["group"], t["ratio"]) for t in trail] == [("b", 0.5), ("b", 1.0), ("a", 0.5)]
    assert ratios == {"a": 0.5, "b": 1.0} and removed == pytest.approx(0.5)
    with pytest.raises(OptionError) as info:
        greedy_measured(sensitivity, "params", 0.7, measure, loss, levels=levels)
    assert str(info.value) == ("could not reach 70% of the params removed with per-group "
                               "ratios (reached 50.0%)")


# ------------------------------------------------- what the mutation run left unguarded
# (bench/RESULTS.md, "Mutation testing": each test names the survivors it was written for)


def test_choose_ratios_takes_the_smaller_ratio_among_equal_predicted_losses():
    """`a` costs nothing up to .5: .25 and .5 both meet 5% at a predicted loss of 0; the
    knapsack keeps the first (smaller) ratio. (choose_ratios 83: `<=` took the later one.)"""
    sensitivity = {"before": {"params": 100.0}, "groups": [
        {"name": "a", "curve": _curve([(0.0, 0.0, 100.0), (0.25, 0.0, 92.0),
                                       (0.5, 0.0, 85.0), (0.75, 0.1, 77.0)])},
        {"name": "b", "curve": _curve([(0.0, 0.0, 100.0), (0.25, 0.05, 90.0)])},
    ]}
    choice = choose_ratios(sensitivity, "params", 0.05, np.array([0.0, 0.25, 0.5, 0.75]))
    assert choice.ratios == {"a": 0.25, "b": 0.0}
    assert choice.predicted_loss == 0.0 and choice.predicted_removed == pytest.approx(0.08)


def test_a_curve_measured_a_hair_below_a_candidate_still_reaches_it():
    """Measured up to 0.5 - 1e-9 (float noise in a ratio): the table still holds 0.5.
    (group_tables 44: `<` for `<=` against the 1e-9 slack.)"""
    sensitivity = {"before": {"params": 100.0}, "groups": [
        {"name": "a", "curve": _curve([(0.0, 0.0, 100.0), (0.5 - 1e-9, 0.2, 80.0)])}]}
    cand, loss, removed = group_tables(sensitivity, "params")["a"]
    assert float(cand[-1]) == 0.5 and len(cand) == 21
    assert float(loss[-1]) == pytest.approx(0.2) and float(removed[-1]) == pytest.approx(0.2)


def _three_whole_groups():
    """Each group can remove all of the model's params (the predicted sum reaches 300%)."""
    return {"before": {"params": 100.0}, "groups": [
        {"name": n, "curve": _curve([(0.0, 0.0, 100.0), (0.5, 0.1, 50.0), (0.75, 0.2, 0.0)])}
        for n in "abc"]}


def test_fit_ratios_never_aims_at_more_than_999_in_1000(monkeypatch):
    """The measure is stuck at 10%: the aim .6 rises by .501 to 1.101, then is held at .999
    for the remaining rounds. (fit_ratios 15: a cap of 1.999 let it rise to 1.602, ...)"""
    aims = []

    def choose(s, resource, aim):
        aims.append(aim)
        return choose_ratios(s, resource, aim, np.array([0.0, 0.5, 0.75]))

    monkeypatch.setattr(auto_ratios, "choose_ratios", choose)
    with pytest.raises(OptionError, match=r"^could not reach 60% of the params removed .*"
                                          r"\(reached 10\.0%\)"):
        fit_ratios(_three_whole_groups(), "params", 0.6, lambda ratios, ratio: 0.1)
    assert aims == pytest.approx([0.6, 0.999, 0.999, 0.999, 0.999, 0.999])


@pytest.mark.parametrize("short", [0.0, 1e-9])
def test_fit_ratios_accepts_a_removal_at_the_target_or_within_its_1e9_slack(short):
    """Measured exactly at the target, or 1e-9 below it: met in the first round.
    (fit_ratios 20: `>` for `>=`; 21: `target + 1e-9`.)"""
    calls = []

    def measure(ratios, ratio):
        calls.append(ratios)
        return 0.3 - short

    choice, achieved = fit_ratios(_knapsack_problem(), "params", 0.3, measure)
    assert len(calls) == 1 and achieved == 0.3 - short
    assert choice.predicted_removed >= 0.3


def test_uniform_ratio_counts_a_removal_equal_to_the_target_as_met():
    """The removal jumps from 10% to exactly 50% at ratio .3 and the target is 50%: the
    bisection of [0, .99] ends at the first point at or above .3, .99 * 311 / 1024 =
    .30067 (.99 * 310 / 1024 = .29971 is below), rounded to 4 digits.
    (uniform_ratio 9: `<=` refused the target; 21: `>` never lowered `high`; 28: 5 digits.)"""

    def measure(ratios, ratio):
        return 0.5 if ratio >= 0.3 else 0.1

    assert uniform_ratio("params", 0.5, measure) == (0.3007, 0.5)


def test_uniform_ratio_stops_when_the_bracket_is_the_tolerance():
    """removal = ratio, target .2, tolerance .99 / 8: mids .495 (above), .2475 (above),
    .12375 (below) leave [.12375, .2475], exactly the tolerance wide: 1 + 3 measurements.
    (uniform_ratio 12: `>=` measured once more.)"""
    calls = []

    def measure(ratios, ratio):
        calls.append(ratio)
        return ratio

    assert uniform_ratio("params", 0.2, measure, tolerance=0.99 / 8) == (0.2475, 0.2475)
    assert calls == [0.99, 0.495, 0.2475, 0.12375]


# the measured greedy: group -> (removal per unit ratio, drop at .5, drop at 1.0); the curves
# and the measurements agree, so the rates below are each step's drop over its removal
STEPPED = {"g1": (0.02, 0.5, 1.0), "g2": (0.04, 0.7, 3.2), "g3": (0.05, 1.5, 3.0),
           "g4": (0.005, 0.25, 0.5), "g5": (0.02, 2.0, 4.0), "g6": (0.1, 2.0, 4.0)}


def _stepped_sensitivity(groups=STEPPED):
    return {"before": {"params": 1.0}, "groups": [
        {"name": n, "curve": [{"ratio": r, "drop": d, "params": 1 - s * r}
                              for r, d in ((0.0, 0.0), (0.5, half), (1.0, whole))]}
        for n, (s, half, whole) in groups.items()]}


def _stepped_drop(name: str, r: float, groups=STEPPED) -> float:
    _, half, whole = groups[name]
    return float(np.interp(r, [0.0, 0.5, 1.0], [0.0, half, whole]))


def test_greedy_measures_the_four_cheapest_steps_by_the_curves_in_order():
    """Rates (drop / removal) of the first steps: g2 35, g6 40, g1 50, g3 60, g4 100, g5 200;
    g2's second step costs 2.5 / .02 = 125, the others' the same as their first. Round 1
    measures g2 g6 g1 g3 and takes g2; round 2 g6 g1 g3 g4 (g2 is now 125) and takes g6; round
    3 the same and takes g6 to 1.0 (.12 removed); round 4 g1 g3 g4 g2 and takes g1 (.13 >=
    .125). The shortlist is 4 by default.
    (greedy_measured 1: a shortlist of 5; 51, 52, 57, 58: the curves' rate as drop x removal,
    l1 + l0, r1 + r0 or the drop alone; 74, 75: the measured rate with `+`.)"""
    levels = dict.fromkeys(STEPPED, [0.0, 0.5, 1.0])
    trials: list[dict] = []

    def measure(ratios, ratio):
        assert ratio is None
        trials.append(dict(ratios))
        return sum(STEPPED[n][0] * r for n, r in ratios.items())

    def loss(ratios):
        return sum(_stepped_drop(n, r) for n, r in ratios.items())

    ratios, removed, trail = greedy_measured(_stepped_sensitivity(), "params", 0.125, measure,
                                             loss, levels=levels)
    assert [(t["group"], t["ratio"]) for t in trail] == [
        ("g2", 0.5), ("g6", 0.5), ("g6", 1.0), ("g1", 0.5)]
    assert ratios == {"g1": 0.5, "g2": 0.5, "g3": 0.0, "g4": 0.0, "g5": 0.0, "g6": 1.0}
    assert removed == pytest.approx(0.13)
    # the state each round starts from, and the group each measured step changed
    states = [dict.fromkeys(STEPPED, 0.0)]
    for step in trail[:-1]:
        states.append({**states[-1], step["group"]: step["ratio"]})
    assert len(trials) == 4 * 4
    rounds = [[next(n for n in trial if trial[n] != states[k][n])
               for trial in trials[4 * k:4 * k + 4]] for k in range(4)]
    assert rounds == [["g2", "g6", "g1", "g3"], ["g6", "g1", "g3", "g4"],
                      ["g6", "g1", "g3", "g4"], ["g1", "g3", "g4", "g2"]]


def test_greedy_breaks_ties_between_equal_measured_rates_by_the_curves_order():
    """Two identical groups: both steps cost the same per removed unit; the first one
    measured (`x`, by name among equal curve rates) is taken. (greedy_measured 78: `<=`.)"""
    twins = {"x": (0.1, 0.5, 1.0), "y": (0.1, 0.5, 1.0)}
    levels = dict.fromkeys(twins, [0.0, 0.5, 1.0])
    _, _, trail = greedy_measured(
        _stepped_sensitivity(twins), "params", 0.04,
        lambda ratios, ratio: sum(twins[n][0] * r for n, r in ratios.items()),
        lambda ratios: sum(_stepped_drop(n, r, twins) for n, r in ratios.items()),
        levels=levels)
    assert [(t["group"], t["ratio"]) for t in trail] == [("x", 0.5)]


def test_greedy_goes_on_measuring_after_a_cheap_step_that_is_not_free():
    """The curves rank `a` (rate .5) before `b` (.8), but measured `a` costs .6 per unit and
    `b` .3: a cheap step (rate <= 1) that is not free does not end the round, `b` is taken.
    (greedy_measured 82: `rate <= 1.0` stopped after `a`.)"""
    curves = {"a": (1.0, 0.25, 0.5), "b": (1.0, 0.4, 0.8)}
    measured_cost = {"a": 0.6, "b": 0.3}
    levels = dict.fromkeys(curves, [0.0, 0.5, 1.0])
    _, _, trail = greedy_measured(
        _stepped_sensitivity(curves), "params", 0.4,
        lambda ratios, ratio: sum(ratios.values()),
        lambda ratios: sum(measured_cost[n] * r for n, r in ratios.items()), levels=levels)
    assert [(t["group"], t["ratio"]) for t in trail] == [("b", 0.5)]


def test_greedy_moves_to_the_next_group_when_one_removes_nothing_at_every_level():
    """`ghost` looks cheapest on its curve, but no level of it removes anything for real:
    the round goes on to `real`. (greedy_measured 69: `break` ended the round with nothing,
    which is the "could not reach" error.)"""
    curves = {"ghost": (1.0, 0.1, 0.2), "real": (1.0, 0.5, 1.0)}
    levels = dict.fromkeys(curves, [0.0, 0.5, 1.0])
    ratios, removed, trail = greedy_measured(
        _stepped_sensitivity(curves), "params", 0.4,
        lambda ratios, ratio: ratios["real"],
        lambda ratios: sum(_stepped_drop(n, r, curves) for n, r in ratios.items()),
        levels=levels)
    assert [(t["group"], t["ratio"]) for t in trail] == [("real", 0.5)]
    assert removed == 0.5


def test_greedy_without_levels_does_not_shorten_a_step_that_meets_the_target_exactly():
    """removal = ratio / 2 and the target .1: the step to .2 removes exactly .1, so no
    bisection; two measurements in all. (greedy_measured 88: `>=` bisected it anyway.)"""
    calls = []

    def measure(ratios, ratio):
        calls.append(ratios["a"])
        return 0.5 * ratios["a"]

    sensitivity = _stepped_sensitivity({"a": (0.5, 0.1, 0.2)})
    ratios, removed, _ = greedy_measured(sensitivity, "params", 0.1, measure,
                                         lambda ratios: ratios["a"], steps=(0.1, 0.2, 0.3))
    assert (ratios, removed) == ({"a": 0.2}, 0.1)
    assert calls == [0.1, 0.2]


def test_greedy_shortens_the_last_step_to_a_point_exactly_at_the_target():
    """The removal is 5% below ratio .15, exactly the target 10% from .15 to .2, 12% above:
    the step to .2 overshoots and the bisection of [.1, .2] ends at .15 (measured at .15:
    met). (greedy_measured 101: `>` never took a point at the target and stayed at .2.)"""

    def measure(ratios, ratio):
        r = ratios["a"]
        return 0.05 if r < 0.15 else 0.1 if r < 0.2 else 0.12

    ratios, removed, _ = greedy_measured(_stepped_sensitivity({"a": (0.5, 0.1, 0.2)}),
                                         "params", 0.1, measure, lambda ratios: ratios["a"],
                                         steps=(0.1, 0.2, 0.3))
    assert (ratios, removed) == ({"a": 0.15}, 0.1)


def test_greedy_rounds_the_shortened_step_to_four_digits():
    """removal = ratio / 2, target .0512: the step to .2 overshoots; bisecting [.1, .2]
    (.15, .125, .1125, .10625, .103125: all meet it) ends at .103125, which is .1031.
    (greedy_measured 109: 5 digits.)"""
    ratios, _, _ = greedy_measured(_stepped_sensitivity({"a": (0.5, 0.1, 0.2)}), "params",
                                   0.0512, lambda ratios, ratio: 0.5 * ratios["a"],
                                   lambda ratios: ratios["a"], steps=(0.1, 0.2, 0.3))
    assert ratios == {"a": 0.1031}


# ----------------------------------------------------------------- levels and refinement


def test_levels_on_the_exact_grid_start_at_the_first_channel_and_reach_most():
    """A group of 7 and one of 20 channels losing floor(r * n) channels (less a rounding
    slack): a level at every k/7, rounded to 6 digits (1/7 = .142857), and every k/20 up to
    .95 itself (19/20).
    (ratio_levels 10: 7 digits; 12: range(n - 1) lost 19/20; 15: `< most`; 34: the first
    channel not counted; 35: the first grid point skipped.)"""
    for n, want in ((7, [0.0, 0.142857, 0.285714, 0.428571, 0.571429, 0.714286, 0.857143]),
                    (20, [k / 20 for k in range(20)])):
        levels = auto_ratios.ratio_levels(lambda r, n=n: {"g": math.floor(r * n + 1e-5)},
                                          {"g": n})
        assert levels == {"g": want}


def test_levels_keep_the_exact_grid_when_it_has_exactly_grid_size_points():
    """10 channels: k/10 for k = 0..9 is 10 points; with grid_size 10 it is kept.
    (ratio_levels 16: `>=` replaced it by an even grid.)"""
    levels = auto_ratios.ratio_levels(lambda r: {"a": math.floor(r * 10 + 1e-5)}, {"a": 10},
                                      grid_size=10)
    assert levels["a"] == [k / 10 for k in range(10)]


def test_levels_of_a_large_group_use_an_even_grid_of_200_points():
    """300 channels give 286 ratios k/300 <= .95, more than 200: the grid becomes
    .95 * i / 199 (i = 0..199), rounded to 6 digits, and every point adds a channel.
    (ratio_levels 17-30: the even grid broken; 2: a default of 201 points.)"""
    levels = auto_ratios.ratio_levels(lambda r: {"a": math.floor(r * 300 + 1e-5)}, {"a": 300})
    assert levels["a"] == [round(0.95 * i / 199, 6) for i in range(200)]
    assert levels["a"][1] == 0.004774 and levels["a"][-1] == 0.95


QUARTERS = {"a": [0.0, 0.25, 0.5, 0.75], "b": [0.0, 0.25, 0.5, 0.75]}
START = {"a": 0.75, "b": 0.0}  # removal (a + b) / 2 = .375, the target
# the other points of the pair frontier around START, in the order the walk finds them
P1, P2, P3 = {"a": 0.0, "b": 0.75}, {"a": 0.25, "b": 0.5}, {"a": 0.5, "b": 0.25}


def _half_sum(ratios):
    return (ratios["a"] + ratios["b"]) / 2


def _table_loss(values: dict, calls: list | None = None):
    """A loss given per point (any other point: 0.9); `calls` records each evaluation."""
    def loss(ratios):
        if calls is not None:
            calls.append(dict(ratios))
        return next((v for p, v in values if p == ratios), 0.9)
    return loss


def test_the_pair_frontier_keeps_a_point_exactly_at_the_target():
    """removal a + b, target .5: (0, .5), (.25, .25) and (.5, 0) meet it exactly.
    (pair_frontier 7: `< target + 1e-12` dropped (0, .5).)"""
    levels = {"a": [0.0, 0.25, 0.5], "b": [0.0, 0.25, 0.5]}
    got = auto_ratios.pair_frontier(levels, {"a": 0.0, "b": 0.0}, "a", "b", 0.5,
                                    lambda r: r["a"] + r["b"])
    assert got == [{"a": 0.0, "b": 0.5}, {"a": 0.25, "b": 0.25}, {"a": 0.5, "b": 0.0}]


def test_refinement_takes_the_earlier_of_two_equally_good_points_and_records_the_move():
    """P1 and P2 both cost .2 (START .9, P3 .6): the walk's earlier point, P1, is taken; the
    trail entry holds the pair, the ratios, the loss and the measured removal.
    (_refine 45: `<=` took P2; 53, 54, 60, 61: the trail's keys.)"""
    loss = _table_loss([(START, 0.9), (P1, 0.2), (P2, 0.2), (P3, 0.6)])
    state, value, trail = auto_ratios.refine_pairs(QUARTERS, START, 0.375, _half_sum, loss)
    assert (state, value) == (P1, 0.2)
    assert trail == [{"groups": ["a", "b"], "ratios": P1, "loss": 0.2, "removed": 0.375}]


def test_refinement_does_not_move_for_an_equal_or_1e12_better_loss():
    """P2 is better than START by exactly the 1e-12 slack, P1 and P3 equal to it: no move.
    (_refine 40: `<=` took P2; 41: `loss + 1e-12` took an equal point.)"""
    loss = _table_loss([(START, 0.5), (P1, 0.5), (P2, 0.5 - 1e-12), (P3, 0.5)])
    assert auto_ratios.refine_pairs(QUARTERS, START, 0.375, _half_sum, loss) == (START, 0.5, [])


def test_screened_refinement_confirms_the_two_best_screened_points_by_default():
    """Screen = loss: P1 .1, P2 .2, P3 .3 all screen better than START (.9); the two best
    are measured (confirm=2), the move goes to P1, and from P1 nothing screens better.
    (refine_pairs 1: confirm 3; 42: no limit; _refine 35: `here - 1.000000000001` never
    measured anything.)"""
    values = [(START, 0.9), (P1, 0.1), (P2, 0.2), (P3, 0.3)]
    calls: list[dict] = []
    state, value, _ = auto_ratios.refine_pairs(QUARTERS, START, 0.375, _half_sum,
                                               _table_loss(values, calls),
                                               screen_of=_table_loss(values))
    assert (state, value) == (P1, 0.1)
    assert calls == [START, P1, P2]


def test_screened_refinement_does_not_confirm_a_point_that_only_screens_equal():
    """confirm=1, P1 and P2 screen .1 (P1 first): P1 is confirmed and taken; from P1, P2's
    screen only equals P1's, so it is not measured. (_refine 34: `here + 1e-12` measured
    it.)"""
    values = [(START, 0.9), (P1, 0.1), (P2, 0.1), (P3, 0.3)]
    calls: list[dict] = []
    state, _, _ = auto_ratios.refine_pairs(QUARTERS, START, 0.375, _half_sum,
                                           _table_loss(values, calls),
                                           screen_of=_table_loss(values), confirm=1)
    assert state == P1 and calls == [START, P1]


def _wide_pair():
    """Two groups of 400 levels, target .4, a start at a = .8: the pair frontier holds 400
    points; every point but the start costs 1."""
    levels = dict.fromkeys("ab", [k / 400 for k in range(400)])
    start = {"a": 0.8, "b": 0.0}
    return levels, start, lambda ratios: 0.0 if ratios == start else 1.0


def test_refinement_measures_at_most_200_new_points_by_default():
    """(refine_pairs 2: a default of 201.)"""
    levels, start, loss = _wide_pair()
    calls: list[dict] = []

    def counted(ratios):
        calls.append(ratios)
        return loss(ratios)

    state, _, _ = auto_ratios.refine_pairs(levels, start, 0.4, _half_sum, counted,
                                           max_removals=10**6)
    assert state == start and len(calls) == 1 + 200


def test_refinement_stops_after_500_removal_measurements_by_default():
    """The walk along the 400 levels needs more than 500 distinct removals: it stops where
    it is after 500. (refine_pairs 3: a default of 501.)"""
    levels, start, loss = _wide_pair()
    asked: list[dict] = []

    def removal(ratios):
        asked.append(ratios)
        return _half_sum(ratios)

    assert auto_ratios.refine_pairs(levels, start, 0.4, removal, loss) == (start, 0.0, [])
    assert len(asked) == 500
