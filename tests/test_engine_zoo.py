"""Every coupling case on a small real model: pruned for real, and exact against mask mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import engine
from tests.helpers import assert_equals_mask_mode
from tests.zoo import ZOO, build


@pytest.fixture(scope="module")
def zoo_captured():
    """Each zoo model captured once for both reshape axes, with its output and its weights
    as they were before the capture (a prune must leave the user's model untouched)."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            model, inputs = build(name)
            with torch.no_grad():
                original = model(*inputs)
            before = {k: v.clone() for k, v in model.state_dict().items()}
            cache[name] = model, inputs, original, before, engine.analyze(model, inputs)
        return cache[name]

    return get


@pytest.mark.parametrize("axis", [-1, -2])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_prune_is_smaller_and_exact(name, axis, zoo_captured):
    model, inputs, original, before, analysis = zoo_captured(name)
    opts = engine.PruningOptions(reshape_channel_axis=axis)
    result = engine.prune(analysis, None, opts, ratio=0.5)
    report = result.report
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"the user's model changed: {key}"
    pruned_storage = {p.data_ptr() for p in result.module.parameters()}
    assert not pruned_storage & {p.data_ptr() for p in model.parameters()}
    assert report["after"]["params"] < report["before"]["params"]
    assert report["after"]["flops"] < report["before"]["flops"]
    verification = report["verification"]
    assert verification["output_shapes_match"]
    assert verification["exact"], verification
    with torch.no_grad():
        pruned = result.module(*inputs)
        masked = engine.masked(result.analysis, result.plan)(*inputs)
    assert pruned.shape == original.shape
    torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-5)
    for group in report["groups"]:
        assert len(group["kept"]) + len(group["pruned"]) == group["channels"]
        assert group["kept"], group["name"]


def _state(result):
    return {k: tuple(v.shape) for k, v in result.module.state_dict().items()}


def test_grouped_and_depthwise_structure():
    model, inputs = build("grouped_depthwise")
    result = engine.prune(model, inputs, ratio=0.5)
    shapes = _state(result)
    grouped_out, per_group_in = shapes["grouped.weight"][:2]
    assert grouped_out % 4 == 0 and per_group_in * 4 == shapes["stem.weight"][0]
    # depthwise keeps its channel multiplier 2 and reads every surviving grouped channel
    assert shapes["depthwise.weight"][0] == 2 * grouped_out
    assert shapes["depthwise.weight"][1] == 1
    assert shapes["pointwise.weight"][1] == shapes["depthwise.weight"][0]


def test_whole_heads_removed_with_gqa_groups_intact():
    model, inputs = build("attention_gqa")  # 4 query heads, 2 key/value heads, head_dim 8
    result = engine.prune(model, inputs, engine.PruningOptions(reshape_channel_axis=-2),
                          ratio=0.5)
    shapes = _state(result)
    q_out, k_out = shapes["q.weight"][0], shapes["k.weight"][0]
    assert k_out % 8 == 0 and q_out % 8 == 0, "whole heads of 8 channels"
    assert q_out == 2 * k_out, "each key/value head keeps its two query heads"
    assert shapes["o.weight"][1] == q_out


def test_head_dim_shrinks_in_every_head():
    model, inputs = build("attention_sdpa")  # 4 heads of 8
    result = engine.prune(model, inputs, engine.PruningOptions(reshape_channel_axis=-1),
                          ratio=0.5)
    q_out = _state(result)["q.weight"][0]
    assert q_out % 4 == 0 and q_out < 32, "4 heads remain, each with fewer channels"


def test_pixel_shuffle_removes_whole_subpixel_sets():
    model, inputs = build("pixel_shuffle")
    result = engine.prune(model, inputs, ratio=0.5)
    shapes = _state(result)
    assert shapes["conv1.weight"][0] == 4 * shapes["conv2.weight"][1]


def test_tied_weights_stay_tied_and_smaller():
    model, inputs = build("tied_embedding")
    result = engine.prune(model, inputs, ratio=0.5)
    params = dict(result.module.named_parameters(remove_duplicate=False))
    width = result.module(*inputs).shape
    assert width == (2, 7, 50)
    tied = [p for name, p in params.items() if name.endswith(("wte.weight", "lm_head.weight"))]
    assert tied and all(p.shape[0] == 50 and p.shape[1] < 24 for p in tied)
    assert result.report["after"]["params"] == sum(
        p.numel() for p in {id(p): p for p in params.values()}.values()
    )


