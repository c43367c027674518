"""transformers architectures built from configs (random weights, nothing downloaded)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as tf

import engine
from tests.helpers import assert_equals_mask_mode


# The default configs' widths (bert/vit/gpt2: hidden 768 in 12 heads of 64; ResNet-50's
# bottleneck stages 256..2048), with 2 layers or one bottleneck per stage: every structure
# of the full model once, in a fraction of the time (the depth repeats it, nothing here counts
# it; bench/ prunes the full-size models). The vocabularies (30522, 50257) are sizes of data,
# not of any pruned structure: 1000 tokens build the same groups for a fraction of the
# capture, copy and verification work.
def _resnet_bottleneck():
    model = tf.ResNetForImageClassification(tf.ResNetConfig(depths=[1, 1, 1, 1]))
    return model, (torch.randn(1, 3, 224, 224),)


def _mobilenet_v2():
    model = tf.MobileNetV2ForImageClassification(tf.MobileNetV2Config())
    return model, (torch.randn(1, 3, 224, 224),)


def _vit():
    model = tf.ViTForImageClassification(tf.ViTConfig(num_hidden_layers=2))
    return model, (torch.randn(1, 3, 224, 224),)


def _bert():
    model = tf.BertForSequenceClassification(tf.BertConfig(num_hidden_layers=2, vocab_size=1000))
    return model, (torch.randint(0, 1000, (1, 32)),)


def _gpt2():
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, vocab_size=1000, use_cache=False))
    return model, (torch.randint(0, 1000, (1, 32)),)


def _llama():
    config = tf.LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=1000, use_cache=False,
    )
    return tf.LlamaForCausalLM(config), (torch.randint(0, 1000, (1, 32)),)


MODELS = {
    "resnet_bottleneck": _resnet_bottleneck,
    "mobilenet_v2": _mobilenet_v2,
    "vit_base": _vit,
    "bert_base": _bert,
    "gpt2": _gpt2,
    "llama_gqa": _llama,
}


def _build(name):
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    return model.eval(), inputs


@pytest.fixture(scope="module")
def analyzed():
    """One capture per model, shared by the tests that prune it with different options (a
    prune copies what it cuts: the shared analysis stays the original's)."""
    cache: dict = {}

    def get(name):
        if name not in cache:
            model, inputs = _build(name)
            cache[name] = engine.analyze(model, inputs), inputs
        return cache[name]

    return get


def _check(result, min_removed=0.4):
    report = result.report
    removed = 1 - report["after"]["params"] / report["before"]["params"]
    assert removed >= min_removed, f"only {removed:.1%} of the parameters removed"
    verification = report["verification"]
    assert verification["output_shapes_match"]
    if verification["exact_expected"]:
        assert verification["exact"]
        assert_equals_mask_mode(result)
    # groups normalised over their channels (LayerNorm, RMSNorm) are the only inexact ones
    for name in verification["inexact_groups"]:
        assert any(g["name"] == name and not g["exact"] for g in report["groups"])
    return removed


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_global_half_with_default_options(name, analyzed):
    analysis, inputs = analyzed(name)
    result = engine.prune(analysis, ratio=0.5)
    _check(result)
    with torch.no_grad():
        out = result.module(*inputs)
    assert all(torch.isfinite(t).all() for t in (out if isinstance(out, tuple) else (out,)))


def _heads(result, layer_prefix):
    shapes = {k: v.shape for k, v in result.module.state_dict().items()}
    return {k: s[0] for k, s in shapes.items() if k.endswith(layer_prefix)}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "query", "head_dim", "heads"),
    [
        ("vit_base", "attention.q_proj.weight", 64, 12),
        ("bert_base", "attention.self.query.weight", 64, 12),
        ("llama_gqa", "self_attn.q_proj.weight", 32, 8),
    ],
)
def test_whole_heads_removed(name, query, head_dim, heads, analyzed):
    analysis, _ = analyzed(name)
    options = engine.PruningOptions(reshape_channel_axis=-2)
    result = engine.prune(analysis, None, options, ratio=0.5)
    _check(result, min_removed=0.3)
    widths = _heads(result, query)
    assert widths, "query projections found"
    assert all(w % head_dim == 0 for w in widths.values()), "whole heads of full width"
    assert min(widths.values()) < heads * head_dim, "some heads were removed"
    # the planned unit is a whole head (under GQA a key/value head with its query heads),
    # not a channel of every head, which at 0.5 would also leave widths of whole head_dims
    units = 2 if name == "llama_gqa" else heads
    query_layer = query.removesuffix(".weight")
    planned = [g for g in result.report["groups"]
               if any(layer.endswith(query_layer) for layer in g["layers"])]
    assert planned and all(g["channels"] == units for g in planned), planned
    if name == "llama_gqa":
        kv = _heads(result, "self_attn.k_proj.weight")
        for q_name, q_width in widths.items():
            k_width = kv[q_name.replace("q_proj", "k_proj")]
            assert q_width == 4 * k_width, "each key/value head keeps its 4 query heads"


