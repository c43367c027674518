"""The layers recovery refits: linear and 1-D/2-D convolutions as they appear in ATen graphs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from engine.graph.weighted import weighted_op
from engine.quality.recovery.lockstep import add_parameter, owner_path, param_of

aten = torch.ops.aten
_CONV_DEFAULTS = {3: [1], 4: [0], 5: [1], 6: 1}  # stride, padding, dilation, groups


@dataclass
class Layer:
    node: fx.Node
    kind: str  # "linear" | "conv"
    spatial: int  # 0 for linear, 1 or 2 for convolutions

    @property
    def channel_dim(self) -> int:
        """Channel dimension of the layer's input and output."""
        return -1 if self.kind == "linear" else 1

    @property
    def weight_node(self) -> fx.Node:
        return self.node.args[1]

    def bias_node(self) -> fx.Node | None:
        bias = self.node.args[2] if len(self.node.args) > 2 else self.node.kwargs.get("bias")
        return bias if isinstance(bias, fx.Node) else None

    def conv_args(self, args: tuple) -> tuple[list, list, list, int]:
        """stride, padding, dilation, groups of a convolution call."""
        values = [args[i] if len(args) > i else _CONV_DEFAULTS[i] for i in (3, 4, 5, 6)]
        stride, padding, dilation, groups = values
        n = self.spatial
        return _tuple(stride, n), _tuple(padding, n), _tuple(dilation, n), int(groups)

    def bias_tensor(self, gm: fx.GraphModule, out_channels: int) -> torch.Tensor:
        """The layer's bias, or a new zero one (added to the module and the graph)."""
        node = self.bias_node()
        if node is not None:
            return param_of(gm, node)
        weight = param_of(gm, self.weight_node)
        new = add_parameter(gm, self.node, owner_path(self.weight_node), "bias",
                            torch.zeros(out_channels, dtype=weight.dtype,
                                        device=weight.device))
        args = list(self.node.args)
        while len(args) < 3:
            args.append(None)
        args[2] = new
        self.node.args = tuple(args)
        return param_of(gm, new)


def as_layer(node: fx.Node) -> Layer | None:
    if node.op != "call_function" or not isinstance(node.args[1] if len(node.args) > 1
                                                     else None, fx.Node):
        return None
    if node.args[1].op != "get_attr":
        return None
    op = weighted_op(node)
    # refitted here: linear and 1-D/2-D convolutions, in their default overload (numeric
    # padding), not transposed
    if op is None or node.target._overloadname != "default" or op.transposed is not False:
        return None
    if op.kind == "linear":
        return Layer(node, "linear", 0)
    if op.kind == "conv" and op.spatial in (1, 2):
        return Layer(node, "conv", op.spatial)
    return None


def columns(layer: Layer, x: torch.Tensor, args: tuple, weight_shape) -> torch.Tensor:
    """The layer's input as rows of what each output element reads: (rows, in * kernel)
    for a linear layer or one convolution group (im2col)."""
    if layer.kind == "linear":
        return x.reshape(-1, x.shape[-1])
    stride, padding, dilation, _ = layer.conv_args(args)
    kernel = tuple(weight_shape[2:])
    if layer.spatial == 1:
        x = x.unsqueeze(2)
        kernel, stride, padding, dilation = ((1, *kernel), (1, *stride), (0, *padding),
                                             (1, *dilation))
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def out_rows(layer: Layer, y: torch.Tensor) -> torch.Tensor:
    """The layer's output as (rows, out channels), rows in the order `columns` gives."""
    if layer.kind == "linear":
        return y.reshape(-1, y.shape[-1])
    return y.reshape(y.shape[0], y.shape[1], -1).transpose(1, 2).reshape(-1, y.shape[1])


def _tuple(value, n: int) -> tuple:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    return value * n if len(value) == 1 else value
