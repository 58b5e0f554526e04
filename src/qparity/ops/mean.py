"""mean: the average over some dimensions of one tensor (token mean pooling, LayerNorm's statistics), onto a
new grid by the target's mean of exact centered sums. Means over (H, W) of NCHW tensors stay avg_pool2d."""
from __future__ import annotations


def run(ctx, node, x):
    dims, keepdim = tuple(node.attrs["dims"]), bool(node.attrs["keepdim"])

    def codes(inputs, out, lo, hi):
        return ctx.target.mean(inputs[0].codes, inputs[0].qparams, out, dims, keepdim).clamp_(lo, hi)

    return ctx.new_grid(node, [x], lambda: ctx.dequantize(x).mean(dims, keepdim=keepdim), codes)
