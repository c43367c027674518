"""hf/ after depth pruning: whole transformer layers removed, the remaining ones renumbered.

Depth pruning (engine/transform/depth.py) removes residual *blocks*, and in a transformer a
block is one sublayer: the attention branch or the MLP branch of a layer. A transformers
config describes whole layers only (``num_hidden_layers``), so hf/ is written when every block
of a removed layer went; the model left is then the same architecture with fewer layers: its
weights are renumbered consecutively (model.layers.5 -> model.layers.4), per-layer config
lists (``layer_types``) lose the removed entries, and a fresh model built from the new config
gives each layer its new index (``self_attn.layer_idx``, used by the key/value cache).
A sublayer removed without the rest of its layer leaves a layer no config describes: hf/ is
not written and the report says why in one line.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from engine.io.hf_config import NotDescribable

# the numbered layer list a block lives in: "model.layers.3.mlp" -> ("model.layers", 3)
_LAYER = re.compile(r"^(?P<list>.+?)\.(?P<index>\d+)(?:\.|$)")
# config entries with one value per layer, and entries holding layer indices
PER_LAYER_LISTS = ("layer_types", "no_rope_layers")
LAYER_INDEX_LISTS = ("mlp_only_layers",)
# layers below this index use full attention (Qwen2-like configs derive layer_types from it)
LAYER_COUNT_BOUNDS = ("max_window_layers",)


def layer_of(name: str) -> tuple[str, int] | None:
    """The numbered layer a block belongs to: "model.layers.3.mlp" -> ("model.layers", 3)."""
    match = _LAYER.match(name)
    return (match["list"], int(match["index"])) if match else None


def after_depth(hf, blocks: list, removed: list):
    """The HFSource of the model left after `removed` (of all residual `blocks`) are gone."""
    if hf is None or not removed or hf.depth_reason:
        return hf
    config_name = type(hf.config).__name__
    gone = {b.name for b in removed}
    layers: dict[tuple[str, int], list[str]] = {}
    for block in blocks:
        place = layer_of(block.name)
        if place is not None:
            layers.setdefault(place, []).append(block.name)

    def refuse(reason: str):
        return dataclasses.replace(hf, depth_reason=reason)

    removed_layers: set[tuple[str, int]] = set()
    for block in removed:
        place = layer_of(block.name)
        if place is None:
            return refuse(f"removed block {block.name} is not in a numbered layer list: "
                          f"{config_name} cannot describe the model without it")
        kept = [n for n in layers[place] if n not in gone]
        if kept:
            return refuse(
                f"block {block.name} was removed but {', '.join(kept)} of the same layer "
                f"stays: {config_name} describes whole layers only (num_hidden_layers), so "
                "hf/ needs both sublayers of a layer removed")
        removed_layers.add(place)
    lists = sorted({name for name, _ in removed_layers})
    if len(lists) > 1 or (hf.layer_list and lists[0] != hf.layer_list):
        return refuse(f"layers of several layer lists ({', '.join(lists)}) were removed: "
                      f"{config_name} has one num_hidden_layers")
    layer_list = lists[0]
    n_layers = getattr(hf.config, "num_hidden_layers", None)
    found = {index for name, index in layers if name == layer_list}
    if n_layers is None or found != set(range(n_layers)):
        return refuse(f"{layer_list} holds {len(found)} layers with residual blocks where "
                      f"{config_name} has num_hidden_layers={n_layers}: the removed layers "
                      "cannot be described")
    indices = tuple(sorted({*hf.removed_layers, *(i for _, i in removed_layers)}))
    return dataclasses.replace(hf, layer_list=layer_list, removed_layers=indices)


def renumber(hf, names: list[str]) -> dict[str, str]:
    """Weight name in the pruned model -> its name with the remaining layers numbered
    consecutively. A weight left in a removed layer (a post-norm layer keeps the LayerNorm
    after its residual add) raises NotDescribable."""
    if not hf.removed_layers:
        return {n: n for n in names}
    removed = set(hf.removed_layers)
    prefix = re.compile(rf"^{re.escape(hf.layer_list)}\.(\d+)\.")
    out = {}
    for name in names:
        match = prefix.match(name)
        if match is None:
            out[name] = name
            continue
        index = int(match[1])
        if index in removed:
            raise NotDescribable(
                f"{name} stays after every residual block of layer {index} was removed (the "
                f"layer keeps weights outside its blocks): {type(hf.config).__name__} cannot "
                "describe it")
        new = index - sum(1 for r in removed if r < index)
        out[name] = f"{hf.layer_list}.{new}.{name[match.end():]}"
    return out


def config_update(hf) -> dict[str, Any]:
    """The config entries that change with the removed layers (none when none were)."""
    if not hf.removed_layers:
        return {}
    config = hf.config
    values = config.to_dict()
    n_layers = config.num_hidden_layers
    kept = [i for i in range(n_layers) if i not in set(hf.removed_layers)]
    key = getattr(config, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")
    update: dict[str, Any] = {key: len(kept)}
    for name in PER_LAYER_LISTS:
        value = values.get(name)
        if isinstance(value, (list, tuple)) and len(value) == n_layers:
            update[name] = [value[i] for i in kept]
    for name in LAYER_INDEX_LISTS:
        value = values.get(name)
        if isinstance(value, (list, tuple)):
            update[name] = [kept.index(i) for i in value if i in kept]
    for name in LAYER_COUNT_BOUNDS:
        value = values.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            update[name] = sum(1 for i in kept if i < value)
    return update
