"""The automatic-ratio search: channel-count levels, the pair frontier, the pair refinement
(checked against brute force on small synthetic problems) and the search on the demo."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from engine.options import LAYER_NORMS, PruningOptions
from engine.pipeline import apply, prune_unverified
from engine.quality.evaluate import load_calibration_data, load_eval_data
from engine.quality.targets import ratios_for_target
from engine.scoring.analysis import plan
from engine.scoring.auto_ratios import pair_frontier, ratio_levels, refine_pairs

ASSETS = Path(__file__).resolve().parent.parent / "assets"
NAMES = ("a", "b", "c")
LEVELS = {"a": [0.0, 0.25, 0.5, 0.75], "b": [0.0, 0.2, 0.4, 0.6, 0.8], "c": [0.0, 0.5, 0.9]}
WEIGHT = {"a": 0.5, "b": 0.3, "c": 0.4}


def removal(ratios: dict[str, float]) -> float:
    """Monotone in every ratio and not additive (a and b share a layer)."""
    a, b, c = (ratios[n] for n in NAMES)
    return WEIGHT["a"] * a + WEIGHT["b"] * b + WEIGHT["c"] * c - 0.2 * a * b


def rugged_loss(seed: int):
    """A loss with no structure at all: one random value per assignment."""
    rng = np.random.default_rng(seed)
    table = {key: float(rng.random()) for key in itertools.product(*LEVELS.values())}
    return lambda ratios: table[tuple(ratios[n] for n in NAMES)]


def all_assignments():
    for values in itertools.product(*LEVELS.values()):
        yield dict(zip(NAMES, values))


def brute_frontier(state, a, b, target):
    """Points differing from `state` in a and b, meeting the target, whose b is the least
    level of b that does: found by trying every pair of levels."""
    out = []
    for ra in LEVELS[a]:
        ok = [rb for rb in LEVELS[b] if removal({**state, a: ra, b: rb}) >= target]
        if ok:
            out.append({**state, a: ra, b: min(ok)})
    return out


@pytest.mark.parametrize("target", [0.2, 0.35, 0.5, 0.7])
def test_the_pair_frontier_is_every_least_point_meeting_the_target(target):
    for state in all_assignments():
        for a, b in itertools.permutations(NAMES, 2):
            got = pair_frontier(LEVELS, state, a, b, target, removal)
            assert got == brute_frontier(state, a, b, target)


def _greedy_like_start(target):
    """A valid start: the assignment meeting the target with the least removal."""
    feasible = [s for s in all_assignments() if removal(s) >= target]
    return min(feasible, key=lambda s: (removal(s), tuple(s.values())))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("target", [0.3, 0.5])
def test_refinement_meets_the_target_never_loses_and_ends_at_a_pair_optimum(seed, target):
    loss = rugged_loss(seed)
    start = _greedy_like_start(target)
    state, value, trail = refine_pairs(LEVELS, start, target, removal, loss)
    assert removal(state) >= target
    assert value == loss(state) <= loss(start)
    assert [t["loss"] for t in trail] == sorted((t["loss"] for t in trail), reverse=True)
    # no pair frontier around the end point holds anything better (brute force)
    for a, b in itertools.combinations(NAMES, 2):
        assert all(loss(p) >= value for p in brute_frontier(state, a, b, target))
    again = refine_pairs(LEVELS, start, target, removal, loss)
    assert again == (state, value, trail)


def test_refinement_jumps_over_worse_neighbours():
    """The demo's shape: one level along the pair is worse, two levels much better."""
    target = 0.2
    start = {"a": 0.0, "b": 0.8, "c": 0.0}
    between = {"a": 0.25, "b": 0.4, "c": 0.0}  # the one-level move: worse
    good = {"a": 0.5, "b": 0.0, "c": 0.0}
    assert brute_frontier(start, "a", "b", target)[:3] == [start, between, good]

    def loss(ratios):
        if ratios == good:
            return 0.1
        return 0.5 if ratios == start else 0.9

    state, value, _ = refine_pairs(LEVELS, start, target, removal, loss)
    assert (state, value) == (good, 0.1)


