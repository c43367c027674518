"""Which parameter dimensions each field of a transformers config sets, found by building.

A config describes a model's shapes with a few numbers. Which weight dimension follows
which number is not written anywhere, so it is measured: the model class is built on the
meta device (no memory, no initialisation) once with the config as it is and once per
integer field with that field changed; the dimensions whose size moved are the ones the
field sets. A field that adds or removes weights (a layer count) is left out: it is not a
width. The result (:class:`ConfigMap`) serves two purposes:

- before planning (``--uniform``): a group of channels can shrink only when some field that
  can change sets every dimension its members prune; groups that one field sets together are
  tied (they must lose the same count), and groups no field describes stay whole;
- after pruning (hf/): the new field values are solved from the pruned shapes
  (:func:`solve_config`) and checked by building the model of the new config on meta.

A head's size cannot change in any config here: the attention scale follows it (and rotary
tables too), so a field that sets it, or derives it (``hidden_size / num_attention_heads``),
is *fixed*: every dimension it moves stays.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine.errors import PruneScopeError
from engine.graph.frequencies import find_frequency_tables
from engine.io.hf import HFSource, quiet_transformers, transformers_class

Dim = tuple[str, int]  # (parameter name, dimension)
Shapes = dict[str, tuple[int, ...]]

# integer fields that are identifiers or switches, never widths
_NOT_WIDTH = re.compile(r"(_id|_ids|_token|_index|_idx|seed|_layers?|_steps?|_epochs?)$|"
                        r"^(chunk_size_feed_forward|pretraining_tp|max_position_embeddings|"
                        r"vocab_size|type_vocab_size|num_labels|num_hidden_layers|n_layer)$")
# unset (None) fields that a config fills in from others (GPT-2's n_inner = 4 * n_embd)
_UNSET_WIDTH = re.compile(r"(inner|_size|_dim|ffn|width)$")
_MAX_SEARCH = 256  # candidate configs built while solving


class NotDescribable(PruneScopeError):
    """The config cannot describe the pruned shapes (the message is the one-line reason)."""


def model_class(hf: HFSource):
    """The transformers class the model was built with."""
    return transformers_class(hf.model_class, getattr(hf.config, "model_type", None))


@dataclass
class FieldEffect:
    """One config field and the dimensions it moves: (size at x0, size at x1)."""

    name: str
    base: int | float | None  # the config's value (None: unset, derived by the config)
    x0: int | float
    x1: int | float
    dims: dict[Dim, tuple[int, int]] = field(default_factory=dict)

    def value_for(self, dim: Dim, size: int) -> int | float | None:
        """The field value that gives `dim` this size (linear), or None if not an integer
        (a float field, a ratio, takes the exact quotient)."""
        s0, s1 = self.dims[dim]
        if isinstance(self.x0, float):
            value = self.x0 * size / s0 if s0 else None
            return value if value and value > 0 else None
        num = (size - s0) * (self.x1 - self.x0)
        if num % (s1 - s0):
            return None
        value = self.x0 + num // (s1 - s0)
        return value if value >= 1 else None


@dataclass
class ConfigMap:
    """The measured map of one config: base shapes and each width field's dimensions."""

    config_name: str
    shapes: Shapes
    fields: dict[str, FieldEffect]
    # boolean switches that add parameters (Llama's mlp_bias): field -> the names it adds
    switches: dict[str, list[str]] = field(default_factory=dict)

    def switch_for(self, names) -> dict[str, bool]:
        """The switches to turn on so that the model holds every one of `names` (those it
        lacks); empty when no set of switches adds them all."""
        missing = {n for n in names if n not in self.shapes}
        on = {f: True for f, added in self.switches.items() if missing & set(added)}
        covered = {n for f in on for n in self.switches[f]}
        return on if missing and missing <= covered else {}

    @functools.cached_property
    def by_dim(self) -> dict[Dim, list[str]]:
        out: dict[Dim, list[str]] = {}
        for f in self.fields.values():
            for dim in f.dims:
                out.setdefault(dim, []).append(f.name)
        return out


