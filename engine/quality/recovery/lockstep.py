"""Run the original and the pruned graph side by side, node by node, on calibration data.

`rewrite` copies the original graph, so both graphs have the same nodes under the same names;
only shape constants and parameter sizes differ. Walking them together gives, at every node,
the original value and the pruned value, which is what every data-light recovery method
needs: a method may change the pruned node's parameters before the node runs, so the layers
after it see the already-corrected activations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from engine.graph.dependency import Structure
from engine.graph.labels import surviving

# (node of the pruned graph, the step) -> None; may change the pruned module's tensors
Hook = Callable[[fx.Node, "Step"], None]


class Step:
    """Values available when a node is about to run in the pruned graph. Read lazily: most
    nodes are of no interest to any method, and where the data ran in chunks each read
    joins the chunks' values."""

    def __init__(self, original_args: Callable[[], tuple], original_out: Callable[[], Any],
                 fetch: Callable[[], tuple]) -> None:
        self._original_args = original_args
        self._original_out = original_out
        self.fetch = fetch  # the node's arguments in the pruned graph, as they are now

    @functools.cached_property
    def original_args(self) -> tuple:
        """The node's arguments in the original graph (tensors evaluated)."""
        return self._original_args()

    @functools.cached_property
    def original_out(self) -> Any:
        """What the node returned in the original graph."""
        return self._original_out()

    @property
    def pruned_args(self) -> tuple:
        """Fetched on each use: an earlier method may have given the node a new bias."""
        return self.fetch()


class Layout:
    """Where the channels of each original activation went: kept or removed."""

    def __init__(self, structure: Structure, removed: np.ndarray) -> None:
        self.labels = structure.state.labels
        self.roots = structure.state.uf.roots()
        self.removed = removed

    def kept(self, node_name: str) -> dict[int, np.ndarray]:
        """Per labelled dimension of a node's output: True where the channel survives."""
        ids = self.labels.get(node_name)
        if not isinstance(ids, np.ndarray):
            return {}
        out = {}
        for dim in range(ids.ndim):
            if ids.shape[dim] <= 1:
                continue
            index = [0] * ids.ndim
            index[dim] = slice(None)
            along = ids[tuple(index)]
            out[dim] = surviving(along, self.roots, self.removed)
        return out

    def restrict(self, node_name: str, value: Any, like: Any = None) -> torch.Tensor | None:
        """The original activation cut down to the channels the pruned graph keeps (None when
        the channels cannot be matched one dimension at a time)."""
        if not isinstance(value, torch.Tensor):
            return None
        for dim, keep in self.kept(node_name).items():
            if value.shape[dim] != len(keep):
                return None
            if not keep.all():
                value = value.index_select(dim, torch.as_tensor(np.flatnonzero(keep),
                                                                 device=value.device))
        if isinstance(like, torch.Tensor) and value.shape != like.shape:
            return None
        return value

    def removed_along(self, node_name: str, dim: int) -> np.ndarray | None:
        """Boolean over the original channels of `dim`: True where removed (None: unlabelled)."""
        keep = self.kept(node_name).get(dim % max(self._ndim(node_name), 1))
        return None if keep is None else ~keep

    def _ndim(self, node_name: str) -> int:
        ids = self.labels.get(node_name)
        return ids.ndim if isinstance(ids, np.ndarray) else 0


def run_lockstep(original: fx.GraphModule, pruned: fx.GraphModule, inputs: tuple,
                 hook: Hook) -> Any:
    """Run both graphs on `inputs` (flat tensors), calling `hook` before each pruned node."""
    return run_lockstep_chunks(original, pruned, [inputs], hook)[0]


def run_lockstep_chunks(original: fx.GraphModule, pruned: fx.GraphModule,
                        chunks: Sequence[tuple], hook: Hook) -> list:
    """`run_lockstep` on several input chunks at once, node by node: every chunk reaches a
    node before the hook is called, and the hook sees each activation with the chunks
    joined along dim 0, as if the whole set had run in one batch. A graph captured with a
    fixed batch size runs only that many samples at a time; this lets the methods still see
    the whole calibration set. Returns each chunk's output."""
    o_by_name = {n.name: n for n in original.graph.nodes}
    p_nodes = list(pruned.graph.nodes)
    mirrored = [o_by_name[n.name].name for n in p_nodes if n.name in o_by_name]
    if mirrored != list(o_by_name):
        raise RuntimeError("the pruned graph does not mirror the original graph")
    varying = _input_dependent(original)
    o_runs = [_interpreter(original, inputs) for inputs in chunks]
    p_runs = [_interpreter(pruned, inputs) for inputs in chunks]
    results: list = [None] * len(chunks)
    with torch.no_grad():
        for p_node in p_nodes:
            o_node = o_by_name.get(p_node.name)
            if o_node is None:  # a parameter an earlier method added (a new bias)
                for p_run in p_runs:
                    p_run.env[p_node] = p_run.run_node(p_node)
                continue
            for o_run in o_runs:
                o_run.env[o_node] = o_run.run_node(o_node)
            if p_node.op == "call_function":
                hook(p_node, _step(o_node, o_runs, p_node, p_runs, varying))
                for p_run in p_runs:
                    _fetcher(p_run, p_node)()
            for k, p_run in enumerate(p_runs):
                p_run.env[p_node] = p_run.run_node(p_node)
                if p_node.op == "output":
                    results[k] = p_run.env[p_node]
            for runs, node in ((o_runs, o_node), (p_runs, p_node)):
                for run in runs:
                    for dead in run.user_to_last_uses.get(node, []):
                        run.env.pop(dead, None)
    return results


