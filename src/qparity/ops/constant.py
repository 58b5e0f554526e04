"""constant: a number the model combines with a tensor (`x * 0.5`, `x + 1`, `1 - x`, `x / 6`), as a quantized
tensor of shape [1, ..., 1] on a grid of its own (qparams.constant_qparams); add, sub and mul then take it as
their second operand, exactly as the runtimes take a constant input tensor. PyTorch's engines take the number
itself instead (add_scalar, mul_scalar: `scalar_operation`), which derive the output grid from x's."""
from __future__ import annotations

import torch

from ..graph import Node, QValue
from ..qparams import QParams


def real_value(node: Node) -> torch.Tensor:
    return torch.full(tuple(node.attrs["shape"]), float(node.attrs["value"]), dtype=torch.float32)


def codes(target, node: Node, qp: QParams) -> torch.Tensor:
    """The constant's codes, by the target's QUANTIZE rule: what the program and the exported files hold."""
    return target.quantize(real_value(node), qp)


def run(ctx, node):
    value = real_value(node)
    return ctx.new_grid(node, [], lambda: value, lambda inputs, out, lo, hi: codes(ctx.target, node, out))


def scalar_operation(ctx, node: Node, op: str, a: QValue, b: QValue, real) -> QValue | None:
    """`x + c` / `x * c` (either order) as the target's scalar kernel where it has one (Target.scalar_grid);
    None for two tensors, or where the target takes the number as a constant tensor."""
    numbers = [i for i, ref in enumerate(node.refs()) if ctx.graph.node(ref).op == "constant"]
    if len(numbers) != 1:
        return None
    value = float(ctx.graph.node(node.refs()[numbers[0]]).attrs["value"])
    x = (a, b)[1 - numbers[0]]
    grid = ctx.target.scalar_grid(op, value, x.qparams)
    if grid is None:
        return None

    def codes(inputs, out, lo, hi):
        return ctx.target.scalar_arithmetic(op, value, inputs[0].codes, inputs[0].qparams, out, lo, hi)

    return ctx.new_grid(node, [x], real, codes, grid=grid)
