"""Real architectures (tiny transformers configs, random weights) as a new user prunes them,
and the promise that every layer left alone is explained, over every model of the zoo.

The wide sweep (about seventy architectures, ONNX included) is ``python -m bench
coverage_v2``; here a fast subset with one model of each hard case.
"""

from __future__ import annotations

import pytest

import engine
from tests import coverage_models, zoo
from tests.architectures import ARCHITECTURES, unexplained_layers
from tests.architectures import build as build_architecture
from tests.helpers import assert_equals_mask_mode

FAST = [
    "BiT (weight standardisation)",  # weights standardised before the conv
    "Swin",  # roll (shifted windows), padding, relative position bias tables
    "T5 encoder",  # relative attention bias, tied embeddings
    "Mamba",  # state-space model: the mixer is frozen with reasons
    "LSTM tagger",  # recurrent: input channels pruned, hidden units kept
    "DistilBERT",
    "Qwen2",
]


def _removed(report) -> float:
    return 1 - report["after"]["params"] / report["before"]["params"]


@pytest.fixture(scope="module")
def captured():
    """One capture per architecture, shared by the tests that prune it (a prune copies what
    it cuts: the shared analysis stays the original's)."""
    cache: dict = {}

    def get(name: str) -> engine.Analysis:
        if name not in cache:
            cache[name] = engine.analyze(*build_architecture(name))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def half(captured):
    """The default prune at ratio 0.5 of an architecture, once: several tests read it, each
    for its own aspect."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = engine.prune(captured(name), ratio=0.5)
        return cache[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", FAST)
def test_architecture_prunes_verifies_and_explains(name, half):
    result = half(name)
    report = result.report
    verification = report["verification"]
    assert verification["output_shapes_match"]
    if verification["exact_expected"]:
        assert verification["exact"], verification
        assert_equals_mask_mode(result)
    minimum = 0.1 if name == "LSTM tagger" else 0.2
    assert _removed(report) >= minimum, f"only {_removed(report):.1%} removed"
    assert unexplained_layers(result) == []
    for entry in report["frozen"]:
        assert entry["reason"] and entry["layers"]


@pytest.mark.slow
def test_bit_standardised_convs_are_pruned(half):
    result = half("BiT (weight standardisation)")
    before = {k: tuple(v.shape) for k, v in result.analysis.gm.state_dict().items()}
    after = {k: tuple(v.shape) for k, v in result.module.state_dict().items()}
    convs = [k for k in before if k.endswith(".weight") and len(before[k]) == 4]
    assert len(convs) >= 8
    shrunk = [k for k in convs if after[k][0] < before[k][0]]
    assert len(shrunk) >= 0.75 * len(convs), "the global ranking may spare a few small layers"
    frozen = {layer for f in result.report["frozen"] for layer in f["layers"]}
    assert not frozen & {k.rsplit(".", 1)[0] for k in convs}


@pytest.mark.slow
def test_swin_exports_to_onnx_after_pruning(tmp_path, half):
    """The shifted-window model used to fail its ONNX export ("Cannot view a tensor ...")."""
    result = half("Swin")
    assert _removed(result.report) >= 0.3, "the hidden stream is pruned despite the padding"
    assert "aten.roll.default" not in result.report["unsupported_ops"]
    paths = engine.save(result, tmp_path)
    assert paths["model.onnx"].stat().st_size > 0
    assert result.report["onnx"]["max_abs_diff_vs_torch"] < 1e-4


@pytest.mark.slow
def test_swin_whole_heads_slice_the_bias_tables(captured):
    result = engine.prune(captured("Swin"), None, engine.PruningOptions(reshape_channel_axis=-2),
                          ratio=0.5)
    after = {k: tuple(v.shape) for k, v in result.module.state_dict().items()}
    before = {k: tuple(v.shape) for k, v in result.analysis.gm.state_dict().items()}
    tables = [k for k in after if k.endswith("relative_position_bias_table")]
    assert tables and any(after[k][1] < before[k][1] for k in tables)
    for k in tables:
        query = k.replace("relative_position_bias.relative_position_bias_table", "q_proj.weight")
        if query in after:
            assert after[query][0] == after[k][1] * (before[query][0] // before[k][1])


def _all_small_models():
    for name in sorted(zoo.ZOO):
        yield f"zoo:{name}", lambda name=name: zoo.build(name)
    for name in sorted(coverage_models.COVERAGE):
        yield f"coverage:{name}", lambda name=name: coverage_models.build(name)


@pytest.mark.parametrize(("label", "factory"), list(_all_small_models()))
def test_every_layer_is_pruned_or_explained(label, factory):
    analysis = engine.analyze(*factory())  # one capture, pruned along both axes
    for axis in (-1, -2):
        result = engine.prune(analysis, None, engine.PruningOptions(reshape_channel_axis=axis),
                              ratio=0.5)
        assert unexplained_layers(result) == [], (label, axis)


def test_the_sweep_lists_every_family():
    families = {family for family, _ in ARCHITECTURES.values()}
    assert {"vision CNN", "vision transformer", "audio", "text encoder", "decoder LLM",
            "mixture of experts", "state-space", "recurrent"} <= families
    assert len(ARCHITECTURES) >= 50


def test_an_unexplained_layer_would_be_caught():
    """The checker itself: a layer the engine never saw (a parameter used by an op without
    a rule) is reported unless the engine lists it as frozen."""
    model, inputs = coverage_models.build("data_dependent_gather")
    result = engine.prune(model, inputs, ratio=0.5)
    result.report["frozen"] = [f for f in result.report["frozen"] if f["layers"] != ["a"]]
    assert unexplained_layers(result) == ["a"]


@pytest.mark.slow
def test_t5_relative_attention_bias_loses_the_removed_heads(captured):
    """T5's bias is an embedding of (buckets, heads), computed in the first layer and passed
    to every layer's attention as its float mask: one head index across all layers."""
    result = engine.prune(captured("T5 encoder"), None,
                          engine.PruningOptions(reshape_channel_axis=-2), ratio=0.5)
    after = {k: tuple(v.shape) for k, v in result.module.state_dict().items()}
    bias = next(v for k, v in after.items() if k.endswith("relative_attention_bias.weight"))
    queries = [v for k, v in after.items() if k.endswith("SelfAttention.q.weight")]
    assert bias[1] < 4, "heads were removed"
    assert all(q[0] == bias[1] * 16 for q in queries), "every layer keeps the same heads"
    assert result.report["verification"]["exact"]
    assert_equals_mask_mode(result)
