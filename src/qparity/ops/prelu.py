"""prelu: x, or a * x below zero, with the learned slope a per channel (dim 1) or per tensor, on its int8 grid
(numerics/prelu.py), onto a new grid by the target's prelu.

The prepared model takes the slope codes from the user's nn.PReLU through a straight-through estimator;
the IntegerModel from the node's `slope_codes` / `slope_scale`, which convert writes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..numerics.target import channel_view


def run(ctx, node, x):
    slope, slope_scale = ctx.mode.slope(node)  # float32 codes (fake mode: with the slope's gradient)
    ndim = x.codes.dim()
    per_element = channel_view(slope.detach().to(torch.int64), ndim, 1 if ndim > 1 else 0) if slope.numel() > 1 \
        else slope.detach().to(torch.int64).reshape(())

    def codes(inputs, out, lo, hi):
        return ctx.target.prelu(inputs[0].codes, inputs[0].qparams, per_element, slope_scale, out).clamp_(lo, hi)

    return ctx.new_grid(node, [x], lambda: F.prelu(ctx.dequantize(x), slope * slope_scale), codes)
