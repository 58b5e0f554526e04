"""add: the elementwise sum of two tensors on their own grids (broadcasting), onto a new grid, by the target's add."""
from __future__ import annotations

from . import constant

# new_grid hands its kernel int64 codes; its tables (the integer runtime's) take narrow codes as they come.
READS_NARROW_CODES = True


def run(ctx, node, a, b):
    target = ctx.target
    scalar = constant.scalar_operation(ctx, node, "add", a, b, lambda: ctx.dequantize(a) + ctx.dequantize(b))
    if scalar is not None:
        return scalar

    table, add, rule = None, target.add, None
    if target.elementwise_add(a.codes.shape, b.codes.shape):
        # What the table tabulates (on a column and a row of codes for "pair_terms"); `add` itself here. Its
        # compiled loop, where the target has one, replaces the table inside compiled_kernels().
        table, add = "pair_terms" if target.add_from_code_terms else "pair", target.add_elementwise
        rule = lambda out, lo, hi: target.add_rule(a.qparams, b.qparams, out, lo, hi)  # noqa: E731

    def codes(inputs, out, lo, hi):
        (qa, ga), (qb, gb) = ((v.codes, v.qparams) for v in inputs)
        return add(qa, ga, qb, gb, out, lo, hi)

    return ctx.new_grid(node, [a, b], lambda: ctx.dequantize(a) + ctx.dequantize(b), codes, table,
                        float_codes=target.add_takes_float_codes, rule=rule)
