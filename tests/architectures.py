"""Real architectures as a new user would try them: transformers models built from tiny
configs (random weights, nothing downloaded), wrapped to return one tensor.

Shared by the coverage tests (a fast subset) and ``python -m bench coverage_v2`` (all).
Each entry: name -> (family, factory); a factory returns ``(model, example_inputs)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class OneTensor(nn.Module):
    """Returns the model's first meaningful tensor (logits, last hidden state, ...)."""

    def __init__(self, model: nn.Module, key: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, *args):
        out = self.model(*args)
        if isinstance(out, torch.Tensor):
            return out
        if self.key is not None:
            return getattr(out, self.key)
        for key in ("logits", "last_hidden_state", "pooler_output"):
            value = getattr(out, key, None)
            if isinstance(value, torch.Tensor):
                return value
        return out[0]


def _tf():
    import transformers

    return transformers


def _image(size: int = 32, channels: int = 3) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, channels, size, size, generator=g),)


def _tokens(vocab: int = 128, length: int = 12) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return (torch.randint(0, vocab, (1, length), generator=g),)


def _audio(samples: int = 1600) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(1, samples, generator=g),)


TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "vocab_size": 128}
DECODER = {**TEXT, "use_cache": False}


def _wrap(model: nn.Module, inputs: tuple, key: str | None = None):
    return OneTensor(model.eval(), key).eval(), inputs


def _vision(cls: str, config: str, size: int = 32, key: str | None = None, **kw):
    tf = _tf()
    model = getattr(tf, cls)(getattr(tf, config)(**kw))
    return _wrap(model, _image(size), key)


def _text(cls: str, config: str, length: int = 12, key: str | None = None, **kw):
    tf = _tf()
    cfg = getattr(tf, config)(**kw)
    return _wrap(getattr(tf, cls)(cfg), _tokens(min(cfg.vocab_size, 128), length), key)


# ------------------------------------------------------------------------------- vision
def resnet():
    return _vision("ResNetForImageClassification", "ResNetConfig", embedding_size=16,
                   hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)


def resnet_basic():
    return _vision("ResNetForImageClassification", "ResNetConfig", embedding_size=16,
                   hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic",
                   num_labels=10)


def convnext():
    return _vision("ConvNextForImageClassification", "ConvNextConfig",
                   hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)


def convnextv2():
    return _vision("ConvNextV2ForImageClassification", "ConvNextV2Config",
                   hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)


def bit():
    return _vision("BitForImageClassification", "BitConfig", embedding_size=32,
                   hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], num_groups=8,
                   num_labels=10)


def regnet():
    return _vision("RegNetForImageClassification", "RegNetConfig", embedding_size=16,
                   hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], groups_width=8,
                   num_labels=10)


def mobilenet_v1():
    return _vision("MobileNetV1ForImageClassification", "MobileNetV1Config",
                   depth_multiplier=0.25, num_labels=10)


def mobilenet_v2():
    return _vision("MobileNetV2ForImageClassification", "MobileNetV2Config",
                   depth_multiplier=0.35, num_labels=10)


def efficientnet():
    return _vision("EfficientNetForImageClassification", "EfficientNetConfig",
                   width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320,
                   image_size=32, num_labels=10)


def mobilevit():
    return _vision("MobileViTForImageClassification", "MobileViTConfig", image_size=64,
                   size=64, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 8, 16, 16, 24, 32,
                                                                          64], num_labels=10)


def mobilevitv2():
    return _vision("MobileViTV2ForImageClassification", "MobileViTV2Config", image_size=64,
                   size=64, width_multiplier=0.25, num_labels=10)


def swin():
    return _vision("SwinForImageClassification", "SwinConfig", size=56, image_size=56,
                   embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=7, num_labels=10)


def swinv2():
    return _vision("Swinv2ForImageClassification", "Swinv2Config", size=56, image_size=56,
                   embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=7, num_labels=10)


VIT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
       "intermediate_size": 128, "image_size": 32, "patch_size": 8, "num_labels": 10}


