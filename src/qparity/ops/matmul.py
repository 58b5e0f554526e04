"""matmul: the matrix product of two activations (Q @ K^T, attention @ V; batch dimensions broadcast), onto
a new grid: the exact int32 accumulator of the centered codes, requantized by the target's rule for it."""
from __future__ import annotations

import torch

from ..errors import UnsupportedOpError

INT32_LIMIT = 1 << 31


def accumulator(qa: torch.Tensor, a, qb: torch.Tensor, b) -> torch.Tensor:
    """sum_k (q_a - z_a)(q_b - z_b): exact in int64, as the runtimes' int32 accumulators (checked not to wrap)."""
    return torch.matmul(qa - int(a.zero_point), qb - int(b.zero_point))


def check_accumulator(ctx, node, a, b, out, depth: int) -> None:
    """Refuse a depth at which the runtime's int32 accumulator (shifted left where its multiplier M >= 1) could
    overflow, before it can wrap in the file."""
    left_shift = int(ctx.target.accumulator_left_shift("matmul", a, b.scale.reshape(1), out).max())
    largest = depth * (a.qmax - a.qmin) * (b.qmax - b.qmin) << left_shift
    if largest >= INT32_LIMIT:
        raise UnsupportedOpError(f"matmul at {node.path} sums {depth} products of codes: the runtime's int32 "
                                 f"accumulator could overflow (bound {largest} >= 2^31); shorten the inner "
                                 "dimension or split the product")


def run(ctx, node, a, b):
    def codes(inputs, out, lo, hi):
        (qa, ga), (qb, gb) = ((v.codes, v.qparams) for v in inputs)
        check_accumulator(ctx, node, ga, gb, out, qa.shape[-1])
        acc = accumulator(qa, ga, qb, gb)
        requantize = ctx.target.matmul_requantizer(ga, gb, out, lo, hi, acc.dim())
        return requantize(acc.to(torch.float64))

    return ctx.new_grid(node, [a, b], lambda: torch.matmul(ctx.dequantize(a), ctx.dequantize(b)), codes)