def test_unknown_op_freezes_and_reports_it():
    model, inputs = build("conv_bn_residual")
    from tests.zoo import Unsupported

    torch.manual_seed(0)
    model, inputs = Unsupported().eval(), (torch.randn(2, 3, 4, 4),)
    an = engine.analyze(model, inputs)
    frozen = {tuple(f.layers): f.reason for f in an.frozen}
    assert ("a",) in frozen and "cummax" in frozen[("a",)]
    assert [g.layers for g in an.groups] == [["b"]]
    result = engine.prune(model, inputs, ratio=0.5)
    assert _state(result)["a.weight"][0] == 8, "the frozen layer keeps every channel"
    assert _state(result)["b.weight"][0] < 8
    assert any("cummax" in op for op in result.report["unsupported_ops"])


def test_channel_shuffle_feeding_grouped_conv_is_frozen_within_blocks():
    model, inputs = build("channel_shuffle")
    an = engine.analyze(model, inputs)
    reasons = " ".join(f.reason for f in an.frozen)
    assert "conflicting block layouts" in reasons


def test_ratio_zero_reproduces_the_original():
    model, inputs = build("attention_gqa")
    result = engine.prune(model, inputs, ratio=0.0)
    assert result.report["after"] == result.report["before"]
    with torch.no_grad():
        torch.testing.assert_close(result.module(*inputs), model(*inputs), rtol=0, atol=0)


def test_report_lists_layers_with_module_paths():
    model, inputs = build("conv_bn_residual")
    an = engine.analyze(model, inputs)
    assert [sorted(g.layers) for g in an.groups] == [["conv_a", "conv_c"], ["conv_b"]]
    assert set(an.groups[0].consumers) == {"bn_a", "conv_b", "head"}
    names = [g.name for g in an.groups]
    assert names == [g.name for g in engine.analyze(*build("conv_bn_residual")).groups]


def test_fused_qkv_viewed_as_three_heads_prunes_whole_heads():
    model, inputs = build("einsum_attention")  # qkv: Linear(24, 72) viewed (3, 3 heads, 8)
    result = engine.prune(model, inputs, engine.PruningOptions(reshape_channel_axis=-2),
                          ratio=0.5)
    width = _state(result)["qkv.weight"][0]
    assert width % 24 == 0 and width < 72, "q, k and v lose the same whole heads"
    assert result.report["verification"]["exact"]
    assert_equals_mask_mode(result)
    # within heads, q/k and v would have to keep the same head_dim: frozen, and said so
    an = engine.analyze(*build("einsum_attention"))
    assert any(f.layers == ["qkv"] and "spans several groups" in f.reason for f in an.frozen)


def test_group_norm_keeps_equal_groups_and_is_reported_inexact():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.GroupNorm(4, 16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 5, 1), torch.nn.Flatten(),
    ).eval()
    inputs = (torch.randn(2, 3, 4, 4),)
    result = engine.prune(model, inputs, ratio=0.5)
    kept = _state(result)["0.weight"][0]
    assert kept < 16 and kept % 4 == 0, "every one of the 4 groups keeps as many channels"
    assert _state(result)["1.weight"][0] == kept
    verification = result.report["verification"]
    assert verification["output_shapes_match"] and not verification["exact_expected"]
    assert verification["inexact_groups"] == [result.report["groups"][0]["name"]]
    with torch.no_grad():
        assert result.module(*inputs).shape == model(*inputs).shape


@pytest.mark.parametrize(
    "name", ["conv_bn_residual", "attention_gqa", "attention_sdpa", "swiglu", "cat_split_flatten",
             "grouped_depthwise"]
)
def test_core_aten_decomposed_programs_prune_like_the_originals(name):
    """A .pt2 run through run_decompositions() (addmm/bmm on permuted and expanded weights,
    convolution, _native_batch_norm_legit_no_training, SDPA unfolded into bmm with heads folded
    into the batch) loses exactly what the high-level program loses, and is exact."""
    model, inputs = build(name)
    program = torch.export.export(model, inputs)
    reference = engine.prune(program, inputs, ratio=0.5)
    result = engine.prune(program.run_decompositions(), inputs, ratio=0.5)
    assert result.report["after"]["params"] == reference.report["after"]["params"]
    assert result.report["after"]["params"] < result.report["before"]["params"]
    assert result.report["verification"]["exact"]
    with torch.no_grad():
        assert result.module(*inputs).shape == model(*inputs).shape


def test_tied_weight_is_scored_along_the_dimension_of_its_group():
    """A tied embedding/head weight is a member twice (vocab rows, hidden columns): the hidden
    group must score it by its hidden columns, not by its vocabulary rows."""
    model, inputs = build("tied_embedding")
    an = engine.analyze(model, inputs)
    weight = model.wte.weight.detach().double()
    (group,) = [g for g in an.groups if g.channels == 24]
    tied = [layer for layer in group.layers if layer in ("wte", "lm_head")]
    assert tied, group.layers
    raw = an.raw_scores("l2")[group.name][tied[0]]
    np.testing.assert_allclose(np.sort(raw), np.sort(weight.norm(dim=0).numpy()), rtol=1e-9)
