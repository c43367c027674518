"""The worked example of shared/spec/pruning-options.md, built as a real network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import engine
from tests.helpers import assert_equals_mask_mode

S_X = [11, 19, 38, 25, 46]
S_G = [13, 22, 16, 29, 17]
S_F = [20, 12, 18, 16, 39]
S_F_ALT = [14, 3, 26, 18, 12]


class SpecNet(nn.Module):
    def __init__(self, s_f=S_F) -> None:
        super().__init__()
        self.conv_x = nn.Conv2d(5, 5, 1, bias=False)
        self.conv_G = nn.Conv2d(5, 5, 1, bias=False)
        self.conv_F = nn.Conv2d(5, 5, 1, bias=False)
        self.head = nn.Conv2d(5, 5, 1, bias=False)
        with torch.no_grad():
            for conv, scores in ((self.conv_x, S_X), (self.conv_G, S_G), (self.conv_F, s_f)):
                conv.weight.zero_()
                for c, s in enumerate(scores):
                    conv.weight[c, (c + 2) % 5] = s  # one non-zero weight per filter
            self.head.weight.normal_()

    def forward(self, x):
        x = self.conv_x(x)
        f = self.conv_F(self.conv_G(x))
        return self.head(f + x)


def _analysis(s_f=S_F):
    return engine.analyze(SpecNet(s_f).eval(), (torch.randn(1, 5, 3, 3),))


def _groups(plan):
    by_layers = {tuple(sorted(g.layers)): g for g in plan.groups}
    return by_layers[("conv_F", "conv_x")], by_layers[("conv_G",)]


def _opts(**kw):
    return engine.PruningOptions(layer_norm="tss_norm", step_op="none", **kw)


def test_groups_members_and_consumers():
    an = _analysis()
    names = {tuple(sorted(g.layers)): g for g in an.groups}
    assert set(names) == {("conv_F", "conv_x"), ("conv_G",)}
    assert set(names[("conv_F", "conv_x")].consumers) == {"conv_G", "head"}
    assert names[("conv_G",)].consumers == ["conv_F"]
    assert any(f.layers == ["head"] for f in an.frozen)


@pytest.mark.parametrize("criterion", ["l1", "l2"])
@pytest.mark.parametrize(
    ("policy", "add_scores"),
    [
        ("sum", [0.2696, 0.2510, 0.4448, 0.3322, 0.7024]),
        ("average", [0.1348, 0.1255, 0.2224, 0.1661, 0.3512]),
        ("backward", [0.1270, 0.1270, 0.2295, 0.1680, 0.3484]),
    ],
)
def test_combined_scores(criterion, policy, add_scores):
    plan = engine.plan(_analysis(), _opts(criterion=criterion, policy=policy))
    add, g = _groups(plan)
    np.testing.assert_allclose(add.scores, add_scores, atol=6e-5)
    np.testing.assert_allclose(g.scores, [0.1340, 0.2268, 0.1649, 0.2990, 0.1753], atol=6e-5)


def test_per_layer_ratio_on_add_with_sum():
    an = _analysis()
    add, _ = _groups(engine.plan(an, _opts(policy="sum")))
    plan = engine.plan(an, _opts(policy="sum"), ratios={add.name: 0.4})
    add, g = _groups(plan)
    assert add.pruned.tolist() == [0, 1]
    assert g.pruned.tolist() == []


@pytest.mark.parametrize(
    ("policy", "add_lost", "g_lost"),
    [("average", [0, 1, 3], [0, 2]), ("sum", [1], [0, 1, 2, 4])],
)
def test_global_ratio(policy, add_lost, g_lost):
    add, g = _groups(engine.plan(_analysis(), _opts(policy=policy), ratio=0.5))
    assert add.pruned.tolist() == add_lost
    assert g.pruned.tolist() == g_lost


def test_backward_with_alternative_f():
    add, g = _groups(engine.plan(_analysis(S_F_ALT), _opts(policy="backward"), ratio=0.5))
    np.testing.assert_allclose(add.scores, [0.1179, 0.1038, 0.3019, 0.2028, 0.2736], atol=6e-5)
    assert add.pruned.tolist() == [0, 1]
    assert g.pruned.tolist() == [0, 2, 4]


@pytest.mark.parametrize(
    ("norm", "expected"),
    [
        ("standard_score", [-1.1414, 0.4637, -0.6064, 1.7121, -0.4280]),
        ("linear_scaling", [0, 0.5625, 0.1875, 1, 0.25]),
        ("softmax_norm", [0, 0.000911, 0.000002, 0.999080, 0.000006]),
    ],
)
def test_other_norms_on_g(norm, expected):
    plan = engine.plan(_analysis(), engine.PruningOptions(layer_norm=norm, step_op="none"))
    _, g = _groups(plan)
    np.testing.assert_allclose(g.scores, expected, atol=6e-5)


def test_pruning_the_example_is_exact_and_smaller():
    result = engine.prune(SpecNet().eval(), (torch.randn(2, 5, 3, 3),), _opts(policy="average"),
                          ratio=0.5)
    groups = {tuple(sorted(g["layers"])): g for g in result.report["groups"]}
    assert groups[("conv_F", "conv_x")]["pruned"] == [0, 1, 3]
    assert groups[("conv_G",)]["pruned"] == [0, 2]
    state = result.module.state_dict()
    assert tuple(state["conv_x.weight"].shape) == (2, 5, 1, 1)
    assert tuple(state["conv_G.weight"].shape) == (3, 2, 1, 1)
    assert tuple(state["head.weight"].shape) == (5, 2, 1, 1)
    assert result.report["verification"]["exact"] is True
    assert_equals_mask_mode(result)
    assert result.report["verification"]["max_abs_diff_vs_masked"] < 1e-4
