"""What a transformers config can describe of a pruned model (reading side, no writing).

`groups_config_keeps` and `count_adjuster` steer planning (--uniform) so that the pruned
shapes stay expressible by the model's config; `NotDescribable` is the one-line reason
when they are not (engine/io/hf_export.py and engine/io/hf_depth.py raise it).
"""

from __future__ import annotations

import math
import re

from engine.errors import PruneScopeError
from engine.io.hf import HFSource


class NotDescribable(PruneScopeError):
    """The config cannot describe the pruned shapes (the message is the one-line reason)."""


def model_class(hf: HFSource):
    """The transformers class the model was built with."""
    import transformers

    return getattr(transformers, hf.model_class)


# What each config cannot describe whatever the counts: "head_channels" (channels inside a
# head: one head size, and the attention scale follows it), "heads" (the number of heads:
# BertConfig and GPT2Config derive the head size from hidden_size / heads), "hidden" (the
# hidden size, for the same reason). --uniform keeps such groups whole on these models.
_LLAMA_FIXED = ("head_channels",)
_TIED_FIXED = ("head_channels", "heads", "hidden")
FIXED: dict[str, tuple[str, ...]] = {
    **{t: _LLAMA_FIXED for t in ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2")},
    **{t: _TIED_FIXED for t in ("bert", "roberta", "xlm-roberta", "camembert")},
    "vit": _LLAMA_FIXED,
    "gpt2": _TIED_FIXED,
}
_EMBEDDING = re.compile(r"(word_embeddings|embed_tokens|wte|wpe|patch_embeddings\.projection)$")
_POOLER = re.compile(r"pooler\.dense$")  # BertConfig: the pooler is hidden_size wide
_WHY = {
    "head_channels": "has one head size (channels inside heads cannot shrink)",
    "heads": "derives the head size from hidden_size / heads (heads cannot go)",
    "hidden": "derives the head size from hidden_size / heads (the hidden size cannot shrink)",
}


def _is_embedding(hf: HFSource, layer: str) -> bool:
    """An embedding layer, or the output layer tied to one (a tied pair may be captured under
    the output layer's name only)."""
    if _EMBEDDING.search(layer):
        return True
    tied = getattr(model_class(hf), "_tied_weights_keys", None)
    return (isinstance(tied, dict) and getattr(hf.config, "tie_word_embeddings", False)
            and f"{layer}.weight" in tied and _EMBEDDING.search(tied[f"{layer}.weight"]
                                                                .removesuffix(".weight")))


def groups_config_keeps(analysis, whole_blocks: bool) -> dict[str, str]:
    """Group name -> why the model's config cannot describe pruning it (for --uniform)."""
    hf = analysis.captured.hf
    fixed = FIXED.get(getattr(hf.config, "model_type", None), ())
    name = type(hf.config).__name__
    keep = {}
    for g in analysis.prunable_groups(whole_blocks):
        if g.whole_blocks and "heads" in fixed:
            keep[g.name] = f"{name} {_WHY['heads']}"
        elif g.blocks and "head_channels" in fixed and not g.whole_blocks:
            keep[g.name] = f"{name} {_WHY['head_channels']}"
        elif "hidden" in fixed and any(_is_embedding(hf, x) or _POOLER.search(x)
                                       for x in g.layers):
            keep[g.name] = f"{name} {_WHY['hidden']}"
    return keep


def count_adjuster(analysis, options):
    """For --uniform on Llama-like models: LlamaConfig requires hidden_size to be a multiple
    of num_attention_heads, so the hidden stream keeps such a multiple (the heads left after
    pruning whole heads; the step size too when the step rule is on)."""
    hf = analysis.captured.hf
    if FIXED.get(getattr(hf.config, "model_type", None)) is not _LLAMA_FIXED or \
            hf.config.model_type == "vit":
        return None
    groups = analysis.prunable_groups(options.prunes_whole_blocks)
    hidden = next((g.name for g in groups if any(_is_embedding(hf, x) for x in g.layers)), None)
    heads = [g.name for g in groups
             if g.whole_blocks and any(x.endswith("q_proj") for x in g.layers)]
    if hidden is None:
        return None
    n_heads = hf.config.num_attention_heads
    n_kv = getattr(hf.config, "num_key_value_heads", None) or n_heads
    step = options.step_size if options.step_op != "none" else 1

    def adjust(counts: dict[str, int], sizes: dict[str, int]) -> dict[str, int]:
        left = n_heads
        if heads:  # one channel of a heads group: a key/value head with its query heads
            left = (sizes[heads[0]] - counts[heads[0]]) * (n_heads // n_kv)
        multiple = math.lcm(left, step)
        size = sizes[hidden]
        kept = max((size - counts[hidden]) // multiple * multiple, min(multiple, size))
        return {**counts, hidden: size - kept}

    return adjust
