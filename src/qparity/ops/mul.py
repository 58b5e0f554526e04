"""mul: the elementwise product of two tensors on their own grids (broadcasting, e.g. squeeze-excite's
x * gate), onto a new grid, by the target's multiply."""
from __future__ import annotations

from . import constant


def run(ctx, node, a, b):
    scalar = constant.scalar_operation(ctx, node, "mul", a, b, lambda: ctx.dequantize(a) * ctx.dequantize(b))
    if scalar is not None:
        return scalar

    def codes(inputs, out, lo, hi):
        (qa, ga), (qb, gb) = ((v.codes, v.qparams) for v in inputs)
        return ctx.target.multiply(qa, ga, qb, gb, out, lo, hi)

    return ctx.new_grid(node, [a, b], lambda: ctx.dequantize(a) * ctx.dequantize(b), codes)
