"""Coverage cases of issue 11: each new op or weight form pruned for real, exact where it
can be, and every layer left alone explained."""

from __future__ import annotations

import pytest
import torch

import engine
from engine.errors import PruneScopeError
from engine.graph import ops
from tests.architectures import unexplained_layers
from tests.coverage_models import COVERAGE, build
from tests.helpers import assert_equals_mask_mode
from tests.zoo import build as build_zoo

PRUNABLE = [name for name in COVERAGE if name != "data_dependent_gather"]
INEXACT_BY_DESIGN = {"weight_std_batch_norm", "weight_std_var_mean", "weight_norm"}


def _shapes(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _prune(name: str, axis: int = -1, **kwargs):
    model, inputs = build(name)
    options = engine.PruningOptions(reshape_channel_axis=axis)
    return model, inputs, engine.prune(model, inputs, options, ratio=0.5, **kwargs)


@pytest.mark.parametrize("axis", [-1, -2])
@pytest.mark.parametrize("name", PRUNABLE)
def test_pruned_verified_and_explained(name, axis):
    model, inputs, result = _prune(name, axis)
    report = result.report
    assert report["after"]["params"] < report["before"]["params"]
    verification = report["verification"]
    assert verification["output_shapes_match"]
    if name in INEXACT_BY_DESIGN:
        # the weight is normalised over its input channels: removing them changes it
        assert verification["inexact_groups"], verification
    else:
        assert verification["exact_expected"] and verification["exact"], verification
    with torch.no_grad():
        pruned = result.module(*inputs)
        masked = engine.masked(result.analysis, result.plan)(*inputs)
        original = model(*inputs)
    assert pruned.shape == original.shape
    if verification["exact_expected"]:
        torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-5)
    assert report["unsupported_ops"] == []
    assert unexplained_layers(result) == []