def _build_shapes(model_class, config) -> Shapes:
    from transformers.initialization import no_init_weights

    with torch.device("meta"), quiet_transformers(), no_init_weights():
        model = model_class(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _with(config, values: dict[str, Any]):
    """`config` with some fields changed; ``name[i]`` is element i of a list field."""
    merged = config.to_dict()
    for key, value in values.items():
        match = _ELEMENT.fullmatch(key)
        if match:
            items = list(merged[match[1]])
            items[int(match[2])] = value
            merged[match[1]] = items
        else:
            merged[key] = value
    return type(config).from_dict(merged)


_ELEMENT = re.compile(r"(\w+)\[(\d+)\]")


def _width_fields(config) -> list[tuple[str, Any]]:
    """(name, value) of every scalar field, and of every element of a list of integers."""
    out = []
    for name, value in config.to_dict().items():
        if isinstance(value, list) and value and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            if not _NOT_WIDTH.search(name) and not name.endswith(("depths", "layers")):
                out += [(f"{name}[{i}]", v) for i, v in enumerate(value)]
        else:
            out.append((name, value))
    return out


def _try_shapes(model_class, config, values: dict[str, Any]) -> Shapes | None:
    try:
        with quiet_transformers():
            return _build_shapes(model_class, _with(config, values))
    except Exception:  # noqa: BLE001 - a config that refuses the value: not a probe point
        return None


def _moved(base: Shapes, other: Shapes) -> dict[Dim, tuple[int, int]]:
    """Dimensions of the weights both hold whose size differs (a field may also add or remove
    weights, e.g. a shortcut projection where two widths stop being equal)."""
    moved = {}
    for name, shape in base.items():
        if name not in other or len(shape) != len(other[name]):
            continue
        for d, (a, b) in enumerate(zip(shape, other[name])):
            if a != b:
                moved[(name, d)] = (a, b)
    return moved


def _probe_points(name: str, value: Any) -> list[tuple[int, int]]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        if value < 1 or _NOT_WIDTH.search(name):
            return []
        points = [(value, 2 * value)]
        if value >= 2:
            points.append((value, value // 2))
        return points
    if isinstance(value, float) and value > 0 and name.endswith("_ratio"):
        return [(value, 2 * value)]  # a width as a multiple of another (Swin's mlp_ratio)
    if value is None and _UNSET_WIDTH.search(name) and not _NOT_WIDTH.search(name):
        return [(64, 128), (48, 96)]
    return []


def probe_config(model_class, config) -> ConfigMap:
    """Build `model_class` on meta with each width field of `config` changed in turn."""
    return _remembered("widths", model_class, config, _probe)


_PROBED: dict[tuple, Any] = {}  # the last few measurements (a build per field each)


def _remembered(kind: str, model_class, config, measure):
    key = (kind, model_class.__module__, model_class.__name__,
           json.dumps(config.to_dict(), sort_keys=True, default=str))
    if key not in _PROBED:
        if len(_PROBED) >= 8:
            _PROBED.pop(next(iter(_PROBED)))
        _PROBED[key] = measure(model_class, config)
    return _PROBED[key]


def _probe(model_class, config) -> ConfigMap:
    base = _build_shapes(model_class, config)
    fields: dict[str, FieldEffect] = {}
    for name, value in _width_fields(config):
        for x0, x1 in _probe_points(name, value):
            at0 = base if value is not None else _try_shapes(model_class, config, {name: x0})
            at1 = _try_shapes(model_class, config, {name: x1})
            if at0 is None or at1 is None:
                continue
            moved = _moved(at0, at1)
            if moved:
                fields[name] = FieldEffect(name, value, x0, x1, moved)
            break
    switches = {}
    for name, value in config.to_dict().items():
        if value is False and "bias" in name:
            on = _try_shapes(model_class, config, {name: True})
            if on is not None and set(base) < set(on):
                switches[name] = sorted(set(on) - set(base))
    return ConfigMap(type(config).__name__, base, fields, switches)


@dataclass
class Constraints:
    """What a config lets a plan change: groups kept whole (with the reason) and tied."""

    keep: dict[str, str]  # group name -> why it stays whole
    ties: list[dict[str, float]]  # groups set together: name -> field units per channel
    fixed: dict[str, str]  # field -> why it cannot change
    free: list[str]  # fields that can change


def head_sizes(inside, whole) -> dict[Dim, int]:
    """Member dimension -> head size, for attention heads: groups split into blocks (A, B)
    in `inside` (heads split into channels) whose dimensions are whole heads in `whole`
    (convolution groups and group norms have blocks too, but their block size is no head's)."""
    in_whole_heads = {(s.member.param, s.member.dim) for g in whole.groups if g.whole_blocks
                      for s in g.slots.values()}
    out = {}
    for g in inside.groups:
        if g.blocks:
            for slots in g.slots.values():
                dim = (slots.member.param, slots.member.dim)
                if dim in in_whole_heads:
                    out[dim] = g.blocks[1]
    return out


def field_roles(cmap: ConfigMap, heads: dict[Dim, int]) -> dict[str, str]:
    """Field -> why it cannot change ('' when it can): it sets or derives a head size."""
    roles = {}
    for f in cmap.fields.values():
        why = ""
        for dim, (s0, s1) in f.dims.items():
            size = heads.get(dim)
            if size is None:
                continue
            if f.base == size:
                why = f"{f.name} is the head size"
                break
            if f.base is None or s0 != f.base * size or s1 != f.x1 * size:
                why = f"{f.name} sets the head size (heads of {size} in {dim[0]})"
                break
        roles[f.name] = why
    return roles


def computed_with(cmap: ConfigMap, constants: set[float]) -> dict[str, str]:
    """Fields whose value the model computes with, not only shapes: a constant of the graph
    is its square root (Gemma scales embeddings by sqrt(hidden_size)); a smaller config would
    change that number."""
    out = {}
    for f in cmap.fields.values():
        if not f.base or isinstance(f.base, float):
            continue
        # the square root only: small inverses (1/4, 1/sqrt(4)) are the attention scale or
        # GELU's 0.5 as often as anything a field sets
        forms = {"sqrt({})": f.base ** 0.5}
        for form, x in forms.items():
            if any(math.isclose(c, x, rel_tol=1e-6) for c in constants):
                out[f.name] = (f"the model computes with {form.format(f.name)} = {x:.6g} "
                               "(a constant of the graph), which a smaller config would change")
                break
    return out


def graph_constants(gm) -> set[float]:
    """Float scalars of a graph: arguments and 0-d tensors it reads (buffers, constants)."""
    out: set[float] = set()
    for node in gm.graph.nodes:
        for arg in (*node.args, *node.kwargs.values()):
            if isinstance(arg, float) and math.isfinite(arg) and arg != 0:
                out.add(arg)
        if node.op == "get_attr":
            obj = gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, torch.Tensor) and obj.dim() == 0 and obj.is_floating_point():
                out.add(float(obj))
    return out


def constraints(cmap: ConfigMap, groups: list, heads: dict[Dim, int],
                constants: set[float] = frozenset()) -> Constraints:
    """Which of `groups` (GroupInfo of the plan's block mode) a config can describe shrunk.

    `heads`: the head size of each attention dimension (:func:`head_sizes`); `constants`:
    the float constants of the graph (:func:`graph_constants`).
    """
    name = cmap.config_name
    roles = field_roles(cmap, heads)
    fixed = {f: why for f, why in roles.items() if why}
    for f, why in computed_with(cmap, set(constants)).items():
        fixed.setdefault(f, why)
    owner: dict[Dim, str] = {}
    for g in groups:
        for slots in g.slots.values():
            owner[(slots.member.param, slots.member.dim)] = g.name
    keep: dict[str, str] = {}
    for g in groups:
        if g.blocks and not g.whole_blocks and any(
                (x.member.param, x.member.dim) in heads for x in g.slots.values()):
            keep[g.name] = (f"{name} has one head size: channels inside heads cannot shrink "
                            "(--reshape-channel-axis -2 prunes whole heads)")
            continue
        for slots in g.slots.values():
            dim = (slots.member.param, slots.member.dim)
            movers = cmap.by_dim.get(dim, [])
            if not movers:
                keep[g.name] = f"no field of {name} sets dimension {dim[1]} of {dim[0]}"
                break
            free = [f for f in movers if f not in fixed]
            if not free:
                keep[g.name] = f"{name} cannot change it: {fixed[movers[0]]}"
                break
    # a free field setting several groups ties them; one kept group keeps its whole tie
    parent = {g.name: g.name for g in groups}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    by_name = {g.name: g for g in groups}
    # each group's field units per channel removed: groups one field sets must lose counts
    # in that proportion (ConvNeXt's MLP is 4 x hidden_sizes[i]: 4 inner channels per one)
    units: dict[str, float] = {}
    uneven: dict[str, str] = {}  # a group -> why its tie keeps no proportion
    for f in cmap.fields.values():
        if f.name in fixed:
            continue
        steps: dict[str, set[float]] = {}
        for dim, (s0, s1) in f.dims.items():
            if dim in owner:
                g = by_name[owner[dim]]
                steps.setdefault(g.name, set()).add(
                    _slots_per_channel(g, dim) * (f.x1 - f.x0) / (s1 - s0))
        touched = sorted(steps, key=list(parent).index)
        for other in touched[1:]:
            parent[root(other)] = root(touched[0])
        if any(len(v) > 1 for v in steps.values()):
            for g_name in steps:
                uneven[g_name] = (f"{name}'s {f.name} sets the members of {g_name} in "
                                  "different proportions")
            continue
        known = [g for g in touched if g in units]
        scale = units[known[0]] / next(iter(steps[known[0]])) if known else 1.0
        for g_name in touched:
            unit = next(iter(steps[g_name])) * scale
            if g_name in units and not math.isclose(units[g_name], unit, rel_tol=1e-9):
                uneven[g_name] = (f"{name}'s fields set {g_name} in proportions that "
                                  "contradict each other")
            units.setdefault(g_name, unit)
    classes: dict[str, list[str]] = {}
    for g in groups:
        classes.setdefault(root(g.name), []).append(g.name)
    ties = []
    for members in classes.values():
        kept = [m for m in members if m in keep]
        bad = [m for m in members if m in uneven]
        if kept or bad:
            for m in members:
                keep.setdefault(m, uneven[bad[0]] if bad else
                                f"tied by a field of {name} to {kept[0]}, which stays whole")
        elif len(members) > 1:
            ties.append({m: units.get(m, 1.0) for m in members})
    return Constraints(keep, ties, fixed, [f for f in cmap.fields if f not in fixed])


def _slots_per_channel(group, dim: Dim) -> float:
    for slots in group.slots.values():
        if (slots.member.param, slots.member.dim) == dim:
            return len(slots.slot_index) / max(group.channels, 1)
    return 1.0


class Unsolvable(Exception):
    """No config of the class gives the pruned shapes (the message is the one-line reason)."""


def solve_config(model_class, config, shapes: Shapes, fixed: set[str] = frozenset()):
    """A config of the same class whose model has exactly `shapes` (names present in both)."""
    sizes = {(name, d): n for name, shape in shapes.items() for d, n in enumerate(shape)}
    new, wrong = solve_dims(model_class, config, sizes, fixed)
    if new is None:
        raise Unsolvable(_mismatch_line(probe_config(model_class, config), wrong[0], sizes,
                                        shapes))
    return new


def solve_dims(model_class, config, sizes: dict[Dim, int], fixed: set[str] = frozenset()):
    """(config, []) for a config of the same class whose model has these dimension sizes
    (weights present in both), else (None, the dimensions the closest candidate gets wrong).

    Each field's candidates are its value and the values each dimension it moves implies;
    combinations with the fewest changed fields are built first."""
    cmap = probe_config(model_class, config)
    candidates: dict[str, list[int]] = {}
    for f in cmap.fields.values():
        if f.name in fixed:
            continue
        options: list[int] = []
        for dim in f.dims:
            if dim in sizes and sizes[dim] != cmap.shapes[dim[0]][dim[1]]:
                value = f.value_for(dim, sizes[dim])
                if value is not None and value != f.base and value not in options:
                    options.append(value)
        if options:
            candidates[f.name] = options
    best = _wrong(cmap.shapes, sizes)
    if not best:
        return config, []
    names = list(candidates)
    tried = 0
    for changed in range(1, len(names) + 1):
        for subset in itertools.combinations(names, changed):
            for values in itertools.product(*(candidates[n] for n in subset)):
                tried += 1
                if tried > _MAX_SEARCH:
                    return None, best
                try:
                    with quiet_transformers():
                        new = _with(config, dict(zip(subset, values)))
                    built = _build_shapes(model_class, new)
                except Exception:  # noqa: BLE001 - the config refuses these values
                    continue
                wrong = _wrong(built, sizes)
                if not wrong:
                    return new, []
                if len(wrong) < len(best):
                    best = wrong
    return None, best


def _wrong(shapes: Shapes, sizes: dict[Dim, int]) -> list[Dim]:
    return [(p, d) for (p, d), n in sizes.items()
            if p in shapes and d < len(shapes[p]) and shapes[p][d] != n]


def _mismatch_line(cmap: ConfigMap, dim: Dim, sizes: dict[Dim, int], shapes: Shapes) -> str:
    name, d = dim
    movers = sorted(cmap.by_dim.get(dim, []))
    which = (f"no combination of {', '.join(movers)} gives it together with every other "
             "pruned size" if movers else "no field of the config sets it")
    return (f"{cmap.config_name} cannot describe {name} of shape {list(shapes[name])} "
            f"(dimension {d}, {cmap.shapes[name][d]} before pruning: {which})")


# ------------------------------------------------ per-layer configs (per_layer_config)
def per_layer_fields(model_class, config) -> dict[str, dict[int, FieldEffect]]:
    """Width fields that the model's code reads per layer from ``per_layer_config``
    (transformers' heterogeneous configs): field -> layer -> the dimensions it moves there.

    Measured like :func:`probe_config`: the model is built on meta with
    ``per_layer_config={i: {field: other value}}``; a field whose layer-0 override moves
    nothing (the code reads the global value), or that the config refuses per layer, is not
    one. Empty for model types whose code never reads ``per_layer_config``."""
    return _remembered("per_layer", model_class, config, _probe_per_layer)


def _probe_per_layer(model_class, config) -> dict[str, dict[int, FieldEffect]]:
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers < 1 or config.to_dict().get("per_layer_config"):
        return {}
    cmap = probe_config(model_class, config)
    out: dict[str, dict[int, FieldEffect]] = {}
    for f in cmap.fields.values():
        if not isinstance(f.base, int) or "[" in f.name:
            continue
        x1 = f.base // 2 if f.base >= 2 else 2 * f.base
        effects = {}
        for layer in range(layers):
            shapes = _try_shapes(model_class, config, {"per_layer_config": {layer: {f.name: x1}}})
            moved = _moved(cmap.shapes, shapes) if shapes is not None else {}
            if not moved:
                break  # read globally (or refused): not a per-layer field
            effects[layer] = FieldEffect(f.name, f.base, f.base, x1, moved)
        if len(effects) == layers:
            out[f.name] = effects
    return out


def solve_per_layer(model_class, config, shapes: Shapes, fixed: set[str] = frozenset()):
    """A heterogeneous config (``per_layer_config``) of the same class whose model has exactly
    `shapes`, or None: each per-layer field's value at each layer read from the dimensions it
    moves there (all must agree), the global fields solved as usual (:func:`solve_dims`)."""
    layered = {name: effects for name, effects in per_layer_fields(model_class, config).items()
               if name not in fixed}
    if not layered:
        return None
    sizes = {(name, d): n for name, shape in shapes.items() for d, n in enumerate(shape)}
    overrides: dict[int, dict[str, int]] = {}
    for name, effects in layered.items():
        for layer, effect in effects.items():
            values = {effect.value_for(dim, sizes[dim]) for dim in effect.dims if dim in sizes}
            if len(values) != 1 or None in values:
                return None
            value = values.pop()
            if value != effect.base:
                overrides.setdefault(layer, {})[name] = value
    if not overrides:
        return None
    try:
        with quiet_transformers():
            hetero = _with(config, {"per_layer_config": overrides})
    except Exception:  # noqa: BLE001 - the config refuses these per-layer values
        return None
    # the global fields the per-layer ones do not cover (a narrower MLP everywhere)
    rest = {d: n for d, n in sizes.items()
            if not any(d in e.dims for effects in layered.values() for e in effects.values())}
    new, _ = solve_dims(model_class, hetero, rest, set(fixed) | set(layered))
    if new is None:
        return None
    try:
        built = _build_shapes(model_class, new)
    except Exception:  # noqa: BLE001
        return None
    return None if _wrong(built, sizes) else new


def per_layer_reason(model_class, config) -> str:
    """Why a plan whose layers of one kind differ needs --uniform for this config."""
    layered = per_layer_fields(model_class, config)
    if not layered:
        return (f"{model_class.__name__}'s code reads no width from per_layer_config "
                "(transformers' heterogeneous configs)")
    return (f"{model_class.__name__} reads only {', '.join(sorted(layered))} from "
            "per_layer_config, which does not describe the plan")


# ---------------------------------------------------------------- planning (--uniform)
def config_constraints(analysis, whole_blocks: bool) -> Constraints:
    """What the model's config lets a plan of this block mode change (engine/io/hf_config)."""
    hf = analysis.captured.hf
    cmap = probe_config(model_class(hf), hf.config)
    limits = constraints(cmap, analysis.prunable_groups(whole_blocks),
                         attention_heads(analysis), graph_constants(analysis.gm))
    if whole_blocks:
        return limits
    rotary = rotary_heads(analysis)
    if rotary is not None:
        return with_rotary(limits, rotary)
    # rotary pairs whose frequencies the config cannot give (head size derived from
    # hidden_size, partial or scaled rope): whole, whatever field could read their shapes
    name = type(hf.config).__name__
    prunable = {g.name for g in analysis.prunable_groups(whole_blocks)}
    for group in (g for g in rotary_pair_groups(analysis) if g in prunable):
        limits.keep.setdefault(group, (
            f"{name} derives the rotary frequencies from its head size, and cannot describe "
            "them pruned here (a head_dim field and default rope over whole heads are needed)"))
    limits.ties[:] = [t for t in limits.ties if not set(t) & set(limits.keep)]
    return limits


def rotary_free_fields(analysis, whole_blocks: bool) -> set[str]:
    """Head-size fields a plan of this block mode may change: head_dim where rotary pairs
    are pruned inside heads (engine.io.hf_config.rotary_heads)."""
    return set() if whole_blocks or rotary_heads(analysis) is None else {"head_dim"}


def attention_heads(analysis) -> dict[tuple[str, int], int]:
    """Head size of each attention weight dimension of the analysed model."""
    return head_sizes(analysis.structure(False), analysis.structure(True))


def groups_config_keeps(analysis, whole_blocks: bool) -> dict[str, str]:
    """Group name -> why the model's config cannot describe pruning it (for --uniform)."""
    found = _FOUND_BY_SOLVING.get(analysis, {}).get(whole_blocks, {})
    return {**config_constraints(analysis, whole_blocks).keep, **found}


# groups a uniform plan had to keep after solving its config failed, per analysis and mode
_FOUND_BY_SOLVING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def planned_sizes(analysis, plan) -> dict[tuple[str, int], int]:
    """The size each member dimension will have once `plan` is applied (unpruned ones keep
    theirs), and the other dimensions of the same weights that no pruned group reads (they
    keep theirs too: a config that moves them does not describe the plan)."""
    hf = analysis.captured.hf
    shapes = probe_config(model_class(hf), hf.config).shapes
    structure = analysis.structure(plan.options.prunes_whole_blocks)
    pruned = {gp.name: gp.pruned for gp in plan.groups}
    reading = {f"{layer}.weight" for gp in plan.groups if len(gp.pruned)
               for layer in structure.group(gp.name).consumers}
    sizes = {}
    for g in structure.groups:
        for slots in g.slots.values():
            param, dim = slots.member.param, slots.member.dim
            if param not in shapes or dim >= len(shapes[param]):
                continue
            gone = pruned.get(g.name)
            removed = 0 if gone is None else int(np.isin(slots.channel, gone).sum())
            sizes[(param, dim)] = shapes[param][dim] - removed
            if param not in reading:
                for d, n in enumerate(shapes[param]):
                    sizes.setdefault((param, d), n)
    for dim, (size, _) in block_dims(structure, shapes, plan).items():
        sizes.setdefault(dim, size)
    return sizes


def block_dims(structure, shapes: Shapes, plan) -> dict[Dim, tuple[int, str]]:
    """Dimensions of a pruned group's readers that are one block wide (a grouped
    convolution's input channels per group: RegNet's ``groups_width``): dimension -> (its
    size after `plan`, the group). They are no member of any group, so only this tells that
    pruning inside the blocks narrows them."""
    members = {(x.member.param, x.member.dim) for g in structure.groups
               for x in g.slots.values()}
    out = {}
    for gp in plan.groups:
        info = structure.group(gp.name)
        if not len(gp.pruned) or not info.blocks or info.whole_blocks:
            continue
        count, width = info.blocks
        if len(gp.pruned) % count:
            continue
        for layer in info.consumers:
            param = f"{layer}.weight"
            for d, n in enumerate(shapes.get(param, ())):
                if d and n == width and (param, d) not in members:
                    out[(param, d)] = (width - len(gp.pruned) // count, gp.name)
    return out


def keep_to_describe(analysis, plan) -> dict[str, str]:
    """Groups `plan` must keep whole so that a config can describe it (empty: it can): those
    owning the dimensions that the closest config solved from the planned sizes gets wrong,
    or, for a dimension no pruned group owns, the pruned groups set by the fields that move
    it. The reasons are remembered for the report (:func:`groups_config_keeps`)."""
    hf = analysis.captured.hf
    cls = model_class(hf)
    cmap = probe_config(cls, hf.config)
    roles = field_roles(cmap, attention_heads(analysis))
    sizes = planned_sizes(analysis, plan)
    fixed = {f for f, why in roles.items() if why} - rotary_free_fields(
        analysis, plan.options.prunes_whole_blocks)
    new, wrong = solve_dims(cls, hf.config, sizes, fixed)
    if new is not None:
        return {}
    whole = plan.options.prunes_whole_blocks
    structure = analysis.structure(whole)
    owner = {(x.member.param, x.member.dim): gp.name for gp in plan.groups if len(gp.pruned)
             for x in structure.group(gp.name).slots.values()}
    shapes = cmap.shapes
    for dim, (_, group) in block_dims(structure, shapes, plan).items():
        owner.setdefault(dim, group)
    name = type(hf.config).__name__
    keep = {}
    for d in wrong:
        if d in owner:
            keep[owner[d]] = (f"no {name} gives {d[0]} dimension {d[1]} the size {sizes[d]} "
                              "together with the rest of the plan")
            continue
        for field_name in cmap.by_dim.get(d, []):
            for moved in cmap.fields[field_name].dims:
                if moved in owner:
                    keep.setdefault(owner[moved], (
                        f"{name}'s {field_name} also sets {d[0]} dimension {d[1]}, which "
                        "the plan keeps"))
    _FOUND_BY_SOLVING.setdefault(analysis, {}).setdefault(whole, {}).update(keep)
    return keep


def count_adjuster(analysis, options):
    """For --uniform where the config requires hidden_size to be a multiple of
    num_attention_heads while the head size is its own field (LlamaConfig and kin): the hidden
    stream keeps such a multiple (the heads left after pruning whole heads; the step size too
    when the step rule is on)."""
    hf = analysis.captured.hf
    config = hf.config
    if not (isinstance(getattr(config, "head_dim", None), int)
            and isinstance(getattr(config, "num_attention_heads", None), int)
            and isinstance(getattr(config, "hidden_size", None), int)):
        return None
    groups = analysis.prunable_groups(options.prunes_whole_blocks)
    hidden = next((g.name for g in groups if any(_is_embedding(hf, x) for x in g.layers)), None)
    heads = [g.name for g in groups
             if g.whole_blocks and any(x.endswith("q_proj") for x in g.layers)]
    if hidden is None:
        return None
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
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


_EMBEDDING = re.compile(r"(word_embeddings|embed_tokens|wte|wpe|patch_embeddings\.projection)$")


def _is_embedding(hf: HFSource, layer: str) -> bool:
    """An embedding layer, or the output layer tied to one (a tied pair may be captured under
    the output layer's name only)."""
    if _EMBEDDING.search(layer):
        return True
    tied = getattr(model_class(hf), "_tied_weights_keys", None)
    return (isinstance(tied, dict) and getattr(hf.config, "tie_word_embeddings", False)
            and f"{layer}.weight" in tied and _EMBEDDING.search(tied[f"{layer}.weight"]
                                                                .removesuffix(".weight")))


# ------------------------------------------------- rotary heads pruned inside (issue 17)
# Rotary attention turns channel j and j + d/2 of every head by the frequency
# theta^(-2j/d). The analysis prunes such pairs (one group: every layer's queries and keys,
# through the one frequency table). A config derives the frequencies from head_dim and the
# rope parameters, so it describes a kept set j = s..s+k-1 only: head_dim' = 2k,
# rope_theta' = theta^(2k/d), and for s > 0 a linear scaling factor theta^(2s/d). head_dim
# also sets the value heads: each value head then keeps 2k channels.


@dataclass
class RotaryHeads:
    """A model whose rotary query/key pairs a config can describe pruned."""

    group: str  # the pairs: every layer's query and key projections
    values: list[str]  # the value groups (heads of head_dim channels) head_dim also sets
    head_dim: int
    theta: float
    kv_heads: int
    frequency_channel: np.ndarray  # the group channel of each frequency index j


def rope_parameters(config) -> dict[str, Any]:
    """The config's rope settings (transformers 5 ``rope_parameters``, or the older
    ``rope_theta`` / ``rope_scaling`` / ``partial_rotary_factor`` fields)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return dict(params)
    out: dict[str, Any] = {"rope_theta": getattr(config, "rope_theta", None),
                           "rope_type": "default"}
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        out.update(scaling)
        out["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    factor = getattr(config, "partial_rotary_factor", None)
    if factor is not None:
        out["partial_rotary_factor"] = factor
    return out


def rotary_heads(analysis) -> RotaryHeads | None:
    """The rotary pairs and value heads of a transformers model whose config can describe
    them pruned (head_dim a field, default rope over the whole head), else None."""
    hf = analysis.captured.hf
    if hf is None:
        return None
    if analysis not in _ROTARY:
        _ROTARY[analysis] = _find_rotary_heads(analysis, hf)
    return _ROTARY[analysis]


_ROTARY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _find_rotary_heads(analysis, hf: HFSource) -> RotaryHeads | None:
    config = hf.config
    head_dim = config.to_dict().get("head_dim")
    rope = rope_parameters(config)
    theta = rope.get("rope_theta")
    if not isinstance(head_dim, int) or head_dim < 4 or not isinstance(theta, (int, float)):
        return None
    if rope.get("rope_type", "default") != "default" or \
            rope.get("partial_rotary_factor", 1.0) != 1.0:
        return None
    cmap = probe_config(model_class(hf), config)
    moved = cmap.fields.get("head_dim")
    if moved is None:
        return None
    structure = analysis.structure(False)
    roots = structure.state.uf.roots()
    tables = [ids for ids in frequency_tables(analysis).values() if len(ids) == head_dim // 2]
    if len(tables) != 1:
        return None
    table_roots = roots[tables[0]]
    group = next((g for g in structure.groups if np.isin(table_roots, g.roots).all()), None)
    if group is None or group.channels != head_dim // 2 or not group.prunable.all() \
            or not group.exact or group.blocks is not None:
        return None
    if not _member_dims(group) <= set(moved.dims):
        return None
    # value heads: blocks of head_dim (one key/value head: a plain group of head_dim)
    values = [g for g in structure.groups if g is not group and _member_dims(g)
              and _member_dims(g) <= set(moved.dims)
              and (g.blocks[1] if g.blocks is not None else g.channels) == head_dim]
    members = set().union(_member_dims(group), *(_member_dims(g) for g in values))
    readers = {c for g in [group, *values] for c in [*g.consumers, *g.layers]}
    if any(d not in members and layer_of(d[0]) not in readers for d in moved.dims):
        return None  # head_dim sets a weight these groups do not prune (a q/k norm)
    position = {int(r): k for k, r in enumerate(group.roots)}
    channel = np.array([position[int(r)] for r in table_roots], dtype=np.int64)
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return RotaryHeads(group.name, [g.name for g in values], head_dim, float(theta), int(kv),
                       channel)


def frequency_tables(analysis) -> dict[str, np.ndarray]:
    """Rotary frequency buffers whose entries the analysis (inside heads) gave channel
    slots (engine.graph.frequencies.find_frequency_tables): name -> slot ids."""
    structure = analysis.structure(False)
    tables = find_frequency_tables(analysis.gm)
    return {name: ids for (name, dim), ids in structure.state.slots.items()
            if name in tables and dim == 0}


def rotary_pair_groups(analysis) -> list[str]:
    """Groups (inside heads) holding rotary frequency pairs."""
    structure = analysis.structure(False)
    roots = structure.state.uf.roots()
    table_roots = [roots[ids] for ids in frequency_tables(analysis).values()]
    return [g.name for g in structure.groups
            if any(np.isin(r, g.roots).any() for r in table_roots)]


def _member_dims(group) -> set[Dim]:
    return {(s.member.param, s.member.dim) for s in group.slots.values()}


def layer_of(param: str) -> str:
    return param.rsplit(".", 1)[0]


def with_rotary(limits: Constraints, rotary: RotaryHeads) -> Constraints:
    """`limits` with the rotary pairs and value heads free to shrink together: head_dim can
    change, and they are tied (a pair is 2 head_dim units, a value channel 1/kv_heads)."""
    ours = {rotary.group, *rotary.values}
    keep = {g: why for g, why in limits.keep.items()
            if g not in ours and not any(why.endswith(f"to {o}, which stays whole")
                                         for o in ours)}
    ties = [t for t in limits.ties if not set(t) & ours]
    ties.append({rotary.group: 2.0, **dict.fromkeys(rotary.values, 1.0 / rotary.kv_heads)})
    fixed = {f: why for f, why in limits.fixed.items() if f != "head_dim"}
    free = [*limits.free, *(["head_dim"] if "head_dim" not in limits.free else [])]
    return Constraints(keep, ties, fixed, free)


def rotary_config(config, rotary: RotaryHeads, kept_channels) -> Any:
    """`config` (head_dim already solved) with the rope parameters that give the kept
    frequencies; NotDescribable when they are not one contiguous run."""
    channel_to_j = {int(c): j for j, c in enumerate(rotary.frequency_channel)}
    kept = sorted(channel_to_j[int(c)] for c in kept_channels)
    if not kept:
        raise NotDescribable(f"group {rotary.group} keeps no rotary frequency")
    start, k = kept[0], len(kept)
    if kept != list(range(start, start + k)):
        raise NotDescribable(
            f"group {rotary.group} keeps rotary frequencies {kept}, and "
            f"{type(config).__name__} describes only a contiguous run (--uniform picks one)")
    d = rotary.head_dim
    rope = rope_parameters(config)
    rope["rope_theta"] = rotary.theta ** (2 * k / d)
    if start:
        rope["rope_type"] = "linear"
        rope["factor"] = rotary.theta ** (2 * start / d)
    values = config.to_dict()
    if isinstance(getattr(config, "rope_parameters", None), dict):
        values["rope_parameters"] = rope
    else:
        values["rope_theta"] = rope["rope_theta"]
        if start:
            values["rope_scaling"] = {"rope_type": "linear", "factor": rope["factor"]}
    return type(config).from_dict(values)


def query_scale(config, rotary: RotaryHeads, new_head_dim: int) -> float:
    """The factor the query projections take so that a head_dim-derived attention scale
    (1/sqrt(head_dim')) gives the original 1/sqrt(head_dim); 1 where the config fixes the
    scale by its own field (Gemma 2's query_pre_attn_scalar)."""
    if getattr(config, "query_pre_attn_scalar", None) is not None:
        return 1.0
    return math.sqrt(new_head_dim / rotary.head_dim)
