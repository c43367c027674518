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


@pytest.fixture(scope="module")
def pruned():
    """name -> _pruned(name), made once: the pair test and the pass-through test of Phi
    read the same prune (neither changes it)."""
    made: dict = {}

    def get(name: str):
        if name not in made:
            made[name] = _pruned(name)
        return made[name]

    return get


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
def test_rotary_heads_pruned_in_pairs_exactly(name, pruned):
    model, original, frequencies, result = pruned(name)
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


def test_partial_rotary_pass_channels_prune_apart_from_pairs(pruned):
    """Phi: the rotary part pairs (one group shared by every layer, through one table);
    each layer's pass-through part is a group of its own, pruned inside heads."""
    _model, _original, _frequencies, result = pruned("phi")
    groups = {g["name"]: g for g in result.report["groups"]}
    # 4 heads of 16 channels, 8 of them rotary: 4 x 8 pass-through channels per layer
    pass_groups = [g for g in groups.values() if g["channels"] == 4 * 8]
    assert pass_groups and all(len(g["pruned"]) for g in pass_groups)


def test_whole_heads_mode_leaves_the_frequency_table_alone(pruned):
    """With reshape_channel_axis -2 whole heads go; the table keeps every frequency. The
    Llama capture of the pair test is pruned again here with other options (a prune copies
    what it cuts: the shared analysis and the table copied before it stay the original's)."""
    _model, _original, frequencies, pairs_result = pruned("llama")
    table = frequencies["model.model.rotary_emb.inv_freq"]
    result = engine.prune(pairs_result.analysis, None,
                          engine.PruningOptions(reshape_channel_axis=-2), ratio=0.5)
    sliced = dict(result.module.named_buffers())["model.model.rotary_emb.inv_freq"]
    assert torch.equal(sliced, table)
    q = result.module.state_dict()["model.model.layers.0.self_attn.q_proj.weight"]
    assert q.shape[0] % 16 == 0
    assert np.isfinite(result.report["verification"]["max_abs_diff_vs_masked"])


