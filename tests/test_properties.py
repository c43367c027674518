"""Property tests: layer norms and the planner on random scores, ratios and options."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from engine.options import GROUP_POLICIES, LAYER_NORMS, POLICIES, STEP_OPS, PruningOptions
from engine.scoring.normalize import normalize
from engine.scoring.planning import GroupInput, make_plan, round_half_up

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

any_floats = st.floats(allow_nan=False, allow_infinity=False, width=64)
score_floats = st.one_of(
    st.floats(0, 1e6, allow_nan=False),
    st.sampled_from([0.0, 1.0, 1e-300, 1e300]),
)


@SETTINGS
@given(
    v=hnp.arrays(np.float64, st.integers(1, 30), elements=any_floats),
    name=st.sampled_from(LAYER_NORMS),
)
def test_normalisations_are_finite(v, name):
    out = normalize(v, name)
    assert out.shape == v.shape and out.dtype == np.float64
    assert np.all(np.isfinite(out))
    if name == "linear_scaling":
        assert np.all((out >= 0) & (out <= 1))
    if name == "softmax_norm":
        assert abs(out.sum() - 1.0) < 1e-9


@SETTINGS
@given(v=hnp.arrays(np.float64, st.integers(1, 30), elements=st.floats(-1e6, 1e6)))
def test_standard_score_is_centred_and_scaled(v):
    z = normalize(v, "standard_score")
    assert abs(z.mean()) < 1e-6
    if v.max() - v.min() > 1e-6 * max(1.0, float(np.abs(v).max())):
        assert abs(z.std() - 1.0) < 1e-6
    # order preserved: a higher raw score never gets a lower z
    order = np.argsort(v, kind="stable")
    assert np.all(np.diff(z[order]) >= -1e-12)


@st.composite
def group_inputs(draw, *, allow_blocks=True, allow_frozen=True):
    count = draw(st.integers(1, 4))
    groups = []
    for i in range(count):
        blocks = None
        whole = False
        if allow_blocks and draw(st.booleans()):
            a = draw(st.integers(1, 4))
            b = draw(st.integers(1, 6))
            n = a * b
            perm = draw(st.permutations(range(n)))
            blocks = np.array(perm, dtype=np.int64).reshape(a, b)
            whole = draw(st.booleans())
        else:
            n = draw(st.integers(1, 40))
        members = draw(st.integers(1, 3))
        raw = {
            f"g{i}.m{m}": draw(hnp.arrays(np.float64, n, elements=score_floats))
            for m in range(members)
        }
        prunable = None
        if allow_frozen and draw(st.integers(0, 3)) == 0:
            prunable = draw(hnp.arrays(np.bool_, n))
        groups.append(
            GroupInput(f"g{i}", raw, blocks=blocks, whole_blocks=whole, prunable=prunable)
        )
    return groups


options_st = st.builds(
    PruningOptions,
    policy=st.sampled_from(POLICIES),
    layer_norm=st.sampled_from(LAYER_NORMS),
    group_policy=st.sampled_from(GROUP_POLICIES),
    step_size=st.integers(1, 5),
    step_op=st.sampled_from(STEP_OPS),
)
ratios_st = st.floats(0.0, 0.99)


def check_invariants(groups, plan):
    opts = plan.options
    assert [g.name for g in plan.groups] == [g.name for g in groups]
    for inp, g in zip(groups, plan.groups):
        n = g.n
        assert g.pruned.dtype == np.int64 and g.kept.dtype == np.int64
        assert np.all(np.diff(g.pruned) > 0) and np.all(np.diff(g.kept) > 0)
        assert np.intersect1d(g.pruned, g.kept).size == 0
        assert g.pruned.size + g.kept.size == n
        assert g.kept.size >= 1, "a group lost every channel"
        if inp.prunable is not None:
            assert inp.prunable[g.pruned].all(), "a frozen channel was removed"
        if g.pruned.size == 0 or g.mode == "removals":
            continue
        if inp.blocks is None:
            if opts.step_enabled:
                assert g.kept.size % opts.step_size == 0 or g.kept.size == n
                assert g.kept.size >= min(opts.step_size, n)
        elif inp.whole_blocks:
            gone = np.isin(inp.blocks, g.pruned)
            assert np.all(gone.all(axis=1) | ~gone.any(axis=1)), "a block was split"
            assert not gone.all(), "every block was removed"
        else:
            a, b = inp.blocks.shape
            per_block = np.isin(inp.blocks, g.kept).sum(axis=1)
            assert np.all(per_block == per_block[0]), "blocks keep different counts"
            if opts.step_enabled:
                assert per_block[0] % opts.step_size == 0 or per_block[0] == b


@SETTINGS
@given(groups=group_inputs(), options=options_st, ratio=ratios_st, data=st.data())
def test_plan_invariants_global(groups, options, ratio, data):
    pinned = data.draw(st.sets(st.sampled_from([g.name for g in groups])), label="pinned")
    plan = make_plan(groups, options, ratio=ratio, pinned=pinned)
    check_invariants(groups, plan)
    for g in plan.groups:
        if g.name in pinned:
            assert g.pruned.size == 0 and g.pinned


@SETTINGS
@given(groups=group_inputs(), options=options_st, data=st.data())
def test_plan_invariants_per_group(groups, options, data):
    ratios = {
        g.name: data.draw(ratios_st, label=g.name) for g in groups if data.draw(st.booleans())
    }
    ratio = data.draw(st.one_of(st.none(), ratios_st), label="global")
    plan = make_plan(groups, options, ratio=ratio, ratios=ratios)
    check_invariants(groups, plan)
    for g in plan.groups:
        assert g.mode == ("ratio" if g.name in ratios or ratio is None else "global")


@SETTINGS
@given(
    groups=group_inputs(allow_blocks=False, allow_frozen=False),
    policy=st.sampled_from(POLICIES),
    layer_norm=st.sampled_from(LAYER_NORMS),
    ratio=ratios_st,
)
def test_global_ratio_removes_the_requested_fraction(groups, policy, layer_norm, ratio):
    opts = PruningOptions(policy=policy, layer_norm=layer_norm, step_op="none")
    plan = make_plan(groups, opts, ratio=ratio)
    total = sum(g.n for g in plan.groups)
    asked = round_half_up(ratio * total)
    # A group the cut would empty keeps its best channel: one fewer removed per such group.
    clamped = sum(1 for g in plan.groups if g.kept.size == 1)
    assert asked - clamped <= plan.total_pruned <= asked
    if asked == 0:
        assert plan.threshold is None
        return
    t = plan.threshold
    for g in plan.groups:
        assert np.all(g.scores[g.pruned] <= t)
        if g.kept.size > 1:
            # Nothing below the cut survives unless its group was saved from emptying.
            assert np.all(g.scores[g.kept] >= t)


@SETTINGS
@given(
    scores=hnp.arrays(np.float64, st.integers(1, 50), elements=score_floats),
    ratio=ratios_st,
    step_size=st.integers(1, 6),
    step_op=st.sampled_from(STEP_OPS),
)
def test_per_group_ratio_counts(scores, ratio, step_size, step_op):
    n = scores.size
    opts = PruningOptions(layer_norm="none", step_size=step_size, step_op=step_op)
    g = make_plan([GroupInput("g", {"w": scores})], opts, ratios={"g": ratio}).group("g")
    asked = min(round_half_up(ratio * n), n - 1)
    if asked == 0:
        assert g.pruned.size == 0
        return
    if not opts.step_enabled:
        assert g.pruned.size == asked
    else:
        assert g.kept.size % step_size == 0 or g.kept.size == n
        # alignment moves the kept count by less than one step (or clamps at the bounds)
        assert abs(g.kept.size - (n - asked)) < step_size or g.kept.size in (n, step_size)
    # the removed channels are the lowest-scoring ones
    if g.pruned.size and g.kept.size:
        assert scores[g.pruned].max() <= scores[g.kept].min()
