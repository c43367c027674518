"""The weighted-layer table: the ATen ops that apply a parameter as a layer's weight.

Declared once here; the tracer (derived weights), the data-aware criteria, recovery's layer
refits and the FLOPs count read it, each taking the entries it can handle (`kind`,
`transposed`, `spatial`). The op rules of engine/graph/ops.py carry channels through the
same ops (a test checks each entry has a rule). A new weighted op is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx


@dataclass(frozen=True)
class WeightedOp:
    name: str  # the ATen op name (without namespace and overload)
    kind: str  # "linear" (x @ W.T), "addmm" (bias + x @ W) or "conv"
    input_index: int  # position of the data input among the op's arguments
    weight_index: int  # position of the weight
    spatial: int | None  # convolution dimensions (None: read from the weight); 0 for matmuls
    transposed: bool | None  # conv_transpose (None: `convolution` says it in argument 6)

    def is_transposed(self, node: fx.Node) -> bool:
        if self.transposed is not None:
            return self.transposed
        return len(node.args) > 6 and bool(node.args[6])


def _conv(name: str, spatial: int | None, transposed: bool | None) -> WeightedOp:
    return WeightedOp(name, "conv", 0, 1, spatial, transposed)


WEIGHTED_OPS: dict[str, WeightedOp] = {op.name: op for op in (
    WeightedOp("linear", "linear", 0, 1, 0, False),
    WeightedOp("addmm", "addmm", 1, 2, 0, False),
    _conv("conv1d", 1, False),
    _conv("conv2d", 2, False),
    _conv("conv3d", 3, False),
    _conv("conv_transpose1d", 1, True),
    _conv("conv_transpose2d", 2, True),
    _conv("conv_transpose3d", 3, True),
    _conv("convolution", None, None),
)}


def weighted_op(node: fx.Node) -> WeightedOp | None:
    """The table's entry for a node's op, or None (not a call of a weighted ATen op)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    return WEIGHTED_OPS.get(node.target._opname)
