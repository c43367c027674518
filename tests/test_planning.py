"""Planning: the spec's worked example, step rule, group policies, pins, removals, errors.

Every expected index set below is worked out by hand from the listed scores (mostly with
layer_norm='none' so the combined score is the raw score).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from engine.errors import OptionError, PruneScopeError
from engine.options import PruningOptions
from engine.scoring.normalize import ScoreError
from engine.scoring.planning import (
    GroupInput,
    PlanError,
    aligned_kept,
    combine,
    make_plan,
    round_half_up,
)

S_X = np.array([11.0, 19.0, 38.0, 25.0, 46.0])
S_G = np.array([13.0, 22.0, 16.0, 29.0, 17.0])
S_F = np.array([20.0, 12.0, 18.0, 16.0, 39.0])
S_F_ALT = np.array([14.0, 3.0, 26.0, 18.0, 12.0])

G_TSS = [0.1340, 0.2268, 0.1649, 0.2990, 0.1753]
ADD_TSS = {
    "sum": [0.2696, 0.2510, 0.4448, 0.3322, 0.7024],
    "average": [0.1348, 0.1255, 0.2224, 0.1661, 0.3512],
    "backward": [0.1270, 0.1270, 0.2295, 0.1680, 0.3484],
}


def example(s_f=S_F):
    return [
        GroupInput("add", {"conv_x": S_X.copy(), "conv_F": s_f.copy()}),
        GroupInput("G", {"conv_G": S_G.copy()}),
    ]


def tss(policy, **kw):
    return PruningOptions(policy=policy, layer_norm="tss_norm", step_op="none", **kw)


def raw_opts(**kw):
    """Combined score = raw score: expected sets can be read straight off the scores."""
    kw.setdefault("step_op", "none")
    return PruningOptions(layer_norm="none", **kw)


def one(name, scores, **kw):
    return GroupInput(name, {f"{name}.w": np.asarray(scores, dtype=float)}, **kw)


def pruned(plan, name):
    return plan.group(name).pruned.tolist()


# --- the worked example -------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["sum", "average", "backward"])
def test_worked_example_combined_scores(policy):
    plan = make_plan(example(), tss(policy))
    np.testing.assert_allclose(plan.group("add").scores, ADD_TSS[policy], atol=5e-5)
    np.testing.assert_allclose(plan.group("G").scores, G_TSS, atol=5e-5)
    # N(s_m) per member is reported for every policy, backward included.
    np.testing.assert_allclose(plan.group("add").normalized["conv_x"], S_X / S_X.sum())
    np.testing.assert_allclose(plan.group("add").normalized["conv_F"], S_F / S_F.sum())
    assert plan.group("add").layers == ["conv_x", "conv_F"]
    # No ratio at all: nothing is removed.
    assert plan.total_pruned == 0


def test_worked_example_per_layer_ratio_sum():
    plan = make_plan(example(), tss("sum"), ratios={"add": 0.4})
    assert pruned(plan, "add") == [0, 1]
    assert plan.group("add").kept.tolist() == [2, 3, 4]
    assert pruned(plan, "G") == []
    assert plan.group("add").ratio == 0.4
    assert plan.group("G").ratio == 0.0
    assert plan.threshold is None


def test_worked_example_global_average():
    plan = make_plan(example(), tss("average"), ratio=0.5)
    assert pruned(plan, "add") == [0, 1, 3]
    assert pruned(plan, "G") == [0, 2]
    # The cut is the largest removed score: add[3] = 0.1661.
    assert plan.threshold == pytest.approx(0.1661, abs=5e-5)
    assert plan.group("add").ratio is None and plan.group("add").mode == "global"
    assert plan.group("add").requested == 3 and plan.group("G").requested == 2


def test_worked_example_global_sum():
    plan = make_plan(example(), tss("sum"), ratio=0.5)
    assert pruned(plan, "G") == [0, 1, 2, 4]
    assert pruned(plan, "add") == [1]
    assert plan.threshold == pytest.approx(0.2510, abs=5e-5)


def test_worked_example_alternative_s_f_backward():
    plan = make_plan(example(S_F_ALT), tss("backward"), ratio=0.5)
    np.testing.assert_allclose(
        plan.group("add").scores, [0.1179, 0.1038, 0.3019, 0.2028, 0.2736], atol=5e-5
    )
    assert pruned(plan, "add") == [0, 1]
    assert pruned(plan, "G") == [0, 2, 4]


def test_worked_example_other_norms_on_lone_layer():
    expected = {
        "standard_score": [-1.1414, 0.4637, -0.6064, 1.7121, -0.4280],
        "linear_scaling": [0, 0.5625, 0.1875, 1, 0.25],
        "softmax_norm": [0, 0.000911, 0.000002, 0.999080, 0.000006],
    }
    for norm, values in expected.items():
        for policy in ("sum", "average", "backward"):
            plan = make_plan(example(), PruningOptions(policy=policy, layer_norm=norm))
            np.testing.assert_allclose(plan.group("G").scores, values, atol=5e-5)


def test_worked_example_with_default_step_rule():
    # add: 3 marked, keeps 2 (already even). G: 2 marked, keeps 3 -> round(1.5) = 2 -> 4
    # kept, so the higher of its two marked channels (G[2] = 0.1649) is restored.
    opts = PruningOptions(policy="average", layer_norm="tss_norm")
    plan = make_plan(example(), opts, ratio=0.5)
    assert pruned(plan, "add") == [0, 1, 3]
    assert pruned(plan, "G") == [0]
    assert plan.threshold == pytest.approx(0.1661, abs=5e-5)


# --- combine -------------------------------------------------------------------------------


def test_combine_policies_against_direct_formulas():
    a, b, c = np.array([1.0, 4, 2, 8]), np.array([3.0, 1, 1, 5]), np.array([0.5, 0.5, 9, 1])
    raw = {"a": a, "b": b, "c": c}

    def lin(v):
        return (v - v.min()) / (v.max() - v.min())

    norm, s = combine(raw, "sum", "linear_scaling")
    np.testing.assert_allclose(s, lin(a) + lin(b) + lin(c))
    np.testing.assert_allclose(norm["b"], lin(b))
    _, s = combine(raw, "average", "linear_scaling")
    np.testing.assert_allclose(s, (lin(a) + lin(b) + lin(c)) / 3)
    _, s = combine(raw, "backward", "linear_scaling")
    np.testing.assert_allclose(s, lin(a + b + c))
    assert list(norm) == ["a", "b", "c"]


def test_combine_backward_survives_overflowing_sum_for_scale_invariant_norm():
    big = np.array([1.5e308, 1.0e308, 0.5e308])
    _, s = combine({"a": big, "b": big}, "backward", "linear_scaling")
    np.testing.assert_allclose(s, [1.0, 0.5, 0.0])
    with pytest.raises(ScoreError, match="overflows"):
        combine({"a": big, "b": big}, "backward", "none", what="grp")


def test_combine_rejects_bad_input():
    with pytest.raises(PlanError, match="has 3 scores"):
        combine({"a": np.ones(4), "b": np.ones(3)}, "sum", "none", what="grp")
    with pytest.raises(ScoreError, match="layer b"):
        combine({"a": np.ones(2), "b": np.array([1.0, np.nan])}, "sum", "none")
    with pytest.raises(OptionError, match="policy"):
        combine({"a": np.ones(2)}, "max", "none")
    with pytest.raises(PlanError, match="no member"):
        combine({}, "sum", "none", what="grp")


# --- counts and the step rule ----------------------------------------------------------------


def test_round_half_up():
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 2.4999, 0.7 * 5, 0.35 * 10)] == [
        1,
        2,
        3,
        2,
        4,
        4,
    ]


S10 = [5, 3, 9, 1, 7, 0, 8, 2, 6, 4]  # ascending order of indices: 5 3 7 1 9 0 8 4 6 2


@pytest.mark.parametrize(
    ("ratio", "step_size", "step_op", "expected"),
    [
        (0.3, 4, "none", [3, 5, 7]),  # 3 asked, no alignment
        (0.3, 4, "round", [3, 5]),  # keep 7 -> 1.75 -> 2*4 = 8
        (0.3, 4, "round_up", [3, 5]),  # keep 7 -> 8
        (0.3, 4, "round_down", [0, 1, 3, 5, 7, 9]),  # keep 7 -> 4
        (0.5, 2, "round", [1, 3, 5, 7]),  # keep 5 -> 2.5 rounds half up -> 6
        (0.5, 2, "round_down", [0, 1, 3, 5, 7, 9]),  # keep 5 -> 4
        (0.9, 4, "round", [0, 1, 3, 5, 7, 9]),  # keep 1 -> 0 -> at least step_size = 4
        (0.1, 4, "round_up", [3, 5]),  # keep 9 -> 12 > 10 -> largest multiple <= 10 = 8
        (0.0, 4, "round", []),  # nothing asked: alignment alone never removes
        (0.99, 1, "round", [0, 1, 3, 4, 5, 6, 7, 8, 9]),  # step 1 = off; one always stays
    ],
)
def test_step_rule_on_a_single_group(ratio, step_size, step_op, expected):
    opts = raw_opts(step_size=step_size, step_op=step_op)
    plan = make_plan([one("g", S10)], opts, ratios={"g": ratio})
    assert pruned(plan, "g") == expected


def test_step_rule_never_goes_below_n_when_n_is_smaller_than_step():
    plan = make_plan([one("g", [3, 1, 2])], raw_opts(step_size=4, step_op="round"), ratio=0.5)
    assert pruned(plan, "g") == []
    plan = make_plan([one("g", [3, 1, 2])], raw_opts(step_op="none"), ratio=0.5)
    assert pruned(plan, "g") == [1, 2]


def test_aligned_kept_table():
    # (target, n, lower, step, op) -> kept
    cases = {
        (7, 10, 1, 4, "round"): 8,
        (6, 10, 1, 4, "round"): 8,
        (5, 10, 1, 4, "round"): 4,
        (9, 10, 1, 4, "round_up"): 8,
        (1, 10, 1, 4, "round_down"): 4,
        (1, 3, 1, 4, "round"): 3,
        (5, 10, 7, 4, "round"): 8,  # 7 frozen: the smallest multiple >= 7
        (9, 9, 9, 4, "round"): 9,  # everything frozen
        (3, 10, 1, 4, "none"): 3,
        (0, 10, 2, 1, "round"): 2,
    }
    for (target, n, lower, step, op), kept in cases.items():
        assert aligned_kept(target, n, lower, step, op) == kept, (target, n, lower, step, op)


def test_global_ratio_then_step_rule_per_group():
    # 10 candidates, 0.3 -> 3 marked: A0 (0.1), A1 (0.2), B0 (0.3); the cut is 0.3.
    groups = [one("A", [0.1, 0.2, 0.9, 0.8]), one("B", [0.3, 0.35, 0.95, 0.85, 0.7, 0.75])]
    plan = make_plan(groups, raw_opts(step_op="round"), ratio=0.3)
    assert pruned(plan, "A") == [0, 1]  # keeps 2: already even
    assert pruned(plan, "B") == []  # keeps 5 -> 6: B0 restored
    assert plan.threshold == pytest.approx(0.3)
    plan = make_plan(groups, raw_opts(step_op="round_down"), ratio=0.3)
    assert pruned(plan, "B") == [0, 1]  # keeps 5 -> 4: the next lowest goes too
    assert plan.group("B").requested == 1


def test_global_ties_are_broken_by_group_order_then_index():
    groups = [one("first", [1.0, 2.0, 1.0]), one("second", [1.0, 2.0, 3.0])]
    plan = make_plan(groups, raw_opts(), ratio=0.2)  # 6 * 0.2 -> 1 channel
    assert pruned(plan, "first") == [0] and pruned(plan, "second") == []
    plan = make_plan(groups, raw_opts(), ratio=0.5)  # 3 channels: all three 1.0s
    assert pruned(plan, "first") == [0, 2] and pruned(plan, "second") == [0]


def test_never_removes_every_channel():
    groups = [one("a", [1.0, 2.0, 3.0]), one("b", [0.1, 0.2])]
    plan = make_plan(groups, raw_opts(), ratio=0.99)
    assert pruned(plan, "a") == [0, 1] and pruned(plan, "b") == [0]
    plan = make_plan(groups, raw_opts(step_op="round", step_size=2), ratios={"a": 0.99})
    assert pruned(plan, "a") == [0]  # at least step_size = 2 remain


# --- frozen channels ------------------------------------------------------------------------


def test_frozen_channels_are_kept_and_not_candidates():
    mask = np.array([False, True, True, True, True, True])
    g = one("g", [0, 1, 2, 3, 4, 5], prunable=mask)
    assert pruned(make_plan([g], raw_opts(), ratios={"g": 0.5}), "g") == [1, 2, 3]
    # round(0.5 * 6) = 3 asked -> keep 3 -> round(0.75) * 4 = 4 kept
    plan = make_plan([g], raw_opts(step_op="round", step_size=4), ratios={"g": 0.5})
    assert pruned(plan, "g") == [1, 2]
    # global: 5 candidates, 0.4 -> 2
    assert pruned(make_plan([g], raw_opts(), ratio=0.4), "g") == [1, 2]
    # all but one are frozen: the only prunable channel is still not the last one
    mask2 = np.array([True, False, False])
    g2 = one("h", [0.0, 1.0, 2.0], prunable=mask2)
    assert pruned(make_plan([g2], raw_opts(), ratio=0.9), "h") == [0]


def test_fully_frozen_group_loses_nothing_and_does_not_count():
    frozen = one("f", [0.0, 0.0, 0.0, 0.0], prunable=np.zeros(4, dtype=bool))
    other = one("o", [1.0, 2.0, 3.0, 4.0])
    plan = make_plan([frozen, other], raw_opts(), ratio=0.5)  # 4 candidates -> 2
    assert pruned(plan, "f") == [] and pruned(plan, "o") == [0, 1]


# --- blocks (group policy) --------------------------------------------------------------------

# Two blocks of four: block 0 = channels 0..3, block 1 = channels 4..7.
#   block 0 scores: 4 1 7 2      block 1 scores: 5 9 0 6
#   in-block sums (j = 0..3): 9 10 7 8   means: 4.5 5 3.5 4
BLOCK_SCORES = [4, 1, 7, 2, 5, 9, 0, 6]
TWO_BY_FOUR = np.arange(8).reshape(2, 4)


def blocked(scores=BLOCK_SCORES, blocks=TWO_BY_FOUR, **kw):
    return one("x", scores, blocks=blocks, **kw)


@pytest.mark.parametrize(
    ("group_policy", "expected"),
    [
        ("sum", [2, 3, 6, 7]),  # j = 2 (7) and j = 3 (8) from both blocks
        ("average", [2, 3, 6, 7]),
        ("none", [1, 3, 4, 6]),  # 2 per block, each its own lowest: {1, 3} and {6, 4}
        ("count", [1, 3, 4, 6]),  # per-group ratio: each block's share round(0.5 * 4) = 2
    ],
)
def test_block_policies_with_a_per_group_ratio(group_policy, expected):
    plan = make_plan([blocked()], raw_opts(group_policy=group_policy), ratios={"x": 0.5})
    assert pruned(plan, "x") == expected


@pytest.mark.parametrize(
    ("group_policy", "expected_x"),
    [
        # 11 candidates, 0.4 -> 4 marked: 0 (x6), 1 (x1), 2 (x3), 2.5 (y0). x has 3 marked:
        ("count", [1, 6]),  # block 0 has 2 under the cut, block 1 has 1 -> 1 each
        ("none", [1, 3, 4, 6]),  # round(3 / 2) = 2 each
        ("sum", [2, 3, 6, 7]),  # 2 indices j by in-block sum
        ("average", [2, 3, 6, 7]),
    ],
)
def test_block_policies_with_the_global_ratio(group_policy, expected_x):
    groups = [blocked(), one("y", [2.5, 10, 11])]
    plan = make_plan(groups, raw_opts(group_policy=group_policy), ratio=0.4)
    assert pruned(plan, "x") == expected_x
    assert pruned(plan, "y") == [0]
    assert plan.threshold == pytest.approx(2.5)


def test_block_step_rule_aligns_the_per_block_count():
    groups = [blocked(), one("y", [2.5, 10, 11])]
    # count removes 1 per block -> keeps 3 of 4 -> round: 4 (nothing); round_down: 2.
    opts = raw_opts(group_policy="count", step_op="round", step_size=2)
    assert pruned(make_plan(groups, opts, ratio=0.4), "x") == []
    opts = raw_opts(group_policy="count", step_op="round_down", step_size=2)
    assert pruned(make_plan(groups, opts, ratio=0.4), "x") == [1, 3, 4, 6]
    # per-group 0.25 -> 2 asked -> 1 per block (sum) -> keeps 3 -> round_down 2 -> j 2, 3
    opts = raw_opts(group_policy="sum", step_op="round_down", step_size=2)
    assert pruned(make_plan([blocked()], opts, ratios={"x": 0.25}), "x") == [2, 3, 6, 7]


def test_interleaved_blocks():
    # Blocks {0, 2, 4, 6} and {1, 3, 5, 7}: block 0 = 4 7 5 0, block 1 = 1 2 9 6.
    blocks = np.array([[0, 2, 4, 6], [1, 3, 5, 7]])
    # none: 2 per block -> block 0 loses 6 (0) and 0 (4); block 1 loses 1 (1) and 3 (2)
    plan = make_plan([blocked(blocks=blocks)], raw_opts(group_policy="none"), ratios={"x": 0.5})
    assert pruned(plan, "x") == [0, 1, 3, 6]
    # sum by j: 5 9 14 6 -> j = 0, 3 -> channels 0, 1, 6, 7
    plan = make_plan([blocked(blocks=blocks)], raw_opts(group_policy="sum"), ratios={"x": 0.5})
    assert pruned(plan, "x") == [0, 1, 6, 7]


def test_frozen_channels_inside_blocks():
    mask = np.ones(8, dtype=bool)
    mask[6] = False  # block 1, j = 2
    # sum: j = 2 is frozen in block 1 so it stays in every block; next lowest j: 3 (8), 0 (9)
    plan = make_plan([blocked(prunable=mask)], raw_opts(group_policy="sum"), ratios={"x": 0.5})
    assert pruned(plan, "x") == [0, 3, 4, 7]
    # none: block 1 picks its own lowest prunable: 4 (5) and 7 (6)
    plan = make_plan([blocked(prunable=mask)], raw_opts(group_policy="none"), ratios={"x": 0.5})
    assert pruned(plan, "x") == [1, 3, 4, 7]


# Three blocks of two: block scores (sum) 11, 3, 9 from channels (0,1) (2,3) (4,5).
WHOLE = dict(scores=[5, 6, 1, 2, 9, 0], blocks=np.arange(6).reshape(3, 2), whole_blocks=True)


@pytest.mark.parametrize("group_policy", ["sum", "average", "count", "none"])
def test_whole_block_removal(group_policy):
    opts = raw_opts(group_policy=group_policy)
    # 0.34 * 6 -> 2 channels -> round(2 / 2) = 1 block: the lowest, block 1
    assert pruned(make_plan([blocked(**WHOLE)], opts, ratios={"x": 0.34}), "x") == [2, 3]
    assert pruned(make_plan([blocked(**WHOLE)], opts, ratios={"x": 0.5}), "x") == [2, 3, 4, 5]
    # 0.9 -> 5 channels -> 3 blocks asked, but one block always remains
    assert pruned(make_plan([blocked(**WHOLE)], opts, ratios={"x": 0.9}), "x") == [2, 3, 4, 5]


def test_whole_blocks_interleaved_and_frozen():
    # Blocks {0, 3} {1, 4} {2, 5}; scores 5 1 9 6 2 0 -> block sums 11, 3, 9
    kw = dict(WHOLE, scores=[5, 1, 9, 6, 2, 0], blocks=np.array([[0, 3], [1, 4], [2, 5]]))
    assert pruned(make_plan([blocked(**kw)], raw_opts(), ratios={"x": 0.34}), "x") == [1, 4]
    mask = np.ones(6, dtype=bool)
    mask[4] = False  # the lowest block holds a frozen channel: the next lowest goes
    plan = make_plan([blocked(prunable=mask, **kw)], raw_opts(), ratios={"x": 0.34})
    assert pruned(plan, "x") == [2, 5]


def test_whole_blocks_in_the_global_ranking():
    # 6 + 2 candidates, 0.5 -> 4 marked: 0 (x5), 0.5 (y0), 1 (x2), 2 (x3) -> x asks 3
    # -> round(3 / 2) = 2 blocks: 1 (sum 3) and 2 (sum 9).
    groups = [blocked(**WHOLE), one("y", [0.5, 20])]
    plan = make_plan(groups, raw_opts(), ratio=0.5)
    assert pruned(plan, "x") == [2, 3, 4, 5]
    assert pruned(plan, "y") == [0]


# --- pins, per-group ratios, removals --------------------------------------------------------


def test_pinned_group_is_untouched_and_not_a_candidate():
    plan = make_plan(example(), tss("average"), ratio=0.5, pinned=["G"])
    # only add's 5 channels compete: round(2.5) = 3 -> its three lowest
    assert pruned(plan, "add") == [0, 1, 3]
    assert pruned(plan, "G") == [] and plan.group("G").pinned
    assert plan.group("G").kept.tolist() == [0, 1, 2, 3, 4]
    # pinning wins over a per-group ratio and over explicit removals
    plan = make_plan(
        example(), tss("average"), ratios={"G": 0.8}, removals={"add": [0]}, pinned=["G", "add"]
    )
    assert plan.total_pruned == 0


def test_per_group_ratio_overrides_global():
    plan = make_plan(example(), tss("average"), ratio=0.5, ratios={"add": 0.2})
    assert pruned(plan, "add") == [1]  # round(1.0) = 1: its lowest, 0.1255
    # G alone in the global ranking: round(2.5) = 3 of its 5
    assert pruned(plan, "G") == [0, 2, 4]
    assert plan.group("add").ratio == 0.2 and plan.group("add").mode == "ratio"
    assert plan.group("G").ratio is None and plan.group("G").mode == "global"
    assert plan.threshold == pytest.approx(0.1753, abs=5e-5)
    assert plan.ratios == {"add": 0.2}


def test_removals_are_exact():
    opts = PruningOptions()  # step rule on: ignored for explicit removals
    plan = make_plan(example(), opts, ratio=0.5, removals={"add": [3, 1]})
    assert pruned(plan, "add") == [1, 3]
    assert plan.group("add").mode == "removals" and plan.group("add").ratio is None
    # add does not compete: G is alone in the global ranking
    assert plan.group("G").mode == "global"
    assert make_plan(example(), opts, removals={"G": np.array([], dtype=int)}).total_pruned == 0
    plan = make_plan(example(), opts, removals={"G": np.array([4, 4, 0])})
    assert pruned(plan, "G") == [0, 4]


def test_removals_respect_blocks():
    plan = make_plan([blocked()], raw_opts(), removals={"x": [0, 5]})
    assert pruned(plan, "x") == [0, 5]
    with pytest.raises(OptionError, match=r"'x'.*same number"):
        make_plan([blocked()], raw_opts(), removals={"x": [0, 1, 5]})
    plan = make_plan([blocked(**WHOLE)], raw_opts(), removals={"x": [2, 3]})
    assert pruned(plan, "x") == [2, 3]
    with pytest.raises(OptionError, match=r"'x'.*whole blocks"):
        make_plan([blocked(**WHOLE)], raw_opts(), removals={"x": [2]})


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([5], r"out of range for group 'G' with n=5"),
        ([-1], r"out of range for group 'G'"),
        ([0, 1, 2, 3, 4], r"all n=5 channels of group 'G'"),
        ([1.5], r"group 'G' must be a list of integers"),
        ([[0, 1]], r"group 'G' must be a list of integers"),
        ([True], r"group 'G' must be a list of integers"),
    ],
)
def test_bad_removals(value, match):
    with pytest.raises(OptionError, match=match):
        make_plan(example(), PruningOptions(), removals={"G": value})


def test_removing_a_frozen_channel_is_refused():
    g = one("g", [1.0, 2.0, 3.0], prunable=np.array([True, False, True]))
    with pytest.raises(OptionError, match=r"channel 1 of group 'g' is frozen"):
        make_plan([g], raw_opts(), removals={"g": [1]})


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, "abc", float("nan")])
def test_bad_global_ratio(ratio):
    with pytest.raises(OptionError, match="ratio"):
        make_plan(example(), PruningOptions(), ratio=ratio)


def test_bad_per_group_ratio_names_the_group():
    with pytest.raises(OptionError, match=r"ratio of group 'G'.*0 <= ratio < 1"):
        make_plan(example(), PruningOptions(), ratios={"G": 1.0})


@pytest.mark.parametrize("kind", ["ratios", "pinned", "removals"])
def test_unknown_group_names_list_valid_ones(kind):
    kw = {"ratios": {"nope": 0.1}, "pinned": ["nope"], "removals": {"nope": [0]}}[kind]
    with pytest.raises(OptionError, match=r"unknown group.*'nope'.*'add', 'G'"):
        make_plan(example(), PruningOptions(), **{kind: kw})


def test_unknown_group_lookup():
    plan = make_plan(example(), PruningOptions())
    with pytest.raises(OptionError, match="'add'"):
        plan.group("missing")


def test_inconsistent_group_inputs():
    with pytest.raises(PlanError, match="duplicate"):
        make_plan([one("a", [1.0]), one("a", [2.0])], PruningOptions())
    with pytest.raises(PlanError, match="blocks"):
        make_plan([one("a", [1.0, 2, 3, 4], blocks=np.array([[0, 1], [1, 2]]))], raw_opts())
    with pytest.raises(PlanError, match="prunable"):
        make_plan([one("a", [1.0, 2], prunable=np.array([True]))], raw_opts())
    with pytest.raises(PlanError, match="no channels"):
        make_plan([one("a", [])], raw_opts())
    with pytest.raises(ScoreError, match="a.w"):
        make_plan([one("a", [1.0, np.inf])], raw_opts())
    with pytest.raises(OptionError, match="layer_norm"):
        make_plan(example(), {"layer_norm": "zscore"})
    for exc in (PlanError, ScoreError):
        assert issubclass(exc, PruneScopeError)


# --- output ------------------------------------------------------------------------------------


def test_plan_to_dict_is_json_and_matches_the_arrays():
    plan = make_plan(example(), tss("average"), ratio=0.5, ratios={"G": 0.2})
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["ratio"] == 0.5 and d["ratios"] == {"G": 0.2}
    assert d["options"]["layer_norm"] == "tss_norm"
    by_name = {g["name"]: g for g in d["groups"]}
    assert by_name["G"]["pruned"] == [0] and by_name["G"]["ratio"] == 0.2
    assert by_name["add"]["kept"] == plan.group("add").kept.tolist()
    np.testing.assert_allclose(by_name["add"]["scores"], plan.group("add").scores)
    assert set(by_name["add"]["normalized"]) == {"conv_x", "conv_F"}
    assert d["threshold"] == plan.threshold


def test_kept_and_pruned_are_sorted_int64_partitions():
    rng = np.random.default_rng(0)
    groups = [one(f"g{i}", rng.random(n)) for i, n in enumerate([7, 16, 33])]
    plan = make_plan(groups, PruningOptions(), ratio=0.37)
    for g in plan.groups:
        assert g.pruned.dtype == np.int64 and g.kept.dtype == np.int64
        both = np.concatenate([g.pruned, g.kept])
        assert sorted(both.tolist()) == list(range(g.n))
        assert np.all(np.diff(g.pruned) > 0) and np.all(np.diff(g.kept) > 0)


# --- edges found by mutation testing (bench/RESULTS.md, "Mutation testing") -------------------


def test_global_ratio_zero_prunes_nothing_and_has_no_threshold():
    plan = make_plan([blocked(), one("y", [2.5, 10, 11])], raw_opts(), ratio=0.0)
    assert plan.total_pruned == 0 and plan.threshold is None


def test_global_cut_on_many_channels_is_the_lowest_scores():
    """200 distinct scores: the selection (np.partition) must find exactly the 60 lowest."""
    scores = np.random.default_rng(3).permutation(200).astype(float)
    plan = make_plan([one("x", scores)], raw_opts(), ratio=0.3)
    assert pruned(plan, "x") == sorted(sorted(range(200), key=lambda i: scores[i])[:60])


@pytest.mark.parametrize("blocks", [None, np.arange(64).reshape(2, 32)])
def test_ties_among_many_channels_go_to_the_lower_index(blocks):
    """More than 16 channels (numpy's unstable sorts differ from a stable one there only):
    among equal scores the lower channel index goes first, as the spec says."""
    scores = np.random.default_rng(4).integers(0, 3, 64).astype(float)
    group = one("x", scores) if blocks is None else blocked(scores=scores, blocks=blocks)
    plan = make_plan([group], raw_opts(group_policy="none"), ratios={"x": 0.5})
    if blocks is None:
        expected = sorted(range(64), key=lambda i: (scores[i], i))[:32]
    else:  # each block its own 16 lowest
        expected = [j for row in blocks for j in sorted(row, key=lambda i: (scores[i], i))[:16]]
    assert pruned(plan, "x") == sorted(int(j) for j in expected)


@pytest.mark.parametrize(("group_policy", "keep"), [("sum", [1, 5]), ("none", [2, 5])])
def test_blocks_keep_at_least_one_channel_each(group_policy, keep):
    # 0.9 of 8 -> 7 asked -> round(7 / 2) = 4 per block, but one channel per block stays:
    # sum keeps j = 1 (in-block sum 10); none: block 0 keeps 2 (7), block 1 keeps 5 (9)
    plan = make_plan([blocked()], raw_opts(group_policy=group_policy), ratios={"x": 0.9})
    assert pruned(plan, "x") == [c for c in range(8) if c not in keep]


def test_a_tiny_block_ratio_prunes_nothing():
    for gp in ("sum", "average", "none", "count"):
        assert pruned(make_plan([blocked()], raw_opts(group_policy=gp), ratios={"x": 0.05}),
                      "x") == [], gp


def test_in_block_policy_without_the_step_rule_keeps_an_odd_count():
    # 0.25 of 8 -> 2 asked -> 1 j removed (sum 7: j = 2), 3 kept: no rounding to 2 or 4
    plan = make_plan([blocked()], raw_opts(group_policy="sum"), ratios={"x": 0.25})
    assert pruned(plan, "x") == [2, 6]


def test_frozen_channels_bound_what_each_block_loses():
    mask = np.ones(8, dtype=bool)
    mask[[0, 5, 6]] = False  # block 0 has one frozen channel, block 1 two
    # none, 0.9: 4 per block asked, at most 4 - 2 = 2 (the most frozen in a block) each:
    # block 0 loses its two lowest prunable (1, 3), block 1 its only two prunable (4, 7)
    plan = make_plan([blocked(prunable=mask)], raw_opts(group_policy="none"),
                     ratios={"x": 0.9})
    assert pruned(plan, "x") == [1, 3, 4, 7]


# --- second round of mutation gaps: exact report contents and messages ----------------------


def test_group_and_plan_to_dict_hold_exactly_these_entries():
    # 0.34 of 3 -> round(1.02) = 1 channel asked: the lowest score, 1.0 at index 1
    groups = [one("g", [3.0, 1.0, 2.0]), one("pin", [5.0, 6.0])]
    plan = make_plan(groups, raw_opts(), ratios={"g": 0.34}, pinned="pin")  # one name
    assert plan.group("g").to_dict() == {
        "name": "g", "layers": ["g.w"], "normalized": {"g.w": [3.0, 1.0, 2.0]},
        "scores": [3.0, 1.0, 2.0], "pruned": [1], "kept": [0, 2], "ratio": 0.34,
        "pinned": False, "mode": "ratio", "requested": 1,
    }
    assert plan.group("pin").to_dict() == {
        "name": "pin", "layers": ["pin.w"], "normalized": {"pin.w": [5.0, 6.0]},
        "scores": [5.0, 6.0], "pruned": [], "kept": [0, 1], "ratio": None,
        "pinned": True, "mode": "pinned", "requested": 0,
    }
    d = plan.to_dict()
    assert set(d) == {"options", "ratio", "ratios", "threshold", "groups"}
    assert (d["ratio"], d["ratios"], d["threshold"]) == (None, {"g": 0.34}, None)
    assert make_plan(groups, raw_opts(), ratio=0.5).to_dict()["ratios"] is None


def test_unknown_group_messages_list_at_most_five_names():
    def message(n_groups):
        plan = make_plan([one(f"g{i}", [1.0, 2.0]) for i in range(n_groups)], raw_opts())
        with pytest.raises(OptionError) as err:
            plan.group("missing")
        return str(err.value)

    assert message(0) == "unknown group 'missing'; there are no groups"
    assert message(2) == "unknown group 'missing'; valid names include: 'g0', 'g1'"
    assert message(5) == ("unknown group 'missing'; valid names include: "
                          "'g0', 'g1', 'g2', 'g3', 'g4'")
    assert message(6) == ("unknown group 'missing'; valid names include: "
                          "'g0', 'g1', 'g2', 'g3', 'g4', ... (6 in all)")


@pytest.mark.parametrize("group_policy", ["sum", "average", "none", "count"])
def test_a_block_ratio_below_half_a_channel_per_block_prunes_nothing_under_the_step_rule(
        group_policy):
    # 4 blocks of 6; 0.04 of 24 -> 1 channel asked -> round(1 / 4) = 0 per block
    # (count: round(0.04 * 6) = 0). Aligning the untouched 6 to a multiple of 4 would cut 2
    # per block: a group asked to lose nothing per block is left alone.
    group = blocked(scores=np.arange(24.0)[::-1], blocks=np.arange(24).reshape(4, 6))
    opts = raw_opts(group_policy=group_policy, step_size=4, step_op="round")
    assert pruned(make_plan([group], opts, ratios={"x": 0.04}), "x") == []


def test_removal_messages_are_exact():
    with pytest.raises(OptionError) as err:
        make_plan(example(), PruningOptions(), removals={"G": [7]})
    assert str(err.value) == ("channel index 7 is out of range for group 'G' with n=5 "
                              "channels (allowed 0..4)")
    # nine blocks of two: the message shows the first eight per-block counts
    group = blocked(scores=np.arange(18.0), blocks=np.arange(18).reshape(9, 2))
    with pytest.raises(OptionError) as err:
        make_plan([group], raw_opts(), removals={"x": [0]})
    assert str(err.value) == ("group 'x' has 9 blocks of 2 channels that must keep the same "
                              "size: remove the same number of indices from every block "
                              "(got [1, 0, 0, 0, 0, 0, 0, 0])")
    # a long bad value is cut to 300 characters
    with pytest.raises(OptionError) as err:
        make_plan(example(), PruningOptions(), removals={"G": [0.5] * 200})
    assert len(str(err.value)) == 300
    assert str(err.value).startswith("channel indices to remove from group 'G' must be a list "
                                     "of integers, got [0.5, 0.5")


def test_removals_from_a_single_block_group():
    # one block of four (A = 1): any count of indices is the same count in every block
    group = blocked(scores=[4.0, 1.0, 7.0, 2.0], blocks=np.arange(4).reshape(1, 4))
    assert pruned(make_plan([group], raw_opts(), removals={"x": [1, 2]}), "x") == [1, 2]


def test_option_messages_name_the_option_and_the_group_list():
    with pytest.raises(OptionError) as err:
        make_plan(example(), PruningOptions(), ratio=1.5)
    assert str(err.value) == "ratio=1.5 is out of range; allowed: 0 <= ratio < 1"
    for kind, value in (("ratios", {"nope": 0.1}), ("pinned", ["nope"]),
                        ("removals", {"nope": [0]})):
        with pytest.raises(OptionError) as err:
            make_plan(example(), PruningOptions(), **{kind: value})
        assert str(err.value) == (f"unknown group in {kind} 'nope'; valid names include: "
                                  "'add', 'G'")


def test_group_input_errors_name_the_group():
    with pytest.raises(PlanError) as err:
        make_plan([GroupInput("grp", {"a": np.ones(4), "b": np.ones(3)})], raw_opts())
    assert str(err.value) == "grp: member 'b' has 3 scores, the first member has 4"
    for bad in (np.arange(4), np.arange(4.0).reshape(2, 2)):  # not 2-D; not integers
        with pytest.raises(PlanError, match=r"group 'a': blocks must be an int \(A, B\)"):
            make_plan([one("a", [1.0, 2, 3, 4], blocks=bad)], raw_opts())


def test_ties_among_many_channels_with_frozen_ones_go_to_the_lower_index():
    scores = np.random.default_rng(4).integers(0, 3, 64).astype(float)
    mask = np.ones(64, dtype=bool)
    mask[[0, 7, 30]] = False
    plan = make_plan([one("x", scores, prunable=mask)], raw_opts(), ratios={"x": 0.5})
    expected = sorted((i for i in range(64) if mask[i]), key=lambda i: (scores[i], i))[:32]
    assert pruned(plan, "x") == sorted(expected)


def test_global_cut_takes_only_the_ties_it_needs():
    # 0.4 of 5 -> 2 marked: 1.0 and the first of the three 2.0s (index order)
    plan = make_plan([one("x", [2.0, 1.0, 2.0, 3.0, 2.0])], raw_opts(), ratio=0.4)
    assert pruned(plan, "x") == [0, 1] and plan.threshold == 2.0


def test_global_cut_where_a_partial_selection_would_be_off_by_one():
    """300 random scores, 100 cut: for this draw np.partition at the wrong position leaves
    a larger score at index 99 (checked when the test was written), so the cut must be
    selected at exactly `count - 1`."""
    scores = np.random.default_rng(257).random(300)
    plan = make_plan([one("x", scores)], raw_opts(), ratio=1 / 3)
    assert pruned(plan, "x") == sorted(np.argsort(scores)[:100].tolist())
    assert plan.threshold == np.sort(scores)[99]


def test_combine_messages_without_a_label_say_group():
    with pytest.raises(PlanError) as err:
        combine({}, "sum", "none")
    assert str(err.value) == "group has no member layers"
    with pytest.raises(PlanError) as err:
        combine({"a": np.ones(2), "b": np.ones(3)}, "sum", "none")
    assert str(err.value) == "group: member 'b' has 3 scores, the first member has 2"
    with pytest.raises(OptionError) as err:
        combine({"a": np.ones(2)}, "max", "none")
    assert str(err.value) == ("option policy='max' is not allowed; allowed values: "
                              "sum, average, backward")


def test_combine_backward_adds_float32_scores_in_float64_without_warnings():
    # 3e38 + 2e38 overflows float32 (max 3.4e38) but not float64; no overflow warning either
    a = np.array([3e38, 1e38, 0.0], dtype=np.float32)
    b = np.array([2e38, 1e38, 1.0], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, s = combine({"a": a, "b": b}, "backward", "none")
        big = np.array([1.5e308, 1.0e308, 0.5e308])
        _, scaled = combine({"a": big, "b": big}, "backward", "linear_scaling")
    np.testing.assert_allclose(s, [5e38, 2e38, 1.0], rtol=1e-6)
    np.testing.assert_allclose(scaled, [1.0, 0.5, 0.0])
