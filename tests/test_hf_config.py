"""--uniform plans a transformers config can describe, found from the config itself
(engine/io/hf_config.py): which fields set which weight dimensions (measured by building the
model on the meta device), groups no changeable field sets kept whole, groups one field sets
tied. Folders are written here with save_pretrained from tiny configs (random weights),
pruned from the folder, and OUT/hf/ is reloaded with the Auto class and compared with the
pruned model.pt2 loaded from disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils import _pytree as pytree

import engine
from engine.io.hf_config import field_roles, probe_config
from engine.scoring.uniform import proportional_counts

tf = pytest.importorskip("transformers")

SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 128, "vocab_size": 100}
# (config, model class, Auto class, a group the config fixes and a word of its reason)
MODELS = {
    "roberta": (lambda: tf.RobertaConfig(**SMALL, num_labels=3),
                "RobertaForSequenceClassification", "AutoModelForSequenceClassification",
                "classifier.dense", "hidden_size"),
    "electra": (lambda: tf.ElectraConfig(**SMALL, embedding_size=32, num_labels=3),
                "ElectraForSequenceClassification", "AutoModelForSequenceClassification",
                "classifier.dense", "hidden_size"),
    "deit": (lambda: tf.DeiTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128, image_size=32, patch_size=8),
             "DeiTForImageClassification", "AutoModelForImageClassification",
             "deit.layers.0.attention.v_proj", "head size"),
    "opt": (lambda: tf.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 ffn_dim=128, vocab_size=100, word_embed_proj_dim=64),
            "OPTForCausalLM", "AutoModelForCausalLM",
            "model.decoder.layers.0.self_attn.v_proj", "head size"),
    "phi3": (lambda: tf.Phi3Config(**SMALL, num_key_value_heads=2, pad_token_id=0),
             "Phi3ForCausalLM", "AutoModelForCausalLM", None, "head size"),
    "gemma2": (lambda: tf.Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=16),
               "Gemma2ForCausalLM", "AutoModelForCausalLM", None, "sqrt(hidden_size)"),
}
CAUSAL = ("opt", "phi3", "gemma2", "llama")


def _save(name, folder):
    make_config, cls, *_ = MODELS[name]
    torch.manual_seed(0)
    getattr(tf, cls)(make_config()).eval().save_pretrained(folder)


def _inputs(name, seq=32):
    gen = torch.Generator().manual_seed(123)
    if name == "deit":
        return {"pixel_values": torch.randn(1, 3, 32, 32, generator=gen)}
    return {"input_ids": torch.randint(0, 100, (1, seq), generator=gen),
            "attention_mask": torch.ones(1, seq, dtype=torch.long)}


def _leaves(out):
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def _assert_hf_equals_pt2(name, auto, out_dir):
    model = getattr(tf, auto).from_pretrained(out_dir / "hf", local_files_only=True,
                                              trust_remote_code=False).eval()
    program = torch.export.load(out_dir / "model.pt2")
    inputs = _inputs(name)
    with torch.no_grad():
        got = _leaves(model(**inputs, use_cache=False) if name in CAUSAL else model(**inputs))
        want = _leaves(program.module()(*inputs.values()))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_uniform_writes_hf_where_the_config_fixes_head_sizes(name, tmp_path):
    """The issue's six architectures: --uniform with the default axis -1 (channels inside
    heads) keeps what the config cannot describe and writes a loadable hf/."""
    folder = tmp_path / name
    _save(name, folder)
    _, cls, auto, kept_group, why = MODELS[name]
    result = engine.prune(str(folder), ratio=0.5, uniform=True)
    engine.save(result, tmp_path / "out", onnx=False)
    report = result.report
    assert report["hf"]["written"], report["hf"].get("reason")
    model = _assert_hf_equals_pt2(name, auto, tmp_path / "out")
    assert type(model).__name__ == cls
    original = json.loads((folder / "config.json").read_text())
    saved = json.loads((tmp_path / "out" / "hf" / "config.json").read_text())
    shrunk = {k for k, v in saved.items() if isinstance(v, int) and original.get(k, v) > v}
    assert shrunk, "a smaller config describes the plan"
    assert report["after"]["params"] < report["before"]["params"]
    kept = {k["group"]: k["reason"] for k in report["uniform"]["kept_for_config"]}
    assert any(why in reason for reason in kept.values()), kept
    if kept_group is not None:
        assert kept_group in kept and any(g["name"] == kept_group and not g["pruned"]
                                          for g in report["groups"])


def test_probe_measures_which_field_sets_which_dimension():
    config = tf.LlamaConfig(**SMALL, num_key_value_heads=2)
    cmap = probe_config(tf.LlamaForCausalLM, config)
    dims = {name: set(f.dims) for name, f in cmap.fields.items()}
    assert ("model.embed_tokens.weight", 1) in dims["hidden_size"]
    assert ("model.layers.1.mlp.gate_proj.weight", 0) in dims["intermediate_size"]
    assert ("model.layers.0.mlp.down_proj.weight", 1) in dims["intermediate_size"]
    assert ("model.layers.0.self_attn.q_proj.weight", 0) in dims["num_attention_heads"]
    assert ("model.layers.0.self_attn.k_proj.weight", 0) in dims["num_key_value_heads"]
    assert ("model.layers.0.self_attn.q_proj.weight", 0) not in dims["hidden_size"]
    assert "num_hidden_layers" not in dims and "vocab_size" not in dims
    heads = {("model.layers.0.self_attn.q_proj.weight", 0): 16}
    roles = field_roles(cmap, heads)
    assert roles["head_dim"] and not roles["num_attention_heads"] and not roles["hidden_size"]
    # BERT derives the head size from hidden_size / heads: hidden_size cannot change
    bert = probe_config(tf.BertModel, tf.BertConfig(**SMALL))
    roles = field_roles(bert, {("encoder.layer.0.attention.self.query.weight", 0): 16})
    assert "head size" in roles["hidden_size"] and not roles["intermediate_size"]


def test_proportional_ties_keep_the_config_ratio():
    # ConvNeXt: the MLP is 4 x the stage width, so one stage channel goes with 4 MLP channels
    counts = proportional_counts({"stage": 1.0, "mlp": 0.25}, {"stage": 3, "mlp": 10},
                                 {"stage": 16, "mlp": 64}, step=2)
    assert counts == {"stage": 2, "mlp": 8}
    assert proportional_counts({"a": 1.0, "b": 0.25}, {"a": 0, "b": 1},
                               {"a": 16, "b": 64}, step=2) == {"a": 0, "b": 0}


def test_convnext_uniform_shrinks_stage_widths_with_their_mlps(tmp_path):
    folder = tmp_path / "convnext"
    torch.manual_seed(0)
    config = tf.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                               image_size=32)
    tf.ConvNextForImageClassification(config).eval().save_pretrained(folder)
    result = engine.prune(str(folder), ratio=0.5, uniform=True)
    engine.save(result, tmp_path / "out", onnx=False)
    assert result.report["hf"]["written"], result.report["hf"].get("reason")
    saved = json.loads((tmp_path / "out" / "hf" / "config.json").read_text())
    assert saved["hidden_sizes"] != [16, 32]
    assert all(a <= b for a, b in zip(saved["hidden_sizes"], [16, 32]))
    model = tf.AutoModelForImageClassification.from_pretrained(tmp_path / "out" / "hf").eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    program = torch.export.load(tmp_path / "out" / "model.pt2")
    with torch.no_grad():
        got, want = model(pixel_values=x).logits, program.module()(x)
    want = _leaves(want)[0]
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_bias_recovery_keeps_the_folder_loadable(tmp_path):
    """Bias compensation adds a bias only where the architecture has one or a config switch
    adds it (LlamaConfig's mlp_bias / attention_bias); lm_head is skipped with the reason."""
    folder = tmp_path / "llama"
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL, num_key_value_heads=2)).save_pretrained(folder)
    result = engine.prune(str(folder), ratio=0.5, uniform=True)
    calibration = np.random.default_rng(0).integers(0, 100, (40, 32))
    # nothing held back: random tokens on random weights say nothing about whether bias
    # helps, and this test is about where the biases go, not about the verdict
    recovered = engine.recover(result, calibration, "bias", eval_holdout=0)
    recovery = recovered.report["recovery"]
    assert "lm_head" in recovery["skipped_layers"]
    assert "no lm_head.bias" in recovery["skipped_layers"]["lm_head"]
    assert "model.layers.0.mlp.down_proj" in recovery["layers"]["bias"]
    engine.save(recovered, tmp_path / "out", onnx=False)
    hf = recovered.report["hf"]
    assert hf["written"], hf.get("reason")
    assert hf["config"]["mlp_bias"] is True
    model = _assert_hf_equals_pt2("llama", "AutoModelForCausalLM", tmp_path / "out")
    bias = model.model.layers[0].mlp.down_proj.bias
    assert bias is not None and float(bias.abs().max()) > 0
    # attention_bias came with the switch: a bias recovery did not set stays zero (the
    # rotary pairs and value heads shrink with head_dim, so o_proj's inputs are pruned too)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        bias = getattr(model.model.layers[0].self_attn, name).bias
        set_by_recovery = f"model.layers.0.self_attn.{name}" in recovery["layers"]["bias"]
        assert (float(bias.abs().max()) > 0) == set_by_recovery, name


def test_files_in_subfolders_are_carried(tmp_path):
    folder = tmp_path / "st"
    torch.manual_seed(0)
    tf.BertModel(tf.BertConfig(**SMALL)).save_pretrained(folder)
    (folder / "1_Pooling").mkdir()
    pooling = '{"word_embedding_dimension": 64, "pooling_mode_mean_tokens": true}'
    (folder / "1_Pooling" / "config.json").write_text(pooling)
    (folder / "modules.json").write_text('[{"idx": 0, "path": "", "type": "x"}]')
    result = engine.prune(str(folder), ratio=0.3, uniform=True)
    engine.save(result, tmp_path / "out", onnx=False)
    assert result.report["hf"]["written"], result.report["hf"].get("reason")
    assert (tmp_path / "out" / "hf" / "1_Pooling" / "config.json").read_text() == pooling
    assert "1_Pooling/config.json" in result.report["hf"]["carried"]
