"""sub: the elementwise difference a - b of two tensors on their own grids (broadcasting), onto a new grid, by
the target's subtract."""
from __future__ import annotations


def run(ctx, node, a, b):
    def codes(inputs, out, lo, hi):
        (qa, ga), (qb, gb) = ((v.codes, v.qparams) for v in inputs)
        return ctx.target.subtract(qa, ga, qb, gb, out, lo, hi)

    return ctx.new_grid(node, [a, b], lambda: ctx.dequantize(a) - ctx.dequantize(b), codes)