@pytest.mark.parametrize("seed", range(4))
def test_screened_refinement_only_moves_on_a_measured_improvement(seed):
    target = 0.4
    loss = rugged_loss(seed)
    rng = np.random.default_rng(100 + seed)
    noise = {tuple(s.values()): float(rng.normal(0, 0.2)) for s in all_assignments()}
    measured: list[dict] = []

    def counted(ratios):
        measured.append(dict(ratios))
        return loss(ratios)

    start = _greedy_like_start(target)
    state, value, trail = refine_pairs(LEVELS, start, target, removal, counted,
                                       screen_of=lambda r: loss(r) + noise[tuple(r.values())],
                                       confirm=1)
    assert removal(state) >= target
    assert value == loss(state) <= loss(start)
    for step in trail:  # every move was confirmed by the real loss
        assert step["ratios"] in measured
    # one confirmation per pair and pass at most, plus the start
    passes = len(trail) + 1
    assert len({tuple(m.values()) for m in measured}) <= 1 + 3 * passes


def test_the_evaluation_budget_is_respected():
    loss = rugged_loss(7)
    seen: set[tuple] = set()

    def counted(ratios):
        seen.add(tuple(ratios.values()))
        return loss(ratios)

    start = _greedy_like_start(0.5)
    refine_pairs(LEVELS, start, 0.5, removal, counted, max_evals=3)
    assert len(seen - {tuple(start.values())}) <= 3

    asked: set[tuple] = set()

    def counted_removal(ratios):
        asked.add(tuple(ratios.values()))
        return removal(ratios)

    for budget in range(8):
        asked.clear()
        state, value, _ = refine_pairs(LEVELS, start, 0.5, counted_removal, loss,
                                       max_removals=budget)
        assert len(asked) <= budget
        assert removal(state) >= 0.5 and value == loss(state) <= loss(start)


# ----------------------------------------------------------------------- on the demo
@pytest.fixture(scope="module")
def demo():
    return engine.analyze("demo")


def test_levels_are_the_distinct_channel_counts_of_the_step_rule(demo):
    options = PruningOptions()
    groups = demo.prunable_groups(options.prunes_whole_blocks)
    sizes = {g.name: g.channels for g in groups}

    def counts_at(r):
        the_plan = plan(demo, options, ratios=dict.fromkeys(sizes, r))
        return {g.name: len(g.pruned) for g in the_plan.groups}

    levels = ratio_levels(counts_at, sizes)
    for g in groups:
        # brute force: every ratio k/n, one plan per group, keep the first of each count
        first: dict[int, float] = {}
        for k in range(g.channels):
            r = k / g.channels
            if r > 0.95:
                break
            count = len(plan(demo, options, ratios={g.name: r}).group(g.name).pruned)
            first.setdefault(count, r)
        assert levels[g.name] == pytest.approx(sorted(first.values()))
        # the demo's groups are 4 blocks of 16, kept per block in steps of 2: 8 levels
        assert len(levels[g.name]) == 8


def test_unverified_pruning_is_the_applied_model(demo):
    names = [g.name for g in demo.prunable_groups(False)]
    the_plan = plan(demo, {}, ratios=dict(zip(names, (0.1, 0.5, 0.45, 0.7))))
    gm, metrics = prune_unverified(demo, the_plan)
    result = apply(demo, the_plan)
    assert metrics == result.after
    x = torch.from_numpy(load_calibration_data("demo").inputs[0][:64])
    with torch.no_grad():
        assert torch.equal(gm(x), result.module(x))