def vit():
    return _vision("ViTForImageClassification", "ViTConfig", **VIT)


def deit():
    return _vision("DeiTForImageClassification", "DeiTConfig", **VIT)


def beit():
    return _vision("BeitForImageClassification", "BeitConfig", **VIT,
                   use_relative_position_bias=True)


def dinov2():
    return _vision("Dinov2Model", "Dinov2Config", **{k: v for k, v in VIT.items()
                                                      if k != "num_labels"})


def data2vec_vision():
    return _vision("Data2VecVisionForImageClassification", "Data2VecVisionConfig", **VIT,
                   use_relative_position_bias=True)


def yolos():
    return _vision("YolosForObjectDetection", "YolosConfig", image_size=[32, 32],
                   **{k: v for k, v in VIT.items() if k not in ("image_size", "num_labels")},
                   num_detection_tokens=4)


def cvt():
    return _vision("CvtForImageClassification", "CvtConfig", embed_dim=[16, 32, 64],
                   num_heads=[1, 2, 4], depth=[1, 2, 3], num_labels=10)


def pvt():
    return _vision("PvtForImageClassification", "PvtConfig", image_size=64, size=64,
                   hidden_sizes=[16, 32, 64, 128], num_encoder_blocks=4, depths=[1, 1, 1, 1],
                   num_attention_heads=[1, 2, 4, 8],
                   num_labels=10)


def segformer():
    return _vision("SegformerForImageClassification", "SegformerConfig",
                   hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], decoder_hidden_size=64,
                   num_labels=10)


def focalnet():
    return _vision("FocalNetForImageClassification", "FocalNetConfig", embed_dim=16,
                   depths=[1, 1], image_size=32, num_labels=10)


def levit():
    return _vision("LevitForImageClassification", "LevitConfig", image_size=64, size=64,
                   hidden_sizes=[32, 64, 96], num_attention_heads=[2, 4, 6], depths=[1, 1, 1],
                   key_dim=[8, 8, 8], num_labels=10)


def poolformer():
    return _vision("PoolFormerForImageClassification", "PoolFormerConfig",
                   hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)


# -------------------------------------------------------------------------------- audio
AUDIO = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 128, "conv_dim": (32, 32, 32), "conv_stride": (5, 4, 4),
         "conv_kernel": (10, 4, 4), "num_conv_pos_embeddings": 16,
         "num_conv_pos_embedding_groups": 4}


def _audio_model(cls: str, config: str, **kw):
    tf = _tf()
    model = getattr(tf, cls)(getattr(tf, config)(**{**AUDIO, **kw}))
    return _wrap(model, _audio(), "last_hidden_state")


def wav2vec2():
    return _audio_model("Wav2Vec2Model", "Wav2Vec2Config")


def hubert():
    return _audio_model("HubertModel", "HubertConfig")


def wavlm():
    return _audio_model("WavLMModel", "WavLMConfig", num_buckets=32, max_bucket_distance=64)


def data2vec_audio():
    return _audio_model("Data2VecAudioModel", "Data2VecAudioConfig")


def sew():
    return _audio_model("SEWModel", "SEWConfig", squeeze_factor=2)


def whisper_encoder():
    tf = _tf()
    config = tf.WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4,
                              encoder_ffn_dim=128, decoder_layers=1, decoder_attention_heads=4,
                              decoder_ffn_dim=128, num_mel_bins=16,
                              max_source_positions=20, vocab_size=128, pad_token_id=0,
                              bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)
    g = torch.Generator().manual_seed(3)
    return _wrap(tf.WhisperModel(config).get_encoder(),
                 (torch.randn(1, 16, 40, generator=g),), "last_hidden_state")


def ast():
    tf = _tf()
    config = tf.ASTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, num_mel_bins=32, max_length=32, num_labels=10)
    g = torch.Generator().manual_seed(3)
    return _wrap(tf.ASTForAudioClassification(config), (torch.randn(1, 32, 32, generator=g),))


# ------------------------------------------------------------------------ text encoders
def bert():
    return _text("BertForSequenceClassification", "BertConfig", **TEXT)


