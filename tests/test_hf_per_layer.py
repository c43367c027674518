"""Non-uniform plans in OUT/hf/ through transformers' heterogeneous configs
(``per_layer_config``): which widths a model type's code reads per layer is measured by
building it on the meta device (engine/io/hf_config.py), the per-layer values are solved
from the pruned shapes, and the folder is reloaded and compared like any hf/.

Step3p7 (``Step3p7TextModel``, model type ``step3p5``) reads its attention head counts per
layer; Llama reads nothing per layer, so a non-uniform Llama plan says --uniform is needed."""

from __future__ import annotations

import json

import pytest
import torch

import engine
from engine.io.hf import source_of_model
from engine.io.hf_config import per_layer_fields, solve_config, solve_per_layer
from engine.io.hf_export import build_pretrained, write_hf

tf = pytest.importorskip("transformers")
step3p7 = pytest.importorskip("transformers.models.step3p7.modeling_step3p7")

SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": 100,
         "use_cache": False, "pad_token_id": 0}
# layer 0 keeps 2 query heads reading 1 key/value head; layer 1 stays whole
HETERO = {0: {"num_attention_heads": 2, "num_key_value_heads": 1}}


def _step_config(**extra):
    cls = step3p7.Step3p7TextModel.config_class
    return cls(**{**SMALL, **extra}, mlp_layer_types=["dense", "dense"],
               layer_types=["full_attention", "full_attention"], sliding_window=64)


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def step_fields():
    return per_layer_fields(step3p7.Step3p7TextModel, _step_config())


def test_per_layer_fields_are_measured(step_fields):
    # the head counts move only their own layer's projections; the MLP width is global
    assert {"num_attention_heads", "num_key_value_heads"} <= set(step_fields)
    assert "intermediate_size" not in step_fields
    heads = step_fields["num_attention_heads"]
    assert set(heads) == {0, 1}
    assert ("layers.0.self_attn.q_proj.weight", 0) in heads[0].dims
    assert not any(".layers.1." in f".{p}" for p, _ in heads[0].dims)
    llama = tf.LlamaConfig(**{k: v for k, v in SMALL.items() if k != "head_dim"})
    assert per_layer_fields(tf.LlamaForCausalLM, llama) == {}


def test_solve_per_layer_from_shapes():
    config = _step_config()
    target = _step_config(intermediate_size=96, per_layer_config=HETERO)
    with torch.device("meta"):
        shapes = _shapes(step3p7.Step3p7TextModel(target))
    with pytest.raises(Exception, match="cannot describe"):
        solve_config(step3p7.Step3p7TextModel, config, shapes)
    new = solve_per_layer(step3p7.Step3p7TextModel, config, shapes)
    assert new is not None
    assert new.intermediate_size == 96
    assert json.loads(json.dumps(new.to_dict()["per_layer_config"])) == {
        "0": {"num_attention_heads": 2, "num_key_value_heads": 1}}


def test_heterogeneous_hf_folder_reloads_equal(tmp_path):
    """The export path end to end: weights of layer-0-narrower shapes (a model built from
    the heterogeneous config stands for the pruned module) are written through a solved
    per_layer_config, saved, reloaded with from_pretrained and give the same outputs."""
    torch.manual_seed(0)
    original = step3p7.Step3p7TextModel(_step_config()).eval()
    pruned = step3p7.Step3p7TextModel(_step_config(per_layer_config=HETERO)).eval()
    source = source_of_model(original, ("input_ids",))
    fresh = build_pretrained(source, pruned)
    assert fresh.config.is_heterogeneous
    fresh.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["per_layer_config"]["0"] == HETERO[0]
    reloaded = step3p7.Step3p7TextModel.from_pretrained(tmp_path, local_files_only=True).eval()
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pruned(ids).last_hidden_state
        got = reloaded(ids).last_hidden_state
    assert reloaded.layers[0].self_attn.q_proj.weight.shape == (32, 64)
    assert torch.allclose(got, want, rtol=0, atol=1e-6)


def test_non_uniform_plan_without_per_layer_support_says_uniform(tmp_path):
    torch.manual_seed(0)
    llama = tf.LlamaConfig(**{k: v for k, v in SMALL.items() if k != "head_dim"})
    tf.LlamaForCausalLM(llama).eval().save_pretrained(tmp_path / "in")
    # layer 1's MLP stays whole while layer 0's loses channels: one size per config no more
    result = engine.prune(str(tmp_path / "in"), ratio=0.5, options={"reshape_channel_axis": -2},
                          pinned=["model.layers.1.mlp.gate_proj+1"])
    # the hf/ writer alone (engine.save's model.pt2 is not looked at here; save's refusal
    # path, report entry and no hf/ folder, is tests/test_hf_folders.py's)
    hf = write_hf(result, tmp_path / "out" / "hf")
    assert not hf["written"]
    assert "--uniform is needed" in hf["reason"]
    assert "reads no width from per_layer_config" in hf["reason"]
    assert not (tmp_path / "out").exists()
