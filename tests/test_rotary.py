"""Rotary attention pruned inside heads: channel i goes with channel i + d/2 (rotate_half),
every query head and the key head it reads keep the same pairs, and the frequency table is
sliced with them. transformers decoders built from tiny configs (random weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import engine
from tests import architectures
from tests.helpers import assert_equals_mask_mode

# name -> (query projection, key projection, fused qkv: (query rows, key rows) or None)
ROTARY = {
    "llama": ("self_attn.q_proj", "self_attn.k_proj"),
    "qwen2": ("self_attn.q_proj", "self_attn.k_proj"),
    "mistral": ("self_attn.q_proj", "self_attn.k_proj"),
    "gemma": ("self_attn.q_proj", "self_attn.k_proj"),
    "gemma2": ("self_attn.q_proj", "self_attn.k_proj"),
    "phi3": ("self_attn.qkv_proj", None),
    "phi": ("self_attn.q_proj", "self_attn.k_proj"),  # partial rotary
    "stablelm": ("self_attn.q_proj", "self_attn.k_proj"),  # partial rotary
}


def _stablelm_wide_heads():
    """StableLM's rotary part is a quarter of each head: two heads of 32 give 4 pairs."""
    import transformers as tf

    config = tf.StableLmConfig(**{**architectures.DECODER, "num_attention_heads": 2},
                               num_key_value_heads=2)
    model = architectures.OneTensor(tf.StableLmForCausalLM(config).eval()).eval()
    return model, (torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2)),)


FACTORIES = {"stablelm": _stablelm_wide_heads}


def _pruned(name: str):
    torch.manual_seed(0)
    model, inputs = FACTORIES.get(name, getattr(architectures, name))()
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    frequencies = {k: v.detach().clone() for k, v in model.named_buffers()
                   if k.endswith("inv_freq")}
    analysis = engine.analyze(model, inputs)
    structure = analysis.structure(False)
    # the hidden stream is normalised over its channels (inexact by nature): keep it whole
    inexact = [g.name for g in structure.groups if not g.exact and g.prunable.any()]
    # half of every other group (a global ratio might spare the few rotary pairs)
    ratios = {g.name: 0.5 for g in structure.groups
              if g.name not in inexact and g.prunable.any()}
    plan = engine.plan(analysis, engine.PruningOptions(), ratios=ratios, pinned=inexact)
    return model, original, frequencies, engine.apply(analysis, plan)


def _kept_rows(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Which original rows the pruned weight holds, found by value (random weights)."""
    rows = []
    for row in pruned:
        match = (original == row).all(dim=1).nonzero().ravel().tolist()
        assert len(match) == 1
        rows.append(match[0])
    return rows


def _per_head(rows: list[int], head_dim: int) -> list[set[int]]:
    heads: dict[int, set[int]] = {}
    for r in rows:
        heads.setdefault(r // head_dim, set()).add(r % head_dim)
    return [heads[h] for h in sorted(heads)]


@pytest.mark.parametrize("name", sorted(ROTARY))
def test_rotary_heads_pruned_in_pairs_exactly(name):
    model, original, frequencies, result = _pruned(name)
    verification = result.report["verification"]
    assert verification["exact_expected"] and verification["exact"], verification
    assert_equals_mask_mode(result)
    config = model.model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or \
        config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    rotary = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    half = rotary // 2
    state = result.module.state_dict()
    query, key = ROTARY[name]
    for layer in range(config.num_hidden_layers):
        prefix = f"model.model.layers.{layer}.{query}.weight"
        old = original[prefix]
        rows = _kept_rows(old, state[prefix])
        if key is None:  # fused: query rows, then key rows, then value rows
            q_rows = [r for r in rows if r < heads * head_dim]
            k_rows = [r - heads * head_dim for r in rows
                      if heads * head_dim <= r < (heads + kv_heads) * head_dim]
        else:
            q_rows = rows
            k_prefix = f"model.model.layers.{layer}.{key}.weight"
            k_rows = _kept_rows(original[k_prefix], state[k_prefix])
        q_heads, k_heads = _per_head(q_rows, head_dim), _per_head(k_rows, head_dim)
        assert len(q_heads) == heads and len(k_heads) == kv_heads, "every head keeps some"
        pairs = {i for i in q_heads[0] if i < half}
        for kept in q_heads + k_heads:
            rotated = {i for i in kept if i < rotary}
            # (i, i + d/2) pairs, the same in every query and key head
            assert rotated == pairs | {i + half for i in pairs}
        assert 0 < len(pairs) < half, "some rotary pairs removed, some kept"
    buffers = dict(result.module.named_buffers())
    # the table the graph reads is sliced with the kept pairs (an unused copy such as
    # original_inv_freq may stay whole)
    sliced = [n for n, table in frequencies.items() if n in buffers and
              torch.equal(buffers[n], table[sorted(pairs)])]
    assert sliced, "the frequency table follows the kept pairs"


def test_partial_rotary_pass_channels_prune_apart_from_pairs():
    """Phi: the rotary part pairs (one group shared by every layer, through one table);
    each layer's pass-through part is a group of its own, pruned inside heads."""
    _model, _original, _frequencies, result = _pruned("phi")
    groups = {g["name"]: g for g in result.report["groups"]}
    # 4 heads of 16 channels, 8 of them rotary: 4 x 8 pass-through channels per layer
    pass_groups = [g for g in groups.values() if g["channels"] == 4 * 8]
    assert pass_groups and all(len(g["pruned"]) for g in pass_groups)


def test_whole_heads_mode_leaves_the_frequency_table_alone():
    """With reshape_channel_axis -2 whole heads go; the table keeps every frequency."""
    torch.manual_seed(0)
    model, inputs = architectures.llama()
    table = model.model.model.rotary_emb.inv_freq.clone()
    result = engine.prune(model, inputs, engine.PruningOptions(reshape_channel_axis=-2),
                          ratio=0.5)
    sliced = dict(result.module.named_buffers())["model.model.rotary_emb.inv_freq"]
    assert torch.equal(sliced, table)
    q = result.module.state_dict()["model.model.layers.0.self_attn.q_proj.weight"]
    assert q.shape[0] % 16 == 0
    assert np.isfinite(result.report["verification"]["max_abs_diff_vs_masked"])
