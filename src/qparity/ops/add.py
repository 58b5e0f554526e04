"""add: the elementwise sum of two tensors on their own grids (broadcasting), onto a new grid, by the target's add."""
from __future__ import annotations

from . import constant


def run(ctx, node, a, b):
    target = ctx.target
    scalar = constant.scalar_operation(ctx, node, "add", a, b, lambda: ctx.dequantize(a) + ctx.dequantize(b))
    if scalar is not None:
        return scalar

    def codes(inputs, out, lo, hi):
        (qa, ga), (qb, gb) = ((v.codes, v.qparams) for v in inputs)
        return target.add(qa, ga, qb, gb, out, lo, hi)

    table = None
    if target.elementwise_add(a.codes.shape, b.codes.shape):
        table = "pair_terms" if target.add_from_code_terms else "pair"
    return ctx.new_grid(node, [a, b], lambda: ctx.dequantize(a) + ctx.dequantize(b), codes, table)