def _interpreter(gm: fx.GraphModule, inputs: tuple) -> fx.Interpreter:
    run = fx.Interpreter(gm)
    run.env = {}
    run.args_iter = iter(inputs)
    return run


def _input_dependent(gm: fx.GraphModule) -> set[str]:
    """Names of the nodes whose value depends on the inputs (the ones that differ between
    chunks); the rest (parameters, constants, shapes) are the same in every chunk."""
    found: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a.name in found for a in node.all_input_nodes):
            found.add(node.name)
    return found


def _step(o_node: fx.Node, o_runs: list, p_node: fx.Node, p_runs: list,
          varying: set[str]) -> Step:
    def original_args() -> tuple:
        return _join(o_node.args, [r.fetch_args_kwargs_from_env(o_node)[0] for r in o_runs],
                     varying)

    def original_out() -> Any:
        return _join(o_node, [r.env[o_node] for r in o_runs], varying)

    cache: dict = {}

    def pruned_args() -> tuple:
        # joined once per argument list: a method that adds a bias replaces node.args
        if cache.get("args") is not p_node.args:
            values = [_fetcher(r, p_node)() for r in p_runs]
            cache["args"], cache["joined"] = p_node.args, _join(p_node.args, values, varying)
        return cache["joined"]

    return Step(original_args, original_out, pruned_args if len(p_runs) > 1 else
                _fetcher(p_runs[0], p_node))


def _join(template: Any, values: list, varying: set[str]) -> Any:
    """One value from each chunk's: input-dependent tensors joined along dim 0, anything
    else taken from the first chunk (the same in all)."""
    if len(values) == 1:
        return values[0]
    if isinstance(template, fx.Node):
        first = values[0]
        if template.name not in varying or not isinstance(first, torch.Tensor):
            return first
        return torch.cat(values) if first.ndim else torch.stack(values)
    if isinstance(template, (list, tuple)):
        joined = [_join(t, [v[i] for v in values], varying) for i, t in enumerate(template)]
        return tuple(joined) if isinstance(template, tuple) else joined
    return values[0]


def _fetcher(run: fx.Interpreter, node: fx.Node) -> Callable[[], tuple]:
    def fetch() -> tuple:
        for arg in node.all_input_nodes:  # parameter nodes a hook added
            if arg not in run.env:
                run.env[arg] = run.run_node(arg)
        return run.fetch_args_kwargs_from_env(node)[0]

    return fetch


def param_of(gm: fx.GraphModule, arg: Any) -> torch.Tensor | None:
    """The parameter or buffer a get_attr node reads."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        owner, _, attr = arg.target.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        return getattr(module, attr)
    return None


def set_tensor(gm: fx.GraphModule, arg: fx.Node, data: torch.Tensor) -> None:
    """Overwrite a parameter's values in place (same shape)."""
    tensor = param_of(gm, arg)
    with torch.no_grad():
        tensor.copy_(data.to(tensor.dtype))


def add_parameter(gm: fx.GraphModule, before: fx.Node, owner_path: str, attr: str,
                  data: torch.Tensor) -> fx.Node:
    """Register a new parameter (a bias a layer did not have) and a get_attr node reading
    it, placed just before `before`."""
    owner = gm.get_submodule(owner_path) if owner_path else gm
    name = attr
    k = 1
    while hasattr(owner, name):
        name = f"{attr}_{k}"
        k += 1
    owner.register_parameter(name, torch.nn.Parameter(data.detach().clone()))
    target = f"{owner_path}.{name}" if owner_path else name
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(target)
    return node


def owner_path(weight: fx.Node) -> str:
    """The module path holding a layer's weight (`block1.conv2` for block1.conv2.weight)."""
    return str(weight.target).rpartition(".")[0]


@dataclass
class Context:
    """What a data-light method works on: both graphs and where the channels went."""

    original: fx.GraphModule
    pruned: fx.GraphModule
    layout: Layout
    # (samples, tokens) True at real tokens of a text model's calibration set (None: every
    # position counts): padding is left out of the statistics the methods fit
    token_mask: torch.Tensor | None = None

    def real_rows(self, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(samples, tokens, ...) activations cut to the real tokens' rows (tokens, ...);
        values of any other shape are returned unchanged."""
        mask = self.token_mask
        if mask is None or not all(v.ndim >= 3 and tuple(v.shape[:2]) == tuple(mask.shape)
                                   for v in values):
            return values
        return tuple(v[mask] for v in values)
    # where the result must stay loadable as its own architecture (a transformers folder):
    # parameter name -> why it cannot be added (None: it can)
    may_add: Callable[[str], str | None] | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why a change was skipped

    def refuses(self, layer: str, param: str) -> str | None:
        """Why `layer` may not get the new parameter `param` (recorded), or None."""
        why = self.may_add(param) if self.may_add is not None else None
        if why:
            self.skipped[layer] = why
        return why

    def run(self, inputs: tuple, hook: Hook) -> Any:
        out = run_lockstep(self.original, self.pruned, inputs, hook)
        self.pruned.recompile()
        return out

    def run_chunks(self, chunks: Sequence[tuple], hook: Hook) -> list:
        """`run` on input chunks that the methods see joined (a fixed-batch graph)."""
        out = run_lockstep_chunks(self.original, self.pruned, chunks, hook)
        self.pruned.recompile()
        return out


def unchanged(pruned: torch.Tensor, original: torch.Tensor | None) -> bool:
    """The pruned activation equals the original's surviving channels (nothing to correct)."""
    if original is None or original.shape != pruned.shape:
        return False
    scale = float(original.abs().max()) if original.numel() else 0.0
    return bool((pruned - original).abs().max() <= 1e-6 * max(scale, 1e-12)) \
        if pruned.numel() else True
