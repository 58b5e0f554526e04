"""rsqrt: 1 / sqrt(x) of a nonnegative tensor (a normalization's mean of squares plus epsilon), onto a new grid by
the target's table of every input code (numerics/rsqrt.py)."""
from __future__ import annotations

import torch


def run(ctx, node, x):
    def codes(inputs, out, lo, hi):
        return ctx.target.activation("rsqrt", inputs[0].codes, inputs[0].qparams, out, {})

    # The code of real 0 runs as the output grid's top code; the surrogate floors its input at half a step so
    # that the observer sees a finite value there too.
    floor = float(x.qparams.scale) / 2
    return ctx.new_grid(node, [x], lambda: torch.rsqrt(ctx.dequantize(x).clamp(min=floor)), codes)