# ------------------------------------------------------------------ hf/ with --uniform
def _reloaded_equals_pt2(out_dir, result):
    """OUT/hf/ reloaded with the Auto class gives model.pt2's logits (loaded from disk)."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(out_dir / "hf", local_files_only=True,
                                                    trust_remote_code=False).eval()
    program = torch.export.load(out_dir / "model.pt2")
    inputs = result.example_inputs
    names = result.analysis.captured.hf.input_names
    with torch.no_grad():
        got = (model(**dict(zip(names, inputs)), use_cache=False) if names else
               model(*inputs, use_cache=False)).logits
        want = program.module()(*inputs)
        want = want if isinstance(want, torch.Tensor) else want[0]
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    return model


def _uniform_hf(model, inputs, out_dir):
    result = engine.prune(model, inputs, ratio=0.5, uniform=True)
    engine.save(result, out_dir, onnx=False)
    return result


def _check_rope(result, original_config, new_config):
    """head_dim' = 2k, rope_theta' = theta^(2k/d), linear factor theta^(2s/d) when the kept
    run of frequencies starts at s > 0; the kept pairs are that run."""
    from engine.io.hf_config import rotary_heads

    rotary = rotary_heads(result.analysis)
    kept_channels = result.plan.group(rotary.group).kept
    j = sorted(int(np.flatnonzero(rotary.frequency_channel == c)[0]) for c in kept_channels)
    start, k, d = j[0], len(j), original_config.head_dim
    assert j == list(range(start, start + k)) and 0 < k < d // 2
    assert new_config.head_dim == 2 * k
    theta = original_config.rope_parameters["rope_theta"]
    rope = new_config.rope_parameters
    assert rope["rope_theta"] == pytest.approx(theta ** (2 * k / d), rel=1e-9)
    if start:
        assert rope["rope_type"] == "linear"
        assert rope["factor"] == pytest.approx(theta ** (2 * start / d), rel=1e-9)
    else:
        assert rope.get("rope_type", "default") == "default"


def test_llama_folder_uniform_writes_hf_with_fewer_rotary_frequencies(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(**architectures.DECODER, num_key_value_heads=2)
    tf.LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "in")
    result = _uniform_hf(str(tmp_path / "in"), None, tmp_path / "out")
    entry = result.report["hf"]
    assert entry["written"], entry
    assert "head_dim" in entry["config"]
    reloaded = _reloaded_equals_pt2(tmp_path / "out", result)
    _check_rope(result, config, reloaded.config)
    state = reloaded.state_dict()
    head_dim = reloaded.config.head_dim
    assert state["model.layers.0.self_attn.v_proj.weight"].shape[0] == 2 * head_dim


@pytest.mark.parametrize("name", ["gemma", "gemma2"])
def test_uniform_hf_for_other_rotary_configs(name, tmp_path):
    """Gemma: one key/value head, attention scaled by head_dim (queries rescaled);
    Gemma 2: scaled by query_pre_attn_scalar (queries untouched)."""
    torch.manual_seed(0)
    wrapped, inputs = getattr(architectures, name)()
    model = wrapped.model
    result = _uniform_hf(model, inputs, tmp_path)
    assert result.report["hf"]["written"], result.report["hf"]
    reloaded = _reloaded_equals_pt2(tmp_path, result)
    _check_rope(result, model.config, reloaded.config)


def test_config_without_head_dim_keeps_rotary_pairs_whole_and_says_why(tmp_path):
    """Qwen2Config derives its head size from hidden_size: the rotary pairs stay whole under
    --uniform (with the reason), the rest is pruned and hf/ is written."""
    torch.manual_seed(0)
    wrapped, inputs = architectures.qwen2()
    result = _uniform_hf(wrapped.model, inputs, tmp_path)
    kept = {e["group"]: e["reason"] for e in result.report["uniform"]["kept_for_config"]}
    assert "model.layers.0.self_attn.q_proj+3" in kept
    assert result.report["hf"]["written"], result.report["hf"]
    assert result.report["after"]["params"] < result.report["before"]["params"]
    _reloaded_equals_pt2(tmp_path, result)


def test_keep_contiguous_keeps_the_best_run_of_frequencies():
    from engine.options import PruningOptions
    from engine.scoring.planning import GroupInput, make_plan
    from engine.scoring.uniform import keep_contiguous

    raw = np.array([1.0, 9.0, 0.5, 8.0, 7.0, 0.1])
    group = GroupInput(name="pairs", raw={"q": raw})
    plan = make_plan([group], PruningOptions(step_size=1), ratios={"pairs": 0.5})
    assert sorted(plan.group("pairs").kept.tolist()) == [1, 3, 4]  # the best three
    # layer norms are affine per member: the best run of raw scores is 1..3 (17.5 against
    # 15.5 for 2..4 and 15.1 for 3..5)
    window = keep_contiguous(plan, "pairs", np.arange(6)).group("pairs")
    assert window.kept.tolist() == [1, 2, 3]
    assert window.pruned.tolist() == [0, 4, 5]
    # the order maps run positions to channels (channel 5 is frequency 0, ...)
    reverse = keep_contiguous(plan, "pairs", np.arange(6)[::-1].copy()).group("pairs")
    assert reverse.kept.tolist() == [1, 2, 3]
    order = np.array([0, 2, 4, 1, 3, 5])  # runs: {0,2,4} 8.5, {2,4,1} 16.5, {4,1,3} 24
    moved = keep_contiguous(plan, "pairs", order).group("pairs")
    assert moved.kept.tolist() == [1, 3, 4]


def test_a_scattered_kept_set_is_not_describable():
    import transformers as tf

    from engine.io.hf_config import NotDescribable, RotaryHeads, rotary_config

    config = tf.LlamaConfig(**architectures.DECODER, num_key_value_heads=2)
    rotary = RotaryHeads("pairs", [], 16, 10000.0, 2, np.arange(8))
    with pytest.raises(NotDescribable, match="contiguous run"):
        rotary_config(config, rotary, [0, 2, 3])
    new = rotary_config(config, rotary, [2, 3, 4])
    assert new.rope_parameters["rope_theta"] == pytest.approx(10000.0 ** (6 / 16))
    assert new.rope_parameters["factor"] == pytest.approx(10000.0 ** (4 / 16))


def test_uniform_with_frozen_rotary_pairs_still_plans():
    """GPT-NeoX's fused per-head q/k/v keeps its pairs frozen: --uniform plans the rest."""
    torch.manual_seed(0)
    wrapped, inputs = architectures.gpt_neox()
    result = engine.prune(wrapped.model, inputs, ratio=0.5, uniform=True)
    assert result.report["after"]["params"] < result.report["before"]["params"]