def roberta():
    return _text("RobertaForSequenceClassification", "RobertaConfig", **TEXT,
                 max_position_embeddings=40)


def distilbert():
    return _text("DistilBertForSequenceClassification", "DistilBertConfig", dim=64, n_layers=2,
                 n_heads=4, hidden_dim=128, vocab_size=128)


def albert():
    return _text("AlbertForSequenceClassification", "AlbertConfig", embedding_size=32, **TEXT)


def deberta():
    return _text("DebertaForSequenceClassification", "DebertaConfig", **TEXT,
                 relative_attention=True, max_relative_positions=16,
                 pos_att_type=["c2p", "p2c"])


def deberta_v2():
    return _text("DebertaV2ForSequenceClassification", "DebertaV2Config", **TEXT,
                 relative_attention=True, position_buckets=8, pos_att_type=["c2p", "p2c"])


def electra():
    return _text("ElectraForSequenceClassification", "ElectraConfig", embedding_size=32, **TEXT)


def mpnet():
    return _text("MPNetForSequenceClassification", "MPNetConfig", **TEXT)


def xlm_roberta():
    return _text("XLMRobertaForSequenceClassification", "XLMRobertaConfig", **TEXT)


def modernbert():
    return _text("ModernBertForSequenceClassification", "ModernBertConfig", **TEXT,
                 global_attn_every_n_layers=2, local_attention=8, pad_token_id=0,
                 bos_token_id=0, eos_token_id=0, cls_token_id=0, sep_token_id=0)


def convbert():
    return _text("ConvBertForSequenceClassification", "ConvBertConfig", embedding_size=32,
                 **TEXT)


def t5_encoder():
    return _text("T5EncoderModel", "T5Config", d_model=64, d_kv=16, d_ff=128, num_layers=2,
                 num_heads=4, vocab_size=128, relative_attention_num_buckets=8)


# ------------------------------------------------------------------------ decoder LLMs
def gpt2():
    return _text("GPT2LMHeadModel", "GPT2Config", n_embd=64, n_layer=2, n_head=4,
                 vocab_size=128, use_cache=False)


def llama():
    return _text("LlamaForCausalLM", "LlamaConfig", **DECODER, num_key_value_heads=2)


def qwen2():
    return _text("Qwen2ForCausalLM", "Qwen2Config", **DECODER, num_key_value_heads=2)


def qwen3():
    return _text("Qwen3ForCausalLM", "Qwen3Config", **DECODER, num_key_value_heads=2,
                 head_dim=16)


def mistral():
    return _text("MistralForCausalLM", "MistralConfig", **DECODER, num_key_value_heads=2)


def phi():
    return _text("PhiForCausalLM", "PhiConfig", **DECODER)


def phi3():
    return _text("Phi3ForCausalLM", "Phi3Config", **DECODER, pad_token_id=0)


def gemma():
    return _text("GemmaForCausalLM", "GemmaConfig", **DECODER, num_key_value_heads=1,
                 head_dim=16)


def gemma2():
    return _text("Gemma2ForCausalLM", "Gemma2Config", **DECODER, num_key_value_heads=2,
                 head_dim=16)


def opt():
    return _text("OPTForCausalLM", "OPTConfig", hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=4, ffn_dim=128, vocab_size=128, word_embed_proj_dim=64,
                 use_cache=False)


def gpt_neox():
    return _text("GPTNeoXForCausalLM", "GPTNeoXConfig", **DECODER)


def falcon():
    return _text("FalconForCausalLM", "FalconConfig", hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=4, vocab_size=128, use_cache=False)


def gptj():
    return _text("GPTJForCausalLM", "GPTJConfig", n_embd=64, n_layer=2, n_head=4,
                 rotary_dim=8, vocab_size=128, use_cache=False)


def bloom():
    return _text("BloomForCausalLM", "BloomConfig", hidden_size=64, n_layer=2, n_head=4,
                 vocab_size=128, use_cache=False)


