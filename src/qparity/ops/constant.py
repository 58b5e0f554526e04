"""constant: a number the model combines with a tensor (`x * 0.5`, `x + 1`, `1 - x`, `x / 6`), as a quantized
tensor of shape [1, ..., 1] on a grid of its own (qparams.constant_qparams); add, sub and mul then take it as
their second operand, exactly as the runtimes take a constant input tensor."""
from __future__ import annotations

import torch

from ..graph import Node
from ..qparams import QParams


def real_value(node: Node) -> torch.Tensor:
    return torch.full(tuple(node.attrs["shape"]), float(node.attrs["value"]), dtype=torch.float32)


def codes(target, node: Node, qp: QParams) -> torch.Tensor:
    """The constant's codes, by the target's QUANTIZE rule: what the program and the exported files hold."""
    return target.quantize(real_value(node), qp)


def run(ctx, node):
    value = real_value(node)
    return ctx.new_grid(node, [], lambda: value, lambda inputs, out, lo, hi: codes(ctx.target, node, out))