@pytest.fixture(scope="module")
def demo_search(demo):
    """The search at 50% of the FLOPs on the calibration split, from the stored curves."""
    curves = json.loads((ASSETS / "demo_sensitivity.json").read_text())
    calib = load_calibration_data("demo")
    return ratios_for_target("demo", {}, target_flops=0.5, sensitivity_data=calib,
                             sensitivity_report=curves, analysis=demo)


@pytest.fixture(scope="module")
def demo_search_applied(demo, demo_search):
    """The search's ratios applied for real (verified), once for the tests that read it;
    they only read it (the pruned module is not modified)."""
    return apply(demo, plan(demo, {}, ratios=demo_search["ratios"]))


@pytest.mark.slow
def test_the_search_on_the_demo_meets_the_target_and_reports_its_calibration_loss(
        demo, demo_search, demo_search_applied):
    calib = load_calibration_data("demo")
    section = demo_search
    search = section["search"]
    result = demo_search_applied
    removed = 1 - result.after["flops"] / result.before["flops"]
    assert removed >= 0.5 and removed == pytest.approx(section["removed"])
    assert search["loss"] <= search["greedy_loss"]
    # the reported calibration loss is the chosen model's accuracy there (independently)
    with torch.no_grad():
        logits = result.module(torch.from_numpy(calib.inputs[0]))
    accuracy = float((logits.argmax(1).numpy() == calib.labels).mean())
    assert -search["loss"] == pytest.approx(accuracy)
    assert section["sensitivity"]["data"] == calib.source


def _held_out_accuracy(module) -> float:
    """Top-1 accuracy on the demo's held-out set, computed here."""
    data = load_eval_data("demo")
    with torch.no_grad():
        logits = module(torch.from_numpy(data.inputs[0]))
    return float((logits.argmax(1).numpy() == data.labels).mean())


def _smallest_global_ratio(analysis, options: dict, target: float) -> float:
    """The smallest global ratio removing at least `target` of the FLOPs (bisection to 1e-4;
    the removal only grows with the ratio)."""
    before = prune_unverified(analysis, plan(analysis, options, ratio=0.0))[1]
    flops: dict[tuple, float] = {}  # by the channels pruned: ratios that round alike, once

    def removed(r: float) -> float:
        the_plan = plan(analysis, options, ratio=r)
        key = tuple(tuple(g.pruned.tolist()) for g in the_plan.groups)
        if key not in flops:
            flops[key] = prune_unverified(analysis, the_plan)[1]["flops"]
        return 1 - flops[key] / before["flops"]

    lo, hi = 0.0, 0.95
    assert removed(hi) >= target
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if removed(mid) >= target else (mid, hi)
    return hi


@pytest.mark.slow
def test_auto_ratios_beat_the_best_global_ratio_by_ten_points_at_half_the_flops(
        demo, demo_search, demo_search_applied):
    """The README's claim: at 50% of the FLOPs removed, the automatic ratios (chosen on the
    calibration split) beat every layer norm's global ratio by at least 10 points of held-out
    accuracy, and the pair refinement ends below the greedy's loss."""
    search = demo_search["search"]
    assert search["loss"] < search["greedy_loss"]
    auto = demo_search_applied
    assert 1 - auto.after["flops"] / auto.before["flops"] >= 0.5
    auto_accuracy = _held_out_accuracy(auto.module)
    greedy = apply(demo, plan(demo, {}, ratios=search["greedy_ratios"]))
    assert _held_out_accuracy(greedy.module) < auto_accuracy
    best_global = 0.0
    for layer_norm in LAYER_NORMS:
        options = {"layer_norm": layer_norm}
        ratio = _smallest_global_ratio(demo, options, 0.5)
        flat = apply(demo, plan(demo, options, ratio=ratio))
        assert 1 - flat.after["flops"] / flat.before["flops"] >= 0.5
        best_global = max(best_global, _held_out_accuracy(flat.module))
    assert auto_accuracy >= best_global + 0.10, (auto_accuracy, best_global)