def mpt():
    return _text("MptForCausalLM", "MptConfig", d_model=64, n_layers=2, n_heads=4,
                 expansion_ratio=2, vocab_size=128, use_cache=False)


def stablelm():
    return _text("StableLmForCausalLM", "StableLmConfig", **DECODER, num_key_value_heads=4)


def olmo():
    return _text("OlmoForCausalLM", "OlmoConfig", **DECODER)


def codegen():
    return _text("CodeGenForCausalLM", "CodeGenConfig", n_embd=64, n_layer=2, n_head=4,
                 rotary_dim=8, vocab_size=128, n_ctx=64, n_positions=64, use_cache=False)


def starcoder2():
    return _text("Starcoder2ForCausalLM", "Starcoder2Config", **DECODER, num_key_value_heads=2)


def gpt_neo():
    return _text("GPTNeoForCausalLM", "GPTNeoConfig", hidden_size=64, num_layers=2,
                 num_heads=4, attention_types=[[["global", "local"], 1]], window_size=8,
                 vocab_size=128, use_cache=False)


# ------------------------------------------------------------------ mixtures of experts
def mixtral():
    return _text("MixtralForCausalLM", "MixtralConfig", **DECODER, num_key_value_heads=2,
                 num_local_experts=4, num_experts_per_tok=2)


def qwen2_moe():
    return _text("Qwen2MoeForCausalLM", "Qwen2MoeConfig", **DECODER, num_key_value_heads=2,
                 num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                 shared_expert_intermediate_size=64)


# ------------------------------------------------------------- state-space / recurrent
def mamba():
    return _text("MambaForCausalLM", "MambaConfig", hidden_size=32, state_size=8,
                 num_hidden_layers=2, vocab_size=128, expand=2, use_cache=False)


