"""Running a captured graph as the model is called: positional and keyword inputs.

A torch.export graph module is called like the original model (`gm(x, scale=s)`), but an
`fx.Interpreter` over it takes only the flat placeholder values. Every interpreter the engine
runs (mask mode, recorders, scoring) goes through :func:`run_graph`, so a keyword input
(`forward(self, x, *, scale)`) reaches its placeholder in every one of them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch.fx as fx
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
