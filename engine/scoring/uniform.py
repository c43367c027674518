"""Uniform plans: every repeated layer of the same kind loses the same number of channels.

A transformers config describes all layers with one ``intermediate_size``, one number of
heads and key/value heads; a plan that cuts layer 3 deeper than layer 7 has no such config.
``uniform=True`` makes the plan describable:

1. The plan is made as usual (global ranking, per-group ratios, pinned groups).
2. Groups that are the same layer repeated form a *family*: their names are equal once the
   layer numbers are taken out (``model.layers.3.mlp.gate_proj+1`` ->
   ``model.layers.#.mlp.gate_proj+1``) and they have the same channel count and blocks.
3. Each family's per-layer count is chosen from the counts the scores asked for: the sum of
   the counts the ranking asked of its layers (before the step rule), divided by the number
   of layers and rounded to the nearest integer, a tie rounding down (a family of whole
   heads asked for 0, 0, 1, 1 keeps every head rather than losing half of them). The total
   stays close to what the ranking asked for; only its spread over the layers changes.
4. The plan is made again with that count as every family member's own ratio (and every
   other group's count as its ratio), so the step rule and block rules apply equally to
   every layer of a family; each layer still drops its own lowest-scoring channels.

Groups that are not repeated (the hidden stream, a classifier) keep the count the ranking
gave them. Pinned groups stay pinned; explicit removals (criterion ``index``) are not
compatible with uniform counts.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

import numpy as np

from engine.errors import OptionError
from engine.graph.dependency import GroupInfo
from engine.scoring.planning import GroupInput, Plan, make_plan

_LAYER_NUMBER = re.compile(r"(?<=\.)\d+(?=\.)")


def round_half_down(x: float) -> int:
    """Nearest integer, ties down (``ceil(x - 0.5)``; 1e-9 absorbs float noise)."""
    return int(math.ceil(x - 0.5 - 1e-9))


def family_key(group: GroupInput | GroupInfo) -> tuple:
    """Groups with equal keys are one layer kind repeated."""
    if isinstance(group, GroupInput):
        n = len(next(iter(group.raw.values())))
        blocks = None if group.blocks is None else tuple(np.shape(group.blocks))
    else:
        n, blocks = group.channels, None if group.blocks is None else tuple(group.blocks)
        if group.whole_blocks:
            blocks = (n, 1)  # a head is one channel, as in Analysis.group_inputs
    return _LAYER_NUMBER.sub("#", group.name), n, blocks, group.whole_blocks


def families(groups: Iterable[GroupInput | GroupInfo]) -> list[list[str]]:
    """Names of the groups of each family of two or more repeated layers, network order."""
    by_key: dict[tuple, list[str]] = defaultdict(list)
    for g in groups:
        if _LAYER_NUMBER.search(g.name):
            by_key[family_key(g)].append(g.name)
    return [names for names in by_key.values() if len(names) > 1]


def proportional_counts(units: Mapping[str, float], asked: Mapping[str, int],
                        sizes: Mapping[str, int], step: int) -> dict[str, int]:
    """Counts for groups that one config field sets in fixed proportions (`units`: field
    units per channel of each group): the field change closest below the mean the ranking
    asked for at which every group loses a whole number of channels and keeps a multiple of
    `step` (0, nothing removed, when there is none)."""
    want = sum(asked[n] * u for n, u in units.items()) / len(units)
    for change in range(int(math.floor(want)), 0, -1):
        counts = {n: change / u for n, u in units.items()}
        if all(abs(c - round(c)) < 1e-9 and 0 <= round(c) < sizes[n]
               and (sizes[n] - round(c)) % step == 0 for n, c in counts.items()):
            return {n: round(c) for n, c in counts.items()}
    return dict.fromkeys(units, 0)


def merge_sets(sets: list[list[str]], known: Mapping[str, int]) -> list[list[str]]:
    """Overlapping sets of group names joined (names not in `known` dropped)."""
    merged: list[list[str]] = []
    for names in sets:
        names = [n for n in names if n in known]
        overlapping = [m for m in merged if set(m) & set(names)]
        joined = [n for m in overlapping for n in m]
        joined += [n for n in names if n not in joined]
        merged = [m for m in merged if m not in overlapping] + [joined]
    return [m for m in merged if len(m) > 1]


def uniform_plan(
    groups: list[GroupInput],
    options,
    *,
    ratio: float | None = None,
    ratios: Mapping[str, float] | None = None,
    pinned: Iterable[str] = (),
    removals: Mapping[str, np.ndarray] | None = None,
    adjust: Callable[[dict[str, int], dict[str, int]], dict[str, int]] | None = None,
    ties: Iterable[Mapping[str, float] | Iterable[str]] = (),
) -> Plan:
    """A plan in which every family's groups lose the same number of channels.

    ``adjust(counts, sizes)``: a last say on the per-group counts (a config's divisibility
    rules, e.g. a hidden size that must be a multiple of the number of heads).
    ``ties``: more sets of groups that one config field sets (engine/io/hf_config.py), each
    a list (equal counts) or a mapping name -> field units per channel (counts in that
    proportion); they join the families they overlap."""
    if removals:
        raise OptionError("uniform counts are chosen from scores; they cannot be combined "
                          "with criterion index (explicit indices)")
    pinned = [pinned] if isinstance(pinned, str) else list(pinned)
    first = make_plan(groups, options, ratio=ratio, ratios=ratios, pinned=pinned)
    asked = {gp.name: gp.requested for gp in first.groups}
    sizes = {gp.name: gp.n for gp in first.groups}
    per_group = dict(asked)
    pinned_set = set(pinned)
    ties = [t if isinstance(t, Mapping) else dict.fromkeys(t, 1.0) for t in ties]
    units = {name: unit for t in ties for name, unit in t.items()}
    step = options.step_size if options.step_op != "none" else 1
    for names in merge_sets([*families(groups), *(list(t) for t in ties)], sizes):
        free = [n for n in names if n not in pinned_set]
        if not free:
            continue
        if len({units.get(n, 1.0) for n in free}) == 1:
            count = round_half_down(sum(asked[n] for n in free) / len(free))
            per_group.update(dict.fromkeys(free, count))
        else:
            per_group.update(proportional_counts(
                {n: units.get(n, 1.0) for n in free}, asked, sizes, step))
    if adjust is not None:
        per_group = adjust(per_group, sizes)
    second = make_plan(
        groups, options,
        ratios={name: min(count / sizes[name], 1 - 1e-12) for name, count in per_group.items()
                if name not in pinned_set},
        pinned=pinned,
    )
    # keep the user's ratio, per-group ratios and cut line in the plan the report shows
    return replace(second, ratio=first.ratio, ratios=first.ratios, threshold=first.threshold,
                   _by_name={})


def keep_contiguous(plan: Plan, name: str, order: np.ndarray) -> Plan:
    """`plan` with group `name` keeping as many channels as planned, as the best-scoring
    run of consecutive entries of `order` (a config describes rotary frequencies
    j = s..s+k-1 only: engine/io/hf_config.py); unchanged when it loses nothing."""
    gp = plan.group(name)
    k = gp.n - len(gp.pruned)
    if not len(gp.pruned) or k <= 0:
        return plan
    scores = np.asarray(gp.scores, dtype=np.float64)[order]
    sums = np.convolve(scores, np.ones(k), mode="valid")
    start = int(np.argmax(sums))  # the first best run: ties keep the lowest frequencies
    kept = np.sort(np.asarray(order[start:start + k], dtype=np.int64))
    pruned = np.setdiff1d(np.arange(gp.n, dtype=np.int64), kept)
    groups = [replace(g, kept=kept, pruned=pruned) if g.name == name else g
              for g in plan.groups]
    return replace(plan, groups=groups, _by_name={})


def family_counts(plan: Plan, groups: Iterable[GroupInput | GroupInfo]) -> list[dict]:
    """Per family: its layer kind and the channels each of its groups lost (the report)."""
    pruned = {gp.name: int(gp.pruned.size) for gp in plan.groups}
    out = []
    for names in families(groups):
        out.append({
            "kind": _LAYER_NUMBER.sub("#", names[0]),
            "groups": len(names),
            "pruned_per_group": sorted({pruned[n] for n in names}),
        })
    return out
