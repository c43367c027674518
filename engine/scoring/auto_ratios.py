"""Automatic per-group ratios: meet a params/FLOPs target with the smallest predicted loss.

The prediction comes from sensitivity curves (one group pruned at a time, metric drop and
params/FLOPs measured at each ratio). Each group's curve is interpolated on a fine ratio grid
(the loss made non-decreasing in the ratio, so noise never makes more pruning look free), and
the choice of one ratio per group is a multiple-choice knapsack: minimise the summed loss
subject to the summed removal reaching the target, solved exactly by dynamic programming over
the removal in small units. Removals of neighbouring groups are not exactly additive (a layer
between two pruned groups loses both its inputs and outputs), so the chosen ratios are applied
for real and the target raised by any shortfall until the measured removal meets it.

Losses do not add up either (two attention groups that each cost little alone can cost a lot
together), so with data at hand `greedy_measured` is used instead: it measures every step it
takes, and uses the curves only to shortlist the steps worth measuring. Its steps are
channel-count levels (`ratio_levels`: ratios that round to the same channels are one model).
The greedy commits early and its end point can sit in a dip whose one-level neighbours are all
worse, so `refine_pairs` then walks each pair of groups' whole frontier of assignments that
still meet the target and moves while the measured loss improves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.errors import OptionError

RESOURCES = ("params", "flops", "latency")
UNITS = 1000  # the removal target is resolved to 0.1% of the model
CANDIDATES = np.round(np.arange(0.0, 0.951, 0.025), 4)


def check_target(value: Any, flag: str) -> float:
    """A target is the fraction to remove: 0 < t < 1."""
    try:
        target = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{flag}={value!r} is not a number; allowed: 0 < target < 1 "
                          "(the fraction to remove)") from None
    if not 0.0 < target < 1.0:
        raise OptionError(f"{flag}={value!r} is out of range; allowed: 0 < target < 1 "
                          "(the fraction to remove)")
    return target


@dataclass
class Choice:
    ratios: dict[str, float]
    predicted_loss: float
    predicted_removed: float  # fraction of the resource, assuming removals add up


def group_tables(sensitivity: Mapping[str, Any], resource: str,
                 candidates: np.ndarray = CANDIDATES) -> dict[str, tuple]:
    """Per group: candidate ratios, predicted loss and removed fraction at each of them."""
    total = float(sensitivity["before"][resource])
    tables = {}
    for g in sensitivity["groups"]:
        curve = sorted(g["curve"], key=lambda c: c["ratio"])
        r = np.array([c["ratio"] for c in curve], dtype=float)
        loss = np.maximum.accumulate(np.maximum([c["drop"] for c in curve], 0.0))
        removed = np.maximum.accumulate(
            np.maximum([(total - c[resource]) / total for c in curve], 0.0))
        cand = candidates[candidates <= r.max() + 1e-9]
        tables[g["name"]] = (cand, np.interp(cand, r, loss), np.interp(cand, r, removed))
    return tables


def choose_ratios(sensitivity: Mapping[str, Any], resource: str, target: float,
                  candidates: np.ndarray = CANDIDATES) -> Choice:
    """One ratio per group with summed predicted removal >= target, least summed loss."""
    if resource not in RESOURCES:
        raise OptionError(f"resource {resource!r} is not allowed; allowed: {RESOURCES}")
    tables = group_tables(sensitivity, resource, candidates)
    need = int(np.ceil(target * UNITS - 1e-9))
    # best[j]: least loss reaching j units of removal (j capped at `need`); pick[g][j]: choice
    best = np.full(need + 1, np.inf)
    best[0] = 0.0
    picks = []
    for cand, loss, removed in tables.values():
        units = np.floor(removed * UNITS + 1e-9).astype(int)
        new = np.full(need + 1, np.inf)
        choice = np.zeros(need + 1, dtype=int)
        for k in range(len(cand)):
            u = min(int(units[k]), need)
            value = best + loss[k]
            reached = np.full(need + 1, np.inf)
            source = np.zeros(need + 1, dtype=int)
            reached[u:need] = value[:need - u]  # j -> j + u below the cap
            source[u:need] = np.arange(need - u)
            low = need - u  # every j from here reaches the cap
            source[need] = low + int(np.argmin(value[low:]))
            reached[need] = value[source[need]]
            better = reached < new
            new[better] = reached[better]
            choice[better] = k * (need + 1) + source[better]
        picks.append(choice)
        best = new
    if not np.isfinite(best[need]):
        most = sum(t[2][-1] for t in tables.values())
        raise OptionError(f"the target removes {target:.0%} of the {resource}, but pruning "
                          f"every group as far as its curve goes removes at most {most:.0%}")
    ratios: dict[str, float] = {}
    j = need
    names = list(tables)
    for g in range(len(names) - 1, -1, -1):
        k, j = divmod(int(picks[g][j]), need + 1)
        ratios[names[g]] = float(tables[names[g]][0][k])
    ratios = {name: ratios[name] for name in names}
    loss = sum(float(np.interp(ratios[n], t[0], t[1])) for n, t in tables.items())
    removed = sum(float(np.interp(ratios[n], t[0], t[2])) for n, t in tables.items())
    return Choice(ratios, loss, removed)


Measure = Callable[[dict[str, float] | None, float | None], float]


def fit_ratios(sensitivity: Mapping[str, Any], resource: str, target: float,
               measure: Measure, rounds: int = 6) -> tuple[Choice, float]:
    """choose_ratios, checked by `measure(ratios, None)` (the removed fraction for real) and
    re-chosen with the target raised by the shortfall until it is met."""
    aim = target
    for _ in range(rounds):
        choice = choose_ratios(sensitivity, resource, min(aim, 0.999))
        achieved = measure(choice.ratios, None)
        if achieved >= target - 1e-9:
            return choice, achieved
        aim += target - achieved + 1.0 / UNITS
    raise OptionError(f"could not reach {target:.0%} of the {resource} removed with per-group "
                      f"ratios (reached {achieved:.1%}); try more sensitivity ratios")


def uniform_ratio(resource: str, target: float, measure: Measure,
                  tolerance: float = 1e-3) -> tuple[float, float]:
    """The smallest global ratio whose measured removal reaches the target (bisection)."""
    low, high = 0.0, 0.99
    high_removed = measure(None, high)
    if high_removed < target:
        raise OptionError(f"a global ratio of {high} removes only {high_removed:.0%} of the "
                          f"{resource}; the target {target:.0%} cannot be met with a global ratio")
    while high - low > tolerance:
        mid = (low + high) / 2
        removed = measure(None, mid)
        if removed >= target:
            high, high_removed = mid, removed
        else:
            low = mid
    return round(high, 4), high_removed


Loss = Callable[[dict[str, float]], float]


def greedy_measured(sensitivity: Mapping[str, Any], resource: str, target: float,
                    measure: Measure, loss_of: Loss, shortlist: int = 4,
                    steps: tuple[float, ...] = tuple(np.round(np.arange(0.1, 0.951, 0.1), 2)),
                    levels: Mapping[str, list[float]] | None = None,
                    ) -> tuple[dict[str, float], float, list[dict]]:
    """Measured greedy: from no pruning, repeatedly take the step (one group to its next
    ratio) that costs the least measured loss per removed unit, until the target is met.

    Only the `shortlist` groups whose next step is cheapest by the sensitivity curves are
    measured each round, so a round costs at most `shortlist` evaluations. With `levels`
    (per group, the ratios that give distinct channel counts: `ratio_levels`) a step is one
    level; otherwise it is the next of `steps` and the last step is shortened by bisection to
    just meet the target. Returns ratios, removal and the trail.
    """
    tables = group_tables(sensitivity, resource)
    ratios = {name: 0.0 for name in tables}
    removed, loss = 0.0, loss_of(ratios)
    trail: list[dict] = []

    def predicted(name: str, r: float) -> tuple[float, float]:
        cand, lo, rem = tables[name]
        return float(np.interp(r, cand, lo)), float(np.interp(r, cand, rem))

    while removed < target - 1e-9:
        options = []
        for name in tables:
            ahead = levels[name] if levels is not None else steps
            nxt = [s for s in ahead if s > ratios[name] + 1e-9]
            if nxt:
                (l0, r0), (l1, r1) = predicted(name, ratios[name]), predicted(name, nxt[0])
                options.append(((l1 - l0) / max(r1 - r0, 1e-9), name, nxt))
        options.sort()
        best = None
        for _, name, nxt in options[:shortlist]:
            for r in nxt:  # a step the step rule swallows removes nothing: take the next
                trial = {**ratios, name: r}
                got = measure(trial, None)
                if got > removed + 1e-9:
                    break
            else:
                continue
            trial_loss = loss_of(trial)
            rate = (trial_loss - loss) / (got - removed)
            if best is None or rate < best[0]:
                best = (rate, name, trial, got, trial_loss)
            if rate <= 0.0:  # free removal: nothing measured later can be much better
                break
        if best is None:
            raise OptionError(f"could not reach {target:.0%} of the {resource} removed with "
                              f"per-group ratios (reached {removed:.1%})")
        _, name, trial, got, trial_loss = best
        if got > target and levels is None:  # shorten the last step to just meet the target
            low, high = ratios[name], trial[name]
            while high - low > 0.005:
                mid = (low + high) / 2
                if measure({**ratios, name: mid}, None) >= target:
                    high = mid
                else:
                    low = mid
            trial = {**ratios, name: round(high, 4)}
            got, trial_loss = measure(trial, None), loss_of(trial)
        ratios, removed, loss = trial, got, trial_loss
        trail.append({"group": name, "ratio": trial[name], "removed": got, "loss": loss})
    return ratios, removed, trail


Removed = Callable[[dict[str, float]], float]


def _memo(fn: Callable[[dict[str, float]], float]) -> Callable[[dict[str, float]], float]:
    cache: dict[tuple, float] = {}

    def call(ratios: dict[str, float]) -> float:
        key = tuple(sorted(ratios.items()))
        if key not in cache:
            cache[key] = fn(ratios)
        return cache[key]

    call.cache = cache  # type: ignore[attr-defined]
    return call


def pair_frontier(levels: Mapping[str, list[float]], state: dict[str, float], a: str, b: str,
                  target: float, removed_of: Removed) -> list[dict[str, float]]:
    """Every assignment that differs from `state` in groups `a` and `b` only, meets the target
    and cannot lower `b` one level without missing it: one point per level of `a` (where
    one exists). Removal grows with each group's level, so the least level of `b` falls as
    the level of `a` rises and one staircase walk finds them all."""
    out = []
    top = len(levels[b]) - 1
    for ra in levels[a]:
        if removed_of({**state, a: ra, b: levels[b][top]}) < target - 1e-12:
            continue
        while top > 0 and removed_of({**state, a: ra, b: levels[b][top - 1]}) >= target - 1e-12:
            top -= 1
        out.append({**state, a: ra, b: levels[b][top]})
    return out


def refine_pairs(levels: Mapping[str, list[float]], start: Mapping[str, float], target: float,
                 removed_of: Removed, loss_of: Loss, screen_of: Loss | None = None,
                 confirm: int = 2, max_evals: int = 200, max_removals: int = 500,
                 ) -> tuple[dict[str, float], float, list[dict]]:
    """Local search after the greedy: move removal between two groups at a time.

    For each pair of groups every point of the pair frontier (`pair_frontier`) is measured
    and the state moves to the best one when it beats the current loss; pairs are visited in
    a fixed order until a full pass moves nothing or `max_evals` new measurements have been
    spent. Removals are not additive and neither are losses, which is why a point two or
    three levels away along a pair frontier can be much better than the greedy's end point
    while its one-level neighbours are worse.

    With `screen_of` (a cheaper estimate of the loss, e.g. on a subset of the data) the
    frontier is screened with it and only the `confirm` best screened points that beat the
    current state's screen are measured with `loss_of`; a move needs `loss_of` to improve.
    `start` must meet the target; the result meets it too and never has a larger loss.
    After `max_removals` new removal measurements (many groups: many pairs) the search stops
    where it is. Deterministic: no randomness; ties keep the current state, then the earlier
    point.
    """
    measured_removal, loss_of = _memo(removed_of), _memo(loss_of)

    def removed_of(ratios: dict[str, float]) -> float:
        if (tuple(sorted(ratios.items())) not in measured_removal.cache  # type: ignore
                and len(measured_removal.cache) >= max_removals):  # type: ignore
            raise _OutOfBudget
        return measured_removal(ratios)

    cheap = _memo(screen_of) if screen_of is not None else loss_of
    names = list(levels)
    state = dict(start)
    loss = loss_of(state)
    trail: list[dict] = []
    spent: set[tuple] = set()

    def budget_left(points: list[dict[str, float]]) -> list[dict[str, float]]:
        kept = []
        for point in points:
            key = tuple(sorted(point.items()))
            if key not in spent:
                if len(spent) >= max_evals:
                    continue
                spent.add(key)
            kept.append(point)
        return kept

    try:
        _refine(names, levels, target, removed_of, loss_of, cheap, screen_of is not None,
                confirm, budget_left, state, loss, trail)
    except _OutOfBudget:
        pass
    if trail:
        state, loss = dict(trail[-1]["ratios"]), trail[-1]["loss"]
    return state, loss, trail


class _OutOfBudget(Exception):
    pass


def _refine(names, levels, target, removed_of, loss_of, cheap, screening, confirm,
            budget_left, state, loss, trail) -> None:
    """refine_pairs' passes; every accepted move is appended to `trail`."""
    state = dict(state)
    moved = True
    while moved:
        moved = False
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                frontier = [p for p in pair_frontier(levels, state, a, b, target, removed_of)
                            if p != state]
                frontier = budget_left(frontier)
                if screening:
                    here = cheap(state)
                    ranked = sorted((cheap(p), k, p) for k, p in enumerate(frontier))
                    frontier = [p for v, _, p in ranked[:confirm] if v < here - 1e-12]
                best = None
                for point in frontier:
                    value = loss_of(point)
                    if value < loss - 1e-12 and (best is None or value < best[0]):
                        best = (value, point)
                if best is not None:
                    loss, state = best
                    moved = True
                    trail.append({"groups": [a, b], "ratios": dict(state), "loss": loss,
                                  "removed": removed_of(state)})


def ratio_levels(counts_at: Callable[[float], dict[str, int]], sizes: Mapping[str, int],
                 most: float = 0.95, grid_size: int = 200) -> dict[str, list[float]]:
    """Per group, the smallest ratio giving each distinct number of removed channels.

    `counts_at(r)` is the number of channels each group loses at per-group ratio r (after
    the step rule and block rules); ratios that round to the same count are the same model,
    so the search only ever tries one of them. The grid holds every k/n of every group size
    n (capped at `grid_size` points, then an even grid)."""
    grid = sorted({round(k / n, 6) for n in sizes.values() if n for k in range(n + 1)
                   if k / n <= most})
    if len(grid) > grid_size:
        grid = [float(x) for x in np.round(np.linspace(0.0, most, grid_size), 6)]
    levels: dict[str, list[float]] = {name: [0.0] for name in sizes}
    last = {name: 0 for name in sizes}
    for r in grid[1:]:
        for name, count in counts_at(r).items():
            if name in levels and count > last[name]:
                levels[name].append(float(r))
                last[name] = count
    return levels
