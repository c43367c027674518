"""hf/ after depth pruning: transformers models (random weights from tiny configs) whose whole
layers are removed are written as folders with fewer layers, renumbered, reloaded with
transformers and compared with model.pt2 and with the original model run without those
layers (an independent reference: transformers' own modules, layers deleted by hand)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf

import engine
from tests.helpers import cli

SEQ = 32


def _dampen(model, layers, family="llama"):
    """Make both residual branches of `layers` nearly silent, so depth pruning's own score
    ranks their attention and MLP blocks lowest (and removes whole layers)."""
    with torch.no_grad():
        for i in layers:
            if family == "gpt2":
                block = model.transformer.h[i]
                block.attn.c_proj.weight.mul_(1e-3)
                block.mlp.c_proj.weight.mul_(1e-3)
            else:
                layer = model.model.layers[i]
                layer.self_attn.o_proj.weight.mul_(1e-3)
                layer.mlp.down_proj.weight.mul_(1e-3)
    return model


def _llama(layers=4, tie=False):
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=layers, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=64,
                            tie_word_embeddings=tie)
    return tf.LlamaForCausalLM(config).eval()


def _without_layers(model, removed, family="llama"):
    """The original transformers model with the layers deleted by hand."""
    reference = copy.deepcopy(model)
    layers = reference.transformer.h if family == "gpt2" else reference.model.layers
    kept = torch.nn.ModuleList(m for i, m in enumerate(layers) if i not in removed)
    if family == "gpt2":
        reference.transformer.h = kept
    else:
        reference.model.layers = kept
    reference.config.num_hidden_layers = len(kept)
    reference.config.use_cache = False
    if getattr(reference.config, "layer_types", None):
        reference.config.layer_types = [t for i, t in enumerate(reference.config.layer_types)
                                        if i not in removed]
    return reference


def _reload(folder):
    return tf.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


def _ids():
    return torch.randint(0, 100, (1, SEQ), generator=torch.Generator().manual_seed(1))


def _pt2_logits(out, ids):
    program = torch.export.load(out / "model.pt2").module()
    with torch.no_grad():
        out = program(ids, torch.ones_like(ids))
    return out if isinstance(out, torch.Tensor) else out[0]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _removed(result):
    return [b["name"] for b in result.report["blocks"] if b["removed"]]


def test_whole_llama_layers_removed_give_a_smaller_renumbered_folder(tmp_path):
    model = _dampen(_llama(), (1, 2))
    result = engine.prune(model, seq_len=SEQ, remove_blocks=4)
    assert sorted(_removed(result)) == sorted(
        f"model.layers.{i}.{part}" for i in (1, 2) for part in ("self_attn", "mlp"))
    engine.save(result, tmp_path, onnx=False)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["hf"]["written"] and report["hf"]["config"]["num_hidden_layers"] == 2
    reloaded = _reload(tmp_path / "hf")
    assert reloaded.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in reloaded.model.layers] == [0, 1]
    # model.layers.3 of the original is model.layers.1 of the folder
    assert torch.equal(reloaded.model.layers[1].mlp.up_proj.weight,
                       model.model.layers[3].mlp.up_proj.weight)
    ids = _ids()
    with torch.no_grad():
        got = reloaded(input_ids=ids, use_cache=False).logits
        want = _without_layers(model, {1, 2})(input_ids=ids).logits
    assert _rel(got, _pt2_logits(tmp_path, ids)) <= 1e-5
    assert _rel(got, want) <= 1e-5
    # the key/value cache holds one entry per remaining layer and continues the sequence
    with torch.no_grad():
        first = reloaded(input_ids=ids[:, :-1], use_cache=True)
        step = reloaded(input_ids=ids[:, -1:], cache=first.past_key_values,
                        use_cache=True).logits
    assert len(first.past_key_values.layers) == 2
    assert _rel(step[:, -1], got[:, -1]) <= 1e-5


def test_layers_removed_then_uniform_width_pruning(tmp_path):
    """With tied input and output embeddings (one weight under one name once re-captured)."""
    model = _dampen(_llama(layers=3, tie=True), (1,))  # 3 layers: cheaper captures
    result = engine.prune(model, seq_len=SEQ, remove_blocks=2, ratio=0.5, uniform=True)
    assert sorted(_removed(result)) == ["model.layers.1.mlp", "model.layers.1.self_attn"]
    engine.save(result, tmp_path, onnx=False)
    entry = json.loads((tmp_path / "report.json").read_text())["hf"]
    assert entry["written"], entry
    reloaded = _reload(tmp_path / "hf")
    config = reloaded.config
    assert config.num_hidden_layers == 2
    assert config.intermediate_size < 128 and config.hidden_size < 64
    assert config.tie_word_embeddings
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    shapes = {k: tuple(v.shape) for k, v in result.module.state_dict().items()}
    assert shapes["model.layers.2.mlp.up_proj.weight"] == (config.intermediate_size,
                                                           config.hidden_size)
    ids = _ids()
    with torch.no_grad():
        got = reloaded(input_ids=ids, use_cache=False).logits
    assert _rel(got, _pt2_logits(tmp_path, ids)) <= 1e-5


def test_qwen2_layer_types_follow_the_removed_layer(tmp_path):
    """Layer 2 uses sliding-window attention (window 4 < 32 tokens): removing layer 1 must
    leave [full, sliding] (not the first two entries, [full, full]), or the reloaded model
    attends differently. 3 layers: a cheaper capture than 4, the same premise."""
    torch.manual_seed(0)
    config = tf.Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                            use_sliding_window=True, sliding_window=4, max_window_layers=2,
                            max_position_embeddings=64)
    model = _dampen(tf.Qwen2ForCausalLM(config).eval(), (1,))
    result = engine.prune(model, seq_len=SEQ, remove_blocks=2)
    assert sorted(_removed(result)) == ["model.layers.1.mlp", "model.layers.1.self_attn"]
    engine.save(result, tmp_path, onnx=False)
    reloaded = _reload(tmp_path / "hf")
    assert model.config.layer_types == ["full_attention", "full_attention",
                                        "sliding_attention"]
    assert reloaded.config.layer_types == ["full_attention", "sliding_attention"]
    assert reloaded.config.max_window_layers == 1
    ids = _ids()
    with torch.no_grad():
        got = reloaded(input_ids=ids, use_cache=False).logits
        want = _without_layers(model, {1})(input_ids=ids).logits
    assert _rel(got, _pt2_logits(tmp_path, ids)) <= 1e-5
    assert _rel(got, want) <= 1e-5


def test_gpt2_names_and_n_layer():
    """GPT-2 names its layer list transformer.h and its count n_layer."""
    import dataclasses

    from engine.io.hf import source_of_model
    from engine.io.hf_config import NotDescribable
    from engine.io.hf_depth import config_update, renumber

    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=100,
                                             n_positions=64))
    hf = dataclasses.replace(source_of_model(model), layer_list="transformer.h",
                             removed_layers=(1,))
    assert config_update(hf) == {"n_layer": 2}
    names = renumber(hf, ["transformer.h.0.ln_1.weight", "transformer.h.2.mlp.c_fc.weight",
                          "transformer.h.12x.weight", "lm_head.weight"])
    assert names == {"transformer.h.0.ln_1.weight": "transformer.h.0.ln_1.weight",
                     "transformer.h.2.mlp.c_fc.weight": "transformer.h.1.mlp.c_fc.weight",
                     "transformer.h.12x.weight": "transformer.h.12x.weight",
                     "lm_head.weight": "lm_head.weight"}
    with pytest.raises(NotDescribable, match="transformer.h.1.ln_2.weight stays"):
        renumber(hf, ["transformer.h.1.ln_2.weight"])


def test_gpt2_whole_layer_removed_end_to_end(tmp_path):
    """GPT-2's attention add is its MLP's stream: removing both (consecutive blocks) must
    remove the layer, not add the attention branch back."""
    torch.manual_seed(0)
    config = tf.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=100, n_positions=64)
    model = _dampen(tf.GPT2LMHeadModel(config).eval(), (1,), family="gpt2")
    result = engine.prune(model, seq_len=SEQ, remove_blocks=2)
    assert sorted(_removed(result)) == ["transformer.h.1.attn", "transformer.h.1.mlp"]
    engine.save(result, tmp_path, onnx=False)
    reloaded = _reload(tmp_path / "hf")
    assert reloaded.config.n_layer == 2
    assert [block.attn.layer_idx for block in reloaded.transformer.h] == [0, 1]
    assert torch.equal(reloaded.transformer.h[1].mlp.c_fc.weight,
                       model.transformer.h[2].mlp.c_fc.weight)
    ids = _ids()
    with torch.no_grad():
        got = reloaded(input_ids=ids, use_cache=False).logits
        want = _without_layers(model, {1}, family="gpt2")(input_ids=ids).logits
    assert _rel(got, want) <= 1e-5
    assert _rel(got, _pt2_logits(tmp_path, ids)) <= 1e-5


def test_one_sublayer_removed_is_not_describable(tmp_path):
    model = _llama(layers=2)  # 2 layers: a cheaper capture than 3, the same premise
    with torch.no_grad():  # only the MLP of layer 1 is silent: its attention stays
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-3)
    result = engine.prune(model, seq_len=SEQ, remove_blocks=1)
    assert _removed(result) == ["model.layers.1.mlp"]
    with pytest.warns(UserWarning, match="hf/ not written"):
        engine.save(result, tmp_path, onnx=False)
    entry = json.loads((tmp_path / "report.json").read_text())["hf"]
    assert entry["written"] is False
    assert "\n" not in entry["reason"]
    assert "model.layers.1.mlp" in entry["reason"] and "whole layers" in entry["reason"]
    assert not (tmp_path / "hf").exists()
    assert (tmp_path / "model.pt2").is_file()


def test_cli_on_a_folder_writes_hf_with_fewer_layers(tmp_path, capfd):
    folder = tmp_path / "llama"
    _dampen(_llama(layers=3), (1,)).save_pretrained(folder)
    rc, _out, err = cli(capfd, "prune", folder, "--remove-blocks", "2", "--uniform",
                        "--ratio", "0.3", "--out", tmp_path / "o", "--no-onnx")
    assert rc == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["hf"]["written"], report["hf"]
    reloaded = _reload(tmp_path / "o" / "hf")
    assert reloaded.config.num_hidden_layers == 2
    assert reloaded.config.intermediate_size < 128
    ids = _ids()
    with torch.no_grad():
        got = reloaded(input_ids=ids, use_cache=False).logits
    assert _rel(got, _pt2_logits(tmp_path / "o", ids)) <= 1e-5


def test_post_norm_bert_layer_keeps_its_layernorms_so_no_hf(tmp_path):
    """BERT normalises after each residual add: removing both blocks of a layer leaves its
    LayerNorms, which a config with fewer layers cannot hold. 2 layers: a cheaper capture
    than 3; layer 1's LayerNorms stay all the same."""
    torch.manual_seed(0)
    config = tf.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, vocab_size=100)
    model = tf.BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.output.dense.weight.mul_(1e-3)
        model.bert.encoder.layer[1].output.dense.weight.mul_(1e-3)
    result = engine.prune(model, seq_len=16, remove_blocks=2)
    assert sorted(_removed(result)) == ["bert.encoder.layer.1", "bert.encoder.layer.1.attention"]
    with pytest.warns(UserWarning, match="hf/ not written"):
        engine.save(result, tmp_path, onnx=False)
    entry = json.loads((tmp_path / "report.json").read_text())["hf"]
    assert entry["written"] is False and "\n" not in entry["reason"]
    assert "bert.encoder.layer.1." in entry["reason"] and "LayerNorm" in entry["reason"]
    assert not (tmp_path / "hf").exists()
