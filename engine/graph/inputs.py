"""Running a captured graph as the model is called: positional and keyword inputs.

A torch.export graph module is called like the original model (`gm(x, scale=s)`), but an
`fx.Interpreter` over it takes only the flat placeholder values. Every interpreter the engine
runs (mask mode, recorders, scoring) goes through :func:`run_graph`, so a keyword input
(`forward(self, x, *, scale)`) reaches its placeholder in every one of them. A program's user
inputs (names, shapes, dynamic dimensions) are read here too (:func:`user_inputs`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree


def flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: Mapping[str, Any] | None) -> list:
    """The graph's inputs, all positional, for the call `gm(*args, **kwargs)`.

    Keyword inputs are bound to the module's signature, so they land in the order the graph
    was exported with whatever order the caller gives them in.
    """
    if not kwargs:
        return list(args)
    try:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    except TypeError:  # no usable signature: keep the caller's order
        return list(pytree.arg_tree_leaves(*args, **kwargs))
    # the interpreter flattens nested values (a tuple or dict input) itself
    return list(bound.arguments.values())


def run_graph(interpreter: fx.Interpreter, args: tuple,
              kwargs: Mapping[str, Any] | None = None) -> Any:
    """`interpreter.run` called as its module is: `args` positional, `kwargs` by name."""
    return interpreter.run(*flat_inputs(interpreter.module, args, kwargs))


def graph_runner(interpreter: fx.Interpreter) -> Callable[..., Any]:
    """The interpreter as a callable with the module's own signature (mask mode)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        return run_graph(interpreter, args, kwargs)

    return run


def user_inputs(program: torch.export.ExportedProgram) -> list[tuple[str, Any]]:
    """(name, example value) of each input the caller gives, in order; the value is the
    placeholder's fake tensor (symbolic sizes where a dimension is dynamic), or None."""
    values = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    return [(spec.arg.name, values.get(spec.arg.name))
            for spec in program.graph_signature.input_specs
            if spec.kind == InputKind.USER_INPUT]


def user_input_shapes(program: torch.export.ExportedProgram) -> list[tuple[int | None, ...]]:
    """Each tensor user input's shape, None where the dimension is dynamic."""
    return [tuple(s if isinstance(s, int) else None for s in val.shape)
            for _name, val in user_inputs(program) if isinstance(val, torch.Tensor)]


def sample_chunks(xs: Sequence[torch.Tensor], size: int, *, fixed: bool = False,
                  fill: bool = False) -> Iterator[tuple[list[torch.Tensor], int]]:
    """Consecutive chunks of `size` samples (dim 0 of every tensor in `xs`), as
    (chunk, how many of its samples are real).

    `fixed`: the model was captured with a batch of exactly `size`, so a short last chunk
    cannot run as it is: `fill=True` fills it up with copies of its last sample (the caller
    drops their outputs), `fill=False` leaves it out. Every fixed-batch loop of the engine
    (calibration, scoring, evaluation, recovery) cuts its samples here.
    """
    total = int(xs[0].shape[0])
    for start in range(0, total, size):
        chunk = [x[start:start + size] for x in xs]
        real = int(chunk[0].shape[0])
        if fixed and real < size:
            if not fill:
                return
            chunk = [torch.cat([c, c[-1:].expand(size - real, *c.shape[1:])]) for c in chunk]
        yield chunk, real
