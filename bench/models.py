"""Benchmark models: transformers models from configs (random weights, nothing downloaded)
and the coupling zoo of tests/zoo.py, each with example inputs and what Torch-Pruning needs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bench.common import REPO


@dataclass
class BenchModel:
    name: str
    model: nn.Module
    inputs: tuple
    # Torch-Pruning's configuration, as its documentation and examples set it up.
    tp_ignored: Callable[[nn.Module], list[nn.Module]] = lambda m: []
    tp_heads: Callable[[nn.Module], dict[nn.Module, int]] = lambda m: {}
    tp_kwargs: dict[str, Any] = field(default_factory=dict)
    tp_output: Callable[[Any], Any] | None = None


def _seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


def _logits(out: Any) -> Any:
    return out.logits


def image(batch: int = 1, size: int = 224) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 3, size, size, generator=g),)


def tokens(vocab: int, length: int = 128, batch: int = 1) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return (torch.randint(0, vocab, (batch, length), generator=g),)


def _heads_qkv(model: nn.Module) -> dict[nn.Module, int]:
    """Attention projections -> head count (Torch-Pruning's ``num_heads``)."""
    heads: dict[nn.Module, int] = {}
    for m in model.modules():
        if hasattr(m, "q_proj") and hasattr(m, "k_proj") and hasattr(m, "v_proj"):
            cfg = getattr(m, "config", None)
            q = getattr(m, "num_attention_heads", None) or cfg.num_attention_heads
            kv = getattr(cfg, "num_key_value_heads", None) or q
            heads[m.q_proj], heads[m.k_proj], heads[m.v_proj] = q, kv, kv
        elif hasattr(m, "query") and hasattr(m, "key") and hasattr(m, "num_attention_heads"):
            for proj in (m.query, m.key, m.value):
                heads[proj] = m.num_attention_heads
        elif hasattr(m, "c_attn") and hasattr(m, "num_heads"):
            heads[m.c_attn] = m.num_heads
        elif hasattr(m, "q") and hasattr(m, "k") and hasattr(m, "v") and hasattr(m, "heads"):
            heads[m.q] = m.heads
            heads[m.k] = heads[m.v] = getattr(m, "kv_heads", m.heads)
        elif isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "heads"):
            heads[m.qkv] = m.heads  # fused q/k/v, as for timm's ViT in its examples
    return heads


