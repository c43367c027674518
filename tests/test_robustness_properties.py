"""Property tests that tests/test_properties.py does not cover: finite combined scores for every
policy, frozen channels in the global count, ratio 0, monotonic ratios, exact index removals,
non-finite raw scores, and the planner's invariants on real captured models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import engine
from engine.options import GROUP_POLICIES, LAYER_NORMS, POLICIES, STEP_OPS, PruningOptions
from engine.scoring.normalize import ScoreError, normalize
from engine.scoring.planning import GroupInput, make_plan, round_half_up
from tests.test_properties import check_invariants, group_inputs, options_st, score_floats
from tests.zoo import build

SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ratios_st = st.floats(0.0, 0.99)


@SETTINGS
@given(groups=group_inputs(), options=options_st, ratio=ratios_st)
def test_combined_scores_are_finite_for_every_policy(groups, options, ratio):
    """test_properties checks each norm alone; the policies add and average them."""
    try:
        plan = make_plan(groups, options, ratio=ratio)
    except ScoreError as exc:  # a clear error is allowed (backward overflow), NaN is not
        assert "overflow" in str(exc)
        return
    for g in plan.groups:
        assert np.all(np.isfinite(g.scores)), (options, g.name)
        for member, v in g.normalized.items():
            assert np.all(np.isfinite(v)), (options, member)
    assert plan.threshold is None or np.isfinite(plan.threshold)


@SETTINGS
@given(
    v=hnp.arrays(np.float64, st.integers(1, 20), elements=st.floats(allow_nan=True,
                                                                    allow_infinity=True)),
    name=st.sampled_from(LAYER_NORMS),
)
def test_non_finite_raw_scores_are_an_error_never_nan(v, name):
    if np.all(np.isfinite(v)):
        assert np.all(np.isfinite(normalize(v, name)))
        return
    with pytest.raises(ScoreError, match="non-finite raw scores in layer conv7"):
        normalize(v, name, what="conv7")


@st.composite
def flat_groups_with_frozen(draw):
    groups = []
    for i in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 30))
        raw = {f"g{i}.m{m}": draw(hnp.arrays(np.float64, n, elements=score_floats))
               for m in range(draw(st.integers(1, 3)))}
        prunable = draw(hnp.arrays(np.bool_, n))
        groups.append(GroupInput(f"g{i}", raw, prunable=prunable))
    return groups


@SETTINGS
@given(groups=flat_groups_with_frozen(), policy=st.sampled_from(POLICIES),
       layer_norm=st.sampled_from(LAYER_NORMS), ratio=ratios_st)
def test_global_fraction_counts_only_prunable_channels(groups, policy, layer_norm, ratio):
    """test_properties checks the global fraction without frozen channels only."""
    options = PruningOptions(policy=policy, layer_norm=layer_norm, step_op="none")
    plan = make_plan(groups, options, ratio=ratio)
    check_invariants(groups, plan)
    candidates = sum(int(g.prunable.sum()) for g in groups)
    asked = round_half_up(ratio * candidates)
    # a group the cut would empty keeps one channel: at most one fewer per such group
    saved = sum(1 for g in plan.groups if g.kept.size == 1)
    assert asked - saved <= plan.total_pruned <= asked
    for inp, g in zip(groups, plan.groups):
        assert inp.prunable[g.pruned].all()


@SETTINGS
@given(groups=group_inputs(), options=options_st, data=st.data())
def test_ratio_zero_removes_nothing(groups, options, data):
    per_group = data.draw(st.booleans(), label="per_group")
    if per_group:
        plan = make_plan(groups, options, ratios={g.name: 0.0 for g in groups})
    else:
        plan = make_plan(groups, options, ratio=0.0)
    for g in plan.groups:
        assert g.pruned.size == 0 and g.kept.size == g.n


@SETTINGS
@given(groups=group_inputs(), options=options_st, data=st.data())
def test_a_larger_global_ratio_never_keeps_more(groups, options, data):
    low = data.draw(ratios_st, label="low")
    high = data.draw(st.floats(low, 0.99), label="high")
    a = make_plan(groups, options, ratio=low)
    b = make_plan(groups, options, ratio=high)
    for ga, gb in zip(a.groups, b.groups):
        assert gb.pruned.size >= ga.pruned.size, (ga.name, low, high)


@SETTINGS
@given(
    scores=hnp.arrays(np.float64, st.integers(2, 40), elements=score_floats),
    options=options_st,
    data=st.data(),
)
def test_index_removals_are_exact(scores, options, data):
    n = scores.size
    gone = data.draw(st.sets(st.integers(0, n - 1), min_size=0, max_size=n - 1), label="gone")
    plan = make_plan([GroupInput("g", {"w": scores})], options,
                     removals={"g": np.array(sorted(gone), dtype=np.int64)})
    assert plan.group("g").pruned.tolist() == sorted(gone)
    with pytest.raises(engine.OptionError, match="'g'"):
        make_plan([GroupInput("g", {"w": scores})], options, removals={"g": np.arange(n)})
    bad = data.draw(st.one_of(st.integers(n, 10 * n + 10), st.integers(-10 * n - 10, -1)),
                    label="bad")
    with pytest.raises(engine.OptionError, match="'g'"):
        make_plan([GroupInput("g", {"w": scores})], options,
                  removals={"g": np.array([bad], dtype=np.int64)})


# ---------------------------------------------------------------- on real models

REAL = ("conv_bn_residual", "grouped_depthwise", "cat_split_flatten", "attention_sdpa",
        "swiglu", "channel_shuffle")
_ANALYSES: dict[str, engine.Analysis] = {}


def real_analysis(name: str) -> engine.Analysis:
    if name not in _ANALYSES:
        model, inputs = build(name)
        _ANALYSES[name] = engine.analyze(model, inputs)
    return _ANALYSES[name]


real_options = st.builds(
    PruningOptions,
    criterion=st.sampled_from(["l2", "l1", "gm", "random"]),
    policy=st.sampled_from(POLICIES),
    layer_norm=st.sampled_from(LAYER_NORMS),
    group_policy=st.sampled_from(GROUP_POLICIES),
    reshape_channel_axis=st.sampled_from([-1, -2]),
    step_size=st.integers(1, 4),
    step_op=st.sampled_from(STEP_OPS),
    seed=st.integers(0, 3),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(REAL), options=real_options, ratio=ratios_st)
def test_plans_on_real_models_keep_every_group_alive(name, options, ratio):
    analysis = real_analysis(name)
    plan = engine.plan(analysis, options, ratio=ratio)
    groups = {g.name: g for g in analysis.prunable_groups(options.prunes_whole_blocks)}
    assert [g.name for g in plan.groups] == list(groups)
    for g in plan.groups:
        info = groups[g.name]
        assert g.kept.size >= 1 and g.kept.size + g.pruned.size == g.n == info.prunable.size
        assert info.prunable[g.pruned].all(), "a frozen channel was planned away"
        assert np.all(np.isfinite(g.scores))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(REAL), options=real_options, ratio=st.floats(0.05, 0.95))
def test_pruned_real_models_agree_with_mask_mode(name, options, ratio):
    analysis = real_analysis(name)
    plan = engine.plan(analysis, options, ratio=ratio)
    result = engine.apply(analysis, plan)  # raises if the exact groups disagree
    inputs = analysis.captured.example_inputs
    with torch.no_grad():
        got = result.module(*inputs)
        want = engine.masked(analysis, plan)(*inputs)
    got = got if isinstance(got, torch.Tensor) else got[0]
    want = want if isinstance(want, torch.Tensor) else want[0]
    assert got.shape == want.shape
    assert torch.isfinite(got).all()
    if result.report["verification"]["exact_expected"]:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