def test_modeloutput_program_loads_without_transformers(tmp_path):
    config = tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, vocab_size=50)
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(config).eval()
    inputs = (torch.randint(0, 50, (1, 8)),)
    result = engine.prune(model, inputs, ratio=0.5)
    paths = engine.save(result, tmp_path)
    with torch.no_grad():
        expected = result.module(*inputs)[0]
    torch.save(inputs[0], tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        program = torch.export.load({str(paths['model.pt2'])!r})
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        out = program.module()(ids)
        assert "transformers" not in sys.modules
        print(float(out[0].sum()))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert abs(float(done.stdout.strip()) - float(expected.sum())) < 1e-4
    assert result.report["onnx"]["max_abs_diff_vs_torch"] < 1e-4


@pytest.fixture(scope="module")
def small_family():
    """One capture per family, shared by both reshape axes."""
    cache: dict = {}

    def get(family):
        if family not in cache:
            cache[family] = _small_family(family)
        return cache[family]

    return get


def _small_family(family: str) -> engine.Analysis:
    torch.manual_seed(0)
    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 128}
    if family == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=100, **small))
        inputs = (torch.randint(0, 100, (1, 12)),)
    elif family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=100, num_key_value_heads=2,
                                                   use_cache=False, **small))
        inputs = (torch.randint(0, 100, (1, 12)),)
    elif family == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4,
                                                 vocab_size=100, use_cache=False))
        inputs = (torch.randint(0, 100, (1, 12)),)
    else:
        model = tf.ViTForImageClassification(tf.ViTConfig(image_size=32, patch_size=8,
                                                          **small))
        inputs = (torch.randn(1, 3, 32, 32),)
    model.eval()
    return engine.analyze(model, inputs)


@pytest.mark.parametrize("axis", [-1, -2])
@pytest.mark.parametrize("family", ["bert", "llama", "gpt2", "vit"])
def test_with_normalised_streams_pinned_pruning_is_exact(family, axis, small_family):
    """Only the LayerNorm/RMSNorm-normalised hidden stream is inexact: pin it, and every
    other group (heads, MLPs) must match mask mode exactly."""
    an = small_family(family)
    options = engine.PruningOptions(reshape_channel_axis=axis)
    structure = an.structure(options.prunes_whole_blocks)
    inexact = [g.name for g in structure.groups if not g.exact and g.prunable.any()]
    assert inexact, "the hidden stream is normalised over its channels"
    plan = engine.plan(an, options, ratio=0.5, pinned=inexact)
    assert sum(len(g.pruned) for g in plan.groups) > 0
    result = engine.apply(an, plan)
    verification = result.report["verification"]
    assert verification["exact_expected"] and verification["exact"], verification
    assert_equals_mask_mode(result)
    assert result.report["after"]["params"] < result.report["before"]["params"]
