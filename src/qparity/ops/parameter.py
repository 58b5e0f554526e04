"""parameter: a learned tensor the model combines with activations (LayerNorm's weight and bias), as a quantized
tensor on a grid of its own, an operand of mul or add exactly as the runtimes take a constant input tensor.

The prepared model quantizes the user's parameter by the target's QUANTIZE rule with a straight-through gradient
(it learns); convert writes its codes into the node (`codes`), which the IntegerModel and the exporters read.
"""
from __future__ import annotations

import torch

from ..graph import Node


def stored_codes(node: Node) -> torch.Tensor:
    """The codes convert wrote, in the tensor's broadcasting shape."""
    return torch.tensor(node.attrs["codes"], dtype=torch.int64).reshape(tuple(node.attrs["shape"]))


def real_value(ctx, node: Node) -> torch.Tensor:
    """The user's parameter (prepared model), shaped to broadcast against the activations."""
    return ctx.mode.model.tensors[node.name].weight.reshape(tuple(node.attrs["shape"]))


def run(ctx, node):
    if not ctx.fake:
        return ctx.new_grid(node, [], None, lambda inputs, out, lo, hi: stored_codes(node))
    value = real_value(ctx, node)
    return ctx.new_grid(node, [], lambda: value, lambda inputs, out, lo, hi: ctx.target.quantize(value.detach(), out))