def test_roll_over_the_channels_is_a_permutation_of_the_kept_ones():
    model, inputs, result = _prune("roll_channels")
    kept = result.report["groups"][0]["kept"]
    assert 0 < len(kept) < 16
    a = result.module.get_submodule("a")
    # the pruned layer keeps exactly the planned filters of the original
    torch.testing.assert_close(a.weight, model.a.weight[kept])
    # independent check: roll the original features, zero the removed channels, apply b
    with torch.no_grad():
        features = torch.relu(model.a(inputs[0]))
        mask = torch.zeros(16)
        mask[kept] = 1
        rolled = torch.roll(features * mask[None, :, None, None], 5, dims=1)
        expected = model.b(rolled).mean(dim=(2, 3))
        torch.testing.assert_close(result.module(*inputs), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", ["batch_norm", "var_mean"])
def test_weight_standardisation_output_channels_are_exact(form):
    """Pin the channels read by the standardised conv: the rest (b's filters, read by a plain
    conv) must be pruned and match mask mode exactly."""
    model, inputs = build(f"weight_std_{form}")
    an = engine.analyze(model, inputs)
    names = {tuple(g.layers): g.name for g in an.groups}
    plan = engine.plan(an, {}, ratio=0.5, pinned=[names[("a",)]])
    result = engine.apply(an, plan)
    shapes = _shapes(result.module)
    assert shapes["b.weight"][0] < 24 and shapes["b.weight"][1:] == (16, 3, 3)
    assert shapes["c.weight"][1] == shapes["b.weight"][0]
    verification = result.report["verification"]
    assert verification["exact_expected"] and verification["exact"], verification
    # independently: standardise the kept filters of the original, run the rest by hand
    kept = torch.as_tensor(result.plan.group(names[("b",)]).kept)
    F = torch.nn.functional
    with torch.no_grad():
        w = model.b.weight[kept]
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / torch.sqrt(
            w.var(dim=(1, 2, 3), unbiased=False, keepdim=True) + (1e-6 if form ==
                                                                  "batch_norm" else 1e-5))
        h = F.relu(model.a(inputs[0]))
        h = F.relu(F.conv2d(h, w, model.b.bias[kept], padding=1))
        expected = F.conv2d(h, model.c.weight[:, kept], model.c.bias).mean(dim=(2, 3))
        torch.testing.assert_close(result.module(*inputs), expected, rtol=1e-4, atol=1e-5)


def test_weight_norm_slices_g_and_v_together():
    _, _, result = _prune("weight_norm")
    shapes = _shapes(result.module)
    g = shapes["conv.parametrizations.weight.original0"]
    v = shapes["conv.parametrizations.weight.original1"]
    assert g[0] == v[0] < 16 and g[1:] == (1, 1, 1)
    fc_g = shapes["fc.parametrizations.weight.original0"]
    fc_v = shapes["fc.parametrizations.weight.original1"]
    assert fc_g[0] == fc_v[0] < 32 and fc_v[1] == v[0]
    assert shapes["head.weight"][1] == fc_v[0]
    groups = {tuple(g["layers"]) for g in result.report["groups"] if g["pruned"]}
    assert ("conv",) in groups and ("fc",) in groups, "layers named after their modules"


def test_weight_norm_output_channels_are_exact():
    model, inputs = build("weight_norm")
    an = engine.analyze(model, inputs)
    names = {tuple(g.layers): g.name for g in an.groups}
    plan = engine.plan(an, {}, ratio=0.5, pinned=[names[("conv",)]])
    result = engine.apply(an, plan)
    assert len(plan.group(names[("fc",)]).pruned) > 0
    verification = result.report["verification"]
    assert verification["exact_expected"] and verification["exact"], verification


def test_relative_bias_table_loses_whole_heads_with_its_heads():
    _, _, result = _prune("relative_bias_attention", axis=-2)
    shapes = _shapes(result.module)
    q_out = shapes["qkv_q.weight"][0]
    assert q_out % 8 == 0 and q_out < 32, "whole heads of 8 channels removed"
    assert shapes["table"] == (11, q_out // 8), "the table keeps one column per kept head"


def test_relative_bias_table_is_explained_when_heads_stay():
    model, inputs = build("relative_bias_attention")
    an = engine.analyze(model, inputs)
    reasons = {layer: f.reason for f in an.frozen for layer in f.layers}
    assert "per-head table" in reasons["table"]


def test_data_dependent_channels_frozen_with_reason():
    _, _, result = _prune("data_dependent_gather")
    reasons = {layer: f["reason"] for f in result.report["frozen"] for layer in f["layers"]}
    assert "argsort" in reasons["a"]
    assert "aten.gather.default" in result.report["unsupported_ops"]
    assert result.report["after"]["params"] == result.report["before"]["params"]
    assert unexplained_layers(result) == []


def _raising(error_in_apply: bool):
    original = ops.RULES["aten.relu"]

    def rule(t, node):
        if t.apply_pass == error_in_apply:
            return [1.5][0] + "unexpected"  # a rule bug: TypeError on odd arguments
        return original(t, node)

    return rule


def test_a_failing_op_rule_freezes_what_it_touches(monkeypatch):
    monkeypatch.setitem(ops.RULES, "aten.relu", _raising(error_in_apply=False))
    model, inputs = build_zoo("conv_bn_residual")
    result = engine.prune(model, inputs, ratio=0.5)
    reasons = " | ".join(f["reason"] for f in result.report["frozen"])
    assert "aten.relu.default: unexpected arguments (TypeError" in reasons
    assert result.report["verification"]["exact"]
    assert_equals_mask_mode(result)
    assert unexplained_layers(result) == []


def test_a_failure_while_rewriting_is_one_line(monkeypatch):
    monkeypatch.setitem(ops.RULES, "aten.relu", _raising(error_in_apply=True))
    model, inputs = build_zoo("conv_bn_residual")
    with pytest.raises(PruneScopeError) as info:
        engine.prune(model, inputs, ratio=0.5)
    message = str(info.value)
    assert "\n" not in message and "removing the planned channels failed" in message
    assert "relu" in message
