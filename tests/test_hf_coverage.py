"""Folders of the coverage set that --uniform could not write as hf/ before: a Whisper
encoder saved on its own (its class is not exported at transformers' top level), AST (its
example input is a spectrogram, not a waveform) and RegNet (a grouped convolution's
per-group width is a config field, ``groups_width``, shared by every stage)."""

from __future__ import annotations

import json

import pytest
import torch

import engine
from engine.io.hf import example_inputs_for, transformers_class

tf = pytest.importorskip("transformers")


def test_transformers_class_looks_in_the_model_types_own_module():
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    assert transformers_class("WhisperEncoder", "whisper") is WhisperEncoder
    assert transformers_class("BertModel") is tf.BertModel
    assert transformers_class("WhisperEncoder") is None  # no model type: top level only
    assert transformers_class("WhisperConfig", "whisper") is None  # not a model class
    assert transformers_class("torch", "whisper") is None
    assert transformers_class("WhisperEncoder", "../whisper") is None


def test_ast_example_input_is_a_spectrogram():
    config = tf.ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=64, num_mel_bins=16, max_length=24)
    inputs, names = example_inputs_for(tf.ASTForAudioClassification(config).eval())
    assert names == ("input_values",)
    assert tuple(inputs[0].shape) == (1, 24, 16)
    wav2vec = tf.Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, conv_dim=(8,), conv_stride=(5,),
                                conv_kernel=(10,), num_conv_pos_embeddings=4,
                                num_conv_pos_embedding_groups=2)
    inputs, _ = example_inputs_for(tf.Wav2Vec2Model(wav2vec).eval())
    assert tuple(inputs[0].shape) == (1, 16000)  # a waveform stays a waveform


def _prune_folder(model, tmp_path):
    model.eval().save_pretrained(tmp_path / "in")
    result = engine.prune(str(tmp_path / "in"), ratio=0.5, uniform=True)
    engine.save(result, tmp_path / "out", onnx=False)
    return result


def test_whisper_encoder_folder_writes_hf(tmp_path):
    config = tf.WhisperConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2,
                              encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=2,
                              decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=10,
                              vocab_size=50, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                              decoder_start_token_id=0)
    torch.manual_seed(0)
    result = _prune_folder(tf.WhisperModel(config).get_encoder(), tmp_path)
    hf = result.report["hf"]
    assert hf["written"], hf
    assert hf["config"] == {"encoder_ffn_dim": 32}
    saved = json.loads((tmp_path / "out" / "hf" / "config.json").read_text())
    assert saved["architectures"] == ["WhisperEncoder"]


def test_regnet_grouped_width_keeps_hf_describable(tmp_path):
    config = tf.RegNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1],
                             groups_width=8, num_labels=4, image_size=32)
    torch.manual_seed(0)
    result = _prune_folder(tf.RegNetForImageClassification(config), tmp_path)
    hf = result.report["hf"]
    assert hf["written"], hf
    # every stage halves, and so does the per-group width the stages share
    assert hf["config"] == {"hidden_sizes": [8, 16], "groups_width": 4}
    assert result.report["after"]["params"] < 0.5 * result.report["before"]["params"]


def test_regnet_of_the_coverage_set_writes_hf(tmp_path):
    # four stages: the planned per-group widths differ between stages, so the plan keeps
    # the grouped convolutions whole rather than write no hf/
    from tests.architectures import build

    wrapped, _ = build("RegNet")
    result = _prune_folder(wrapped.model, tmp_path)
    assert result.report["hf"]["written"], result.report["hf"]


def test_deberta_folder_writes_hf_though_its_span_is_data_dependent(tmp_path):
    # DeBERTa's relative-position span is computed with .item(): an unbacked size that the
    # FLOPs count cannot read; the prune must still reach hf/ and say what was not counted
    config = tf.DebertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=64, vocab_size=64, relative_attention=True,
                              max_relative_positions=8, pos_att_type=["c2p", "p2c"])
    torch.manual_seed(0)
    result = _prune_folder(tf.DebertaForSequenceClassification(config), tmp_path)
    assert result.report["hf"]["written"], result.report["hf"]
    before, after = result.report["before"], result.report["after"]
    assert before["flops_uncounted"] and after["flops_uncounted"] == before["flops_uncounted"]
    assert after["flops"] < before["flops"]
