"""OUT/hf/: the pruned model as a folder the same transformers Auto class loads.

A transformers config describes a model's shapes with a few numbers (hidden size,
intermediate size, heads, key/value heads). After pruning, those numbers are read back from
the pruned weights by a small per-architecture rule, a fresh model is built from the new
config, and every one of its weights must have exactly the pruned weight's shape; the pruned
weights are then copied in by name. Where a weight's shape is not what the config implies
(layers pruned unequally, per-head channels in a config with one head size, ResNet's fixed
bottleneck ratio) the folder is not written and one line says which weight and why.

Every written folder is reloaded with ``from_pretrained`` (local files only, no custom code)
and run on the example inputs; its outputs must equal the pruned ``model.pt2`` within 1e-5
relative, or the folder is not written. The check goes into ``report.json`` as ``hf``.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from engine.graph.outputs import tensor_leaves
from engine.io.hf import HFSource, quiet_transformers
from engine.io.hf_config import (
    NotDescribable,
    Unsolvable,
    attention_heads,
    field_roles,
    model_class,
    per_layer_reason,
    probe_config,
    query_scale,
    rotary_config,
    rotary_free_fields,
    rotary_heads,
    solve_config,
    solve_per_layer,
)
from engine.io.hf_depth import config_update, renumber
from engine.io.shards import write_index, write_shard
from engine.scoring.uniform import families
from engine.transform.exactness import exact_tolerance

HF_TOLERANCE = 1e-5  # relative: max |hf - pt2| / max |pt2|
Shapes = dict[str, tuple[int, ...]]


def check_uniform(result) -> None:
    """A config has one size per layer kind: repeated layers must lose the same count."""
    structure = result.analysis.structure(result.plan.options.prunes_whole_blocks)
    pruned = {gp.name: int(gp.pruned.size) for gp in result.plan.groups}
    for names in families(g for g in structure.groups if g.name in pruned):
        counts = {pruned[n] for n in names}
        if len(counts) > 1:
            low = min(names, key=pruned.get)
            high = max(names, key=pruned.get)
            config_name = type(result.analysis.captured.hf.config).__name__
            raise NotDescribable(
                f"--uniform is needed for hf/: {config_name} has one size for every layer, "
                f"and {low} loses {pruned[low]} channels where {high} loses {pruned[high]}"
            )


def check_heads(result) -> None:
    """Channels pruned inside attention heads change the head size of some projections only,
    and the attention scale stays the original one; no config here has a field for that."""
    structure = result.analysis.structure(result.plan.options.prunes_whole_blocks)
    heads = attention_heads(result.analysis)
    # value heads shrunk with the rotary pairs: head_dim describes them (pruned_config)
    with_pairs = (set(rotary_heads(result.analysis).values)
                  if _kept_rotary_pairs(result.analysis, result.plan) is not None else set())
    for gp in result.plan.groups:
        info = structure.group(gp.name)
        if len(gp.pruned) and gp.name not in with_pairs and info.blocks and \
                not info.whole_blocks and any((x.member.param, x.member.dim) in heads
                                              for x in info.slots.values()):
            heads, size = info.blocks
            kept = size - len(gp.pruned) // heads
            config_name = type(result.analysis.captured.hf.config).__name__
            raise NotDescribable(
                f"group {gp.name} keeps {kept} of the {size} channels of each of its {heads} "
                f"blocks (attention heads), and {config_name} has one head size for queries, "
                "keys and values; prune whole heads (--reshape-channel-axis -2)"
            )


def pruned_config(hf: HFSource, module: torch.nn.Module, analysis=None, plan=None):
    """The config describing `module`'s weights: its width fields solved from the pruned
    shapes (engine/io/hf_config.py) and checked by building the model on meta. With the
    `plan`, rotary pairs pruned inside heads set head_dim and the rope parameters."""
    config = hf.config
    values = config.to_dict()
    depth = config_update(hf)
    if depth:
        values.update(depth)
        config = type(config).from_dict(values)
    shapes = {k: tuple(v.shape) for k, v in _hf_weights(hf, module).items()}
    switches = probe_config(model_class(hf), config).switch_for(shapes)
    if switches:  # recovery added biases the config's own switches describe
        config = type(config).from_dict({**config.to_dict(), **switches})
    fixed: set[str] = set()
    if analysis is not None:  # a head's size stays, whatever shapes could also be read
        roles = field_roles(probe_config(model_class(hf), config), attention_heads(analysis))
        fixed = {name for name, why in roles.items() if why}
    kept_pairs = _kept_rotary_pairs(analysis, plan)
    if kept_pairs is not None:
        fixed -= rotary_free_fields(analysis, plan.options.prunes_whole_blocks)
    try:
        new = solve_config(model_class(hf), config, shapes, fixed)
    except Unsolvable as exc:
        # layers of one kind may differ where the model's code reads per_layer_config
        new = solve_per_layer(model_class(hf), config, shapes, fixed)
        if new is None:
            raise NotDescribable(str(exc)[:400]) from None
    if kept_pairs is not None:
        new = rotary_config(new, rotary_heads(analysis), kept_pairs)
    return new


def _kept_rotary_pairs(analysis, plan):
    """The channels the plan keeps of the rotary pairs group, when it prunes some."""
    if analysis is None or plan is None or plan.options.prunes_whole_blocks:
        return None
    rotary = rotary_heads(analysis)
    if rotary is None:
        return None
    gp = plan.group(rotary.group)
    return gp.kept if len(gp.pruned) else None


def _scale_queries(config, tensors: dict[str, torch.Tensor], analysis, plan) -> None:
    """Attention scaled by 1/sqrt(head_dim) in the original must stay so with the smaller
    head_dim the new config gives: the first projection of each attention layer in the
    rotary pairs group (the queries) takes the factor (engine.io.hf_config.query_scale).
    The scaled tensors are new ones in `tensors` (the pruned module's stay as they are)."""
    if _kept_rotary_pairs(analysis, plan) is None:
        return
    rotary = rotary_heads(analysis)
    scale = query_scale(config, rotary, config.head_dim)
    if scale == 1.0:
        return
    layers = analysis.structure(False).group(rotary.group).layers
    first: dict[str, str] = {}
    for layer in layers:  # network order: queries before keys
        first.setdefault(layer.rsplit(".", 1)[0], layer)
    with torch.no_grad():
        for layer in first.values():
            for suffix in ("weight", "bias"):
                if f"{layer}.{suffix}" in tensors:
                    tensors[f"{layer}.{suffix}"] = tensors[f"{layer}.{suffix}"] * scale


def _changed(config, values: dict[str, Any]) -> str:
    before = config.to_dict()
    return ", ".join(f"{k}={v}" for k, v in values.items() if before.get(k) != v)


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def _hf_weights(hf: HFSource, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The pruned weights under the names of the new config's model (layers renumbered
    after depth pruning)."""
    weights = _weights(module)
    names = renumber(hf, list(weights))
    weights = {names[k]: v for k, v in weights.items()}
    # a re-captured model (after depth pruning) keeps one name of a tied pair (lm_head.weight
    # for the input embedding too): the config's rules read the embedding under its own name
    tied = getattr(model_class(hf), "_tied_weights_keys", None)
    if isinstance(tied, dict) and getattr(hf.config, "tie_word_embeddings", False):
        for target, source in tied.items():
            if source not in weights and target in weights:
                weights[source] = weights[target]
    return weights


def _loader_class(hf: HFSource):
    import transformers

    if hf.auto_class:
        return getattr(transformers, hf.auto_class)
    return model_class(hf)


def carry_files(hf: HFSource, folder: Path) -> list[str]:
    """Copy the source folder's non-weight files (tokenizer, subfolder configs) into
    `folder`, keeping their relative paths; the names copied."""
    carried = []
    for name in hf.carried:
        if hf.folder is not None and (hf.folder / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(hf.folder / name, folder / name)
            carried.append(name)
    return carried


def pretrained_weights(hf: HFSource, module: torch.nn.Module, analysis=None, plan=None):
    """(the pruned config's transformers model on the meta device, every tensor of its state
    dict): `module`'s own tensors under the model's names, no copy made except where the
    dtype differs, a query projection is rescaled (`_scale_queries`) or a bias a config
    switch added is zero. Tied weights are one tensor under each name."""
    new_config = pruned_config(hf, module, analysis, plan)
    # built on the meta device in the weights' dtype (a bf16 model stays bf16 on disk):
    # its names, shapes and dtypes, no memory
    with quiet_transformers(), torch.device("meta"):
        fresh = model_class(hf)._from_config(new_config, dtype=_weight_dtype(module)).eval()
    target = fresh.state_dict(keep_vars=True)
    weights = _hf_weights(hf, module)
    params = set(renumber(hf, [k for k, _ in module.named_parameters()]).values())
    extra = sorted(k for k in params if k not in target)
    if extra:
        raise NotDescribable(f"weight {extra[0]} has no place in {hf.model_class}")
    tensors: dict[str, torch.Tensor] = {}
    for key, meta in target.items():
        if key in weights:
            if tuple(weights[key].shape) != tuple(meta.shape):
                raise NotDescribable(f"{key} is {list(weights[key].shape)} where the pruned "
                                     f"config implies {list(meta.shape)}")
            tensors[key] = weights[key].detach().to(meta.dtype)
    # a key the pruned module lacks: a tie of one it has (one tensor of the fresh model)
    for key, meta in target.items():
        if key not in tensors:
            tie = next((k for k, m in target.items() if m is meta and k in tensors), None)
            if tie is not None:
                tensors[key] = tensors[tie]
    # biases a config switch turned on (recovery corrected some of them): zero elsewhere
    switched = {n for added in probe_config(model_class(hf), hf.config).switches.values()
                for n in added}
    persistent_params = {k for k, _ in fresh.named_parameters(remove_duplicate=False)}
    for key, meta in target.items():
        if key not in tensors and key in switched:
            tensors[key] = torch.zeros(meta.shape, dtype=meta.dtype)
    missing = [k for k in target if k not in tensors]
    if any(k in persistent_params for k in missing):
        raise NotDescribable("the pruned model has no weight for "
                             f"{next(k for k in missing if k in persistent_params)}")
    if missing:
        raise NotDescribable(f"the pruned model has no value for the buffer {missing[0]}")
    _scale_queries(fresh.config, tensors, analysis, plan)
    return fresh, tensors


def build_pretrained(hf: HFSource, module: torch.nn.Module, analysis=None, plan=None):
    """A transformers model of the pruned config holding `module`'s weights (in memory: a
    second copy of them; hf/ is written from `pretrained_weights` without one)."""
    from transformers.initialization import no_init_weights

    meta, tensors = pretrained_weights(hf, module, analysis, plan)
    # every weight is overwritten below: skip the random initialisation
    with quiet_transformers(), no_init_weights():
        fresh = type(meta)._from_config(meta.config, dtype=meta.dtype).eval()
    fresh.load_state_dict(tensors, strict=False)
    return fresh


SAFETENSORS_PATTERN = "model{suffix}.safetensors"  # save_pretrained's shard names


def save_pretrained_weights(model, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """What ``model.save_pretrained(folder)`` writes, with `tensors` as its weights: the
    config (with its dtype and class), the generation config, the safetensors shards
    (transformers' names, tied copies once, its shard sizes), written one tensor at a time
    (engine.io.shards.write_shard) rather than through a serialised copy of each shard."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.dtype = str(model.dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    with quiet_transformers():
        config.save_pretrained(os.fspath(folder))
        if model.can_generate() and model.generation_config is not None:
            model.generation_config.save_pretrained(os.fspath(folder))
    state = dict(tensors)
    for ignored in model._keys_to_ignore_on_save or ():
        state.pop(ignored, None)
    state = remove_tied_weights_from_state_dict(state, model)
    state = revert_weight_conversion(model, state)
    split = split_torch_state_dict_into_shards(state, filename_pattern=SAFETENSORS_PATTERN)
    total = 0
    for file, names in split.filename_to_tensors.items():
        specs = {n: (state[n].dtype, tuple(state[n].shape)) for n in names}
        total += write_shard(folder / file, specs, state.__getitem__)
    if split.is_sharded:
        write_index(folder, dict(split.tensor_to_filename), total)


def parameter_places(hf: HFSource):
    """For recovery: parameter name -> why the architecture has no place for it (None: it
    has one, or a config switch such as ``mlp_bias`` adds it)."""
    cmap = probe_config(model_class(hf), hf.config)

    def why(name: str) -> str | None:
        if name in cmap.shapes or cmap.switch_for([name]):
            return None
        return (f"{hf.model_class} has no {name} and no {cmap.config_name} switch adds one "
                "(hf/ stays loadable)")

    return why


def write_hf(result, folder: Path) -> dict[str, Any]:
    """Write `folder` (a staging path) and check it; the report's ``hf`` entry.

    ``{"written": True, "auto_class", "config": {changed numbers}, "max_rel_diff_vs_pt2",
    "carried": [files]}`` or ``{"written": False, "reason": one line}``.
    """
    hf: HFSource = result.analysis.captured.hf
    if hf.depth_reason:
        return {"written": False, "reason": hf.depth_reason}
    try:
        check_heads(result)
        model, tensors = pretrained_weights(hf, result.module, result.analysis, result.plan)
    except NotDescribable as exc:
        # layers of one kind that lose different counts are the likely cause: say so
        try:
            check_uniform(result)
        except NotDescribable as uneven:
            why = per_layer_reason(model_class(hf), hf.config)
            return {"written": False, "reason": f"{uneven}; {why}"}
        return {"written": False, "reason": str(exc)}
    save_pretrained_weights(model, tensors, folder)
    del tensors  # the pruned module's own tensors: nothing more to free
    carried = carry_files(hf, folder)
    dtype = _weight_dtype(result.module)
    diff = _check(hf, folder, result, dtype)
    # a half-precision model reloaded by transformers runs its own kernels (e.g. fused
    # attention), each rounding to 8 or 11 bits: the allowance is that of exactness
    allowed = max(HF_TOLERANCE, exact_tolerance([dtype]))
    if not diff <= allowed:
        shutil.rmtree(folder, ignore_errors=True)
        return {"written": False,
                "reason": f"the reloaded hf/ model differs from model.pt2 by {diff:.3g} "
                          f"(relative; allowed {allowed:.3g})"}
    before = hf.config.to_dict()
    after = model.config.to_dict()
    changed = {k: after[k] for k in after if before.get(k) != after[k]
               and (k in before or k == "per_layer_config")
               and k not in ("architectures", "dtype", "torch_dtype", "transformers_version")}
    return {
        "written": True,
        "auto_class": hf.auto_class or hf.model_class,
        "model_class": hf.model_class,
        "config": changed,
        "max_rel_diff_vs_pt2": diff,
        "carried": carried,
    }


def _weight_dtype(module: torch.nn.Module) -> torch.dtype:
    """The floating dtype holding most of the weights (what ``dtype="auto"`` loads)."""
    counts: dict[torch.dtype, int] = {}
    for p in module.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _check(hf: HFSource, folder: Path, result, dtype: torch.dtype) -> float:
    """Reload `folder` like a user would (in the weights' dtype) and compare its outputs with
    the pruned program."""
    with quiet_transformers():
        reloaded = _loader_class(hf).from_pretrained(
            os.fspath(folder), local_files_only=True, trust_remote_code=False,
            use_safetensors=True, dtype=dtype,
        ).eval()
    if getattr(reloaded.config, "use_cache", None):
        reloaded.config.use_cache = False
    inputs = result.example_inputs
    with torch.no_grad():
        if hf.input_names:
            out = reloaded(**dict(zip(hf.input_names, inputs)))
        else:
            out = reloaded(*inputs)
        reference = result.program.module()(*inputs)
    got = tensor_leaves(out)
    want = tensor_leaves(reference)
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
        return float("inf")
    worst_abs = max((float((a.float() - b.float()).abs().max()) for a, b in zip(got, want)
                     if a.numel()), default=0.0)
    scale = max((float(b.float().abs().max()) for b in want if b.numel()), default=0.0)
    return worst_abs / scale if scale > 0 else worst_abs
