"""engine/graph/repeat.py: the graph of N decoder layers built from a 2-layer capture equals
the capture of all N layers, node for node (operation, parameter, inputs, shape); where the
layers are not alike, the streamed prune captures all of them."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from engine.graph.capture import capture_module
from engine.graph.repeat import repeat_layers
from engine.io.hf import HFSource, example_inputs_for
from engine.stream import REPEATABLE_MODEL_TYPES, capture_layers


def _meta(config):
    with torch.device("meta"):
        return tf.AutoModelForCausalLM.from_config(config).eval()


def _llama(layers: int) -> tf.LlamaConfig:
    return tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                          tie_word_embeddings=False)


def _canonical(gm: torch.fx.GraphModule) -> list[tuple]:
    """Each node as (op, target, its inputs by position, shape): names left out (fx numbers
    a copied node's name differently from the traced one)."""
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}

    def arg(x):
        if isinstance(x, torch.fx.Node):
            return ("node", position[x])
        if isinstance(x, (list, tuple)):
            return tuple(arg(y) for y in x)
        return repr(x)

    out = []
    for n in nodes:
        val = n.meta.get("val")
        out.append((n.op, str(n.target), tuple(arg(a) for a in n.args),
                    tuple(sorted((k, arg(v)) for k, v in n.kwargs.items())),
                    tuple(val.shape) if isinstance(val, torch.Tensor) else None))
    return out


def _four_and_two(config_with) -> tuple:
    """The captures of 4 layers and of 2 layers of one config, and the 4-layer tensors."""
    full = _meta(config_with(4))
    inputs, names = example_inputs_for(full, None, None)
    whole = capture_module(full, inputs, input_names=names).program.module()
    two = capture_module(_meta(config_with(2)), inputs, input_names=names).program.module()
    tensors = dict(full.named_parameters())
    tensors.update(full.named_buffers())
    return whole, two, tensors


@pytest.fixture(scope="module")
def captures():
    return _four_and_two(_llama)


def test_two_layers_repeated_equal_the_capture_of_all_four(captures):
    whole, two, tensors = captures
    built = repeat_layers(two, "model.layers", 4, tensors)
    assert built is not None
    want, got = _canonical(whole), _canonical(built)
    assert len(got) == len(want) > len(_canonical(two))
    for i, (a, b) in enumerate(zip(want, got)):
        assert a == b, (i, a, b)
    params = {str(n.target) for n in built.graph.nodes if n.op == "get_attr"}
    assert "model.layers.3.mlp.down_proj.weight" in params
    assert built.get_parameter("model.layers.3.mlp.down_proj.weight").shape == (32, 48)


def test_a_graph_that_is_not_two_alike_layers_is_refused(captures):
    whole, two, tensors = captures
    assert repeat_layers(whole, "model.layers", 6, tensors) is None  # four layers, not two
    assert repeat_layers(two, "model.blocks", 4, tensors) is None  # no such layers


def _source(config, model) -> HFSource:
    return HFSource(type(model).__name__, config, ("input_ids",), None, ())


def test_layers_that_differ_are_captured_whole():
    # sliding-window attention in the first layer only: layer types differ
    config = tf.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                            use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert len(set(config.layer_types)) == 2
    model = _meta(config)
    inputs, _ = example_inputs_for(model, None, None)
    _, module, report = capture_layers(model, inputs, _source(config, model), torch.float32)
    assert module is None
    assert report["captured_layers"] == "all" and "layer types differ" in \
        report["why_not_repeated"]
    config = _llama(3)
    model = _meta(config)
    _, module, report = capture_layers(model, inputs, _source(config, model), torch.float32)
    assert module is not None and report["captured_layers"] == 2


@pytest.mark.parametrize("model_type", sorted(REPEATABLE_MODEL_TYPES - {"llama"}))
def test_every_model_type_allowed_to_repeat_equals_its_full_capture(model_type):
    def config(layers):
        return tf.AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=layers, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8, vocab_size=50,
                                       pad_token_id=0)

    whole, two, tensors = _four_and_two(config)
    built = repeat_layers(two, "model.layers", 4, tensors)
    assert built is not None and _canonical(built) == _canonical(whole)