def tp_fix_attributes(model: nn.Module) -> None:
    """After Torch-Pruning: update the attention modules' size attributes from the pruned
    projections, as Torch-Pruning's transformers examples do (it prunes weights, not these)."""
    for m in model.modules():
        if hasattr(m, "q_proj") and hasattr(m, "head_dim") and hasattr(m, "k_proj"):
            heads = getattr(m, "num_attention_heads", None)
            if heads is not None and not hasattr(m, "num_key_value_groups"):
                m.head_dim = m.q_proj.out_features // heads  # ViT: head dims were pruned
            if hasattr(m, "num_key_value_groups"):  # Llama: whole heads were pruned
                q_heads = m.q_proj.out_features // m.head_dim
                kv_heads = max(1, m.k_proj.out_features // m.head_dim)
                m.num_key_value_groups = max(1, q_heads // kv_heads)
        elif hasattr(m, "query") and hasattr(m, "attention_head_size"):
            m.attention_head_size = m.query.out_features // m.num_attention_heads
            m.all_head_size = m.query.out_features
        elif hasattr(m, "c_attn") and hasattr(m, "split_size"):
            m.split_size = m.c_attn.weight.shape[1] // 3
            m.head_dim = m.split_size // m.num_heads
            m.embed_dim = m.c_proj.weight.shape[1]
        elif hasattr(m, "q") and hasattr(m, "head_dim") and hasattr(m, "heads"):
            m.head_dim = m.q.out_features // m.heads
        elif isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "head_dim"):
            m.head_dim = m.qkv.out_features // 3 // m.heads


# --------------------------------------------------------------------- transformers
def resnet50() -> BenchModel:
    from transformers import ResNetConfig, ResNetForImageClassification

    _seeded()
    model = ResNetForImageClassification(ResNetConfig(num_labels=1000)).eval()
    return BenchModel("ResNet-50", model, image(), tp_ignored=lambda m: [m.classifier],
                      tp_output=_logits)


def mobilenet_v2() -> BenchModel:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    _seeded()
    model = MobileNetV2ForImageClassification(MobileNetV2Config(num_labels=1000)).eval()
    return BenchModel("MobileNetV2", model, image(), tp_ignored=lambda m: [m.classifier],
                      tp_output=_logits)


def vit_base() -> BenchModel:
    from transformers import ViTConfig, ViTForImageClassification

    _seeded()
    model = ViTForImageClassification(ViTConfig(num_labels=1000)).eval()
    return BenchModel("ViT-B/16", model, image(), tp_ignored=lambda m: [m.classifier],
                      tp_heads=_heads_qkv, tp_output=_logits)


def bert_base(length: int = 128) -> BenchModel:
    from transformers import BertConfig, BertForSequenceClassification

    _seeded()
    cfg = BertConfig(num_labels=2)
    model = BertForSequenceClassification(cfg).eval()
    return BenchModel("BERT-base", model, tokens(cfg.vocab_size, length),
                      tp_ignored=lambda m: [m.classifier], tp_heads=_heads_qkv,
                      tp_output=_logits)


def gpt2(length: int = 64) -> BenchModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    _seeded()
    cfg = GPT2Config(use_cache=False)
    model = GPT2LMHeadModel(cfg).eval()
    return BenchModel("GPT-2", model, tokens(cfg.vocab_size, length),
                      tp_ignored=lambda m: [m.lm_head], tp_heads=_heads_qkv, tp_output=_logits)


def llama(layers: int = 2, hidden: int = 256, heads: int = 8, kv_heads: int = 2,
          intermediate: int = 688, vocab: int = 1024, length: int = 32,
          dtype: torch.dtype = torch.float32, attn: str = "sdpa",
          name: str | None = None) -> BenchModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    _seeded()
    cfg = LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      intermediate_size=intermediate, num_hidden_layers=layers, vocab_size=vocab,
                      use_cache=False, attn_implementation=attn)
    with _default_dtype(dtype):
        model = LlamaForCausalLM(cfg).eval()
    # Torch-Pruning's LLM example: whole heads, never head dims (RoPE must stay intact).
    tp_kwargs = {"prune_num_heads": True, "prune_head_dims": False, "head_pruning_ratio": 0.5}
    return BenchModel(name or f"Llama GQA {heads}/{kv_heads}, {layers} layers", model,
                      tokens(vocab, length), tp_ignored=lambda m: [m.lm_head],
                      tp_heads=_heads_qkv, tp_kwargs=tp_kwargs, tp_output=_logits)


class _default_dtype:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __enter__(self) -> None:
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc: object) -> None:
        torch.set_default_dtype(self.old)


TRANSFORMERS: dict[str, Callable[[], BenchModel]] = {
    "ResNet-50": resnet50,
    "MobileNetV2": mobilenet_v2,
    "ViT-B/16": vit_base,
    "BERT-base": bert_base,
    "GPT-2": gpt2,
    "Llama GQA (small)": lambda: llama(name="Llama GQA (small)"),
}


# ----------------------------------------------------------------------------- zoo
# The layer(s) whose outputs are the model's outputs: Torch-Pruning must ignore them.
ZOO_OUTPUT_LAYERS = {
    "conv_bn_residual": ["head"],
    "grouped_depthwise": ["pointwise"],
    "cat_split_flatten": ["fc", "fc2"],
    "se_gate": ["out"],
    "swiglu": ["down", "down2"],
    "attention_sdpa": ["head"],
    "attention_matmul": ["head"],
    "attention_gqa": ["head"],
    "channel_shuffle": ["conv3"],
    "pixel_shuffle": ["conv2"],
    "tied_embedding": ["lm_head"],
    "unsupported_op": ["c"],
    "unsupported": ["c"],
    "conv_transpose": ["out"],
    "einsum_attention": ["head"],
    "conv1d_conv3d": ["c2", "c4"],
}


def _last_weight_layer(model: nn.Module) -> list[nn.Module]:
    """For a zoo model not listed above: the last registered layer with weights."""
    layers = [m for m in model.modules()
              if not list(m.children()) and any(True for _ in m.parameters(recurse=False))]
    return layers[-1:]


def zoo() -> dict[str, Callable[[], BenchModel]]:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.zoo import ZOO, build

    def factory(name: str) -> Callable[[], BenchModel]:
        def make() -> BenchModel:
            model, inputs = build(name)
            layers = ZOO_OUTPUT_LAYERS.get(name)

            def ignored(m: nn.Module) -> list[nn.Module]:
                if layers is None:
                    return _last_weight_layer(m)
                return [m.get_submodule(n) for n in layers if hasattr(m, n)]

            return BenchModel(name, model, tuple(inputs), tp_ignored=ignored,
                              tp_heads=_heads_qkv)

        return make

    return {name: factory(name) for name in ZOO}