class LSTMTagger(nn.Module):
    """Embedding, a two-layer LSTM, a linear head: recurrent weights cannot be sliced."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, 32, num_layers=2, batch_first=True)
        self.mlp = nn.Linear(32, 64)
        self.head = nn.Linear(64, 5)

    def forward(self, ids):
        x, _ = self.lstm(self.embed(ids))
        return self.head(torch.relu(self.mlp(x)))


def lstm():
    return LSTMTagger().eval(), (torch.randint(0, 50, (1, 7)),)


class GRUEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 24)
        self.gru = nn.GRU(24, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        out, _ = self.gru(torch.relu(self.proj(x)))
        return self.head(out)


def gru():
    return GRUEncoder().eval(), (torch.randn(1, 6, 8),)


Factory = Callable[[], tuple[nn.Module, tuple[Any, ...]]]
ARCHITECTURES: dict[str, tuple[str, Factory]] = {
    "ResNet-50 style": ("vision CNN", resnet),
    "ResNet-18 style": ("vision CNN", resnet_basic),
    "ConvNeXt": ("vision CNN", convnext),
    "ConvNeXt V2": ("vision CNN", convnextv2),
    "BiT (weight standardisation)": ("vision CNN", bit),
    "RegNet": ("vision CNN", regnet),
    "MobileNetV1": ("vision CNN", mobilenet_v1),
    "MobileNetV2": ("vision CNN", mobilenet_v2),
    "EfficientNet": ("vision CNN", efficientnet),
    "PoolFormer": ("vision CNN", poolformer),
    "MobileViT": ("vision hybrid", mobilevit),
    "MobileViT V2": ("vision hybrid", mobilevitv2),
    "CvT": ("vision hybrid", cvt),
    "LeViT": ("vision hybrid", levit),
    "FocalNet": ("vision hybrid", focalnet),
    "Swin": ("vision transformer", swin),
    "Swin V2": ("vision transformer", swinv2),
    "ViT": ("vision transformer", vit),
    "DeiT": ("vision transformer", deit),
    "BEiT (relative position bias)": ("vision transformer", beit),
    "DINOv2": ("vision transformer", dinov2),
    "Data2Vec vision": ("vision transformer", data2vec_vision),
    "YOLOS": ("vision transformer", yolos),
    "PVT": ("vision transformer", pvt),
    "SegFormer": ("vision transformer", segformer),
    "Wav2Vec2": ("audio", wav2vec2),
    "HuBERT": ("audio", hubert),
    "WavLM": ("audio", wavlm),
    "Data2Vec audio": ("audio", data2vec_audio),
    "SEW": ("audio", sew),
    "Whisper encoder": ("audio", whisper_encoder),
    "AST": ("audio", ast),
    "BERT": ("text encoder", bert),
    "RoBERTa": ("text encoder", roberta),
    "DistilBERT": ("text encoder", distilbert),
    "ALBERT": ("text encoder", albert),
    "DeBERTa": ("text encoder", deberta),
    "DeBERTa-v2": ("text encoder", deberta_v2),
    "ELECTRA": ("text encoder", electra),
    "MPNet": ("text encoder", mpnet),
    "XLM-RoBERTa": ("text encoder", xlm_roberta),
    "ModernBERT": ("text encoder", modernbert),
    "ConvBERT": ("text encoder", convbert),
    "T5 encoder": ("text encoder", t5_encoder),
    "GPT-2": ("decoder LLM", gpt2),
    "Llama (GQA)": ("decoder LLM", llama),
    "Qwen2": ("decoder LLM", qwen2),
    "Qwen3": ("decoder LLM", qwen3),
    "Mistral": ("decoder LLM", mistral),
    "Phi": ("decoder LLM", phi),
    "Phi-3": ("decoder LLM", phi3),
    "Gemma": ("decoder LLM", gemma),
    "Gemma 2": ("decoder LLM", gemma2),
    "OPT": ("decoder LLM", opt),
    "GPT-NeoX": ("decoder LLM", gpt_neox),
    "Falcon": ("decoder LLM", falcon),
    "GPT-J": ("decoder LLM", gptj),
    "BLOOM (ALiBi)": ("decoder LLM", bloom),
    "MPT (ALiBi)": ("decoder LLM", mpt),
    "StableLM": ("decoder LLM", stablelm),
    "OLMo": ("decoder LLM", olmo),
    "CodeGen": ("decoder LLM", codegen),
    "StarCoder2": ("decoder LLM", starcoder2),
    "GPT-Neo": ("decoder LLM", gpt_neo),
    "Mixtral": ("mixture of experts", mixtral),
    "Qwen2-MoE": ("mixture of experts", qwen2_moe),
    "Mamba": ("state-space", mamba),
    "LSTM tagger": ("recurrent", lstm),
    "GRU encoder": ("recurrent", gru),
}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return ARCHITECTURES[name][1]()


def unexplained_layers(result) -> list[str]:
    """Layers with parameters that the run neither changed nor accounted for.

    A layer is accounted for when one of its parameters changed shape (pruned), when it is
    listed in the report's ``frozen`` entries (with a reason), or when it belongs to a group
    the plan scored (a member or a reader of a group's channels: the global ranking may keep
    all of its channels). Parameters without channels (scalars) are not layers.
    """
    from engine.graph.tracer import layer_name

    before = {k: tuple(v.shape) for k, v in result.analysis.gm.named_parameters()}
    after = {k: tuple(v.shape) for k, v in result.module.named_parameters()}
    accounted: set[str] = set()
    for entry in result.report["frozen"]:
        accounted.update(entry["layers"])
        accounted.update(entry.get("readers", []))
    structure = result.analysis.structure(result.plan.options.prunes_whole_blocks)
    for group in structure.groups:
        if group.prunable.any():
            accounted.update(group.layers)
            accounted.update(group.consumers)
    aliases: dict[int, set[str]] = {}  # tied weights: any of their layers accounts for all
    for name, value in result.analysis.gm.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(value), set()).add(layer_name(name))
    tensors = dict(result.analysis.gm.named_parameters())
    missing = []
    for name, shape in before.items():
        layer = layer_name(name)
        if sum(s > 1 for s in shape) == 0 or aliases[id(tensors[name])] & accounted:
            continue
        if after.get(name, shape) != shape:
            continue
        if layer not in missing:
            missing.append(layer)
    return missing
