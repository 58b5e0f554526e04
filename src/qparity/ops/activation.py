"""Elementwise activations of one code (sigmoid, tanh, hardsigmoid, leaky_relu, gelu, elu), onto a new grid.

The integer kernel is the target's table (numerics/activations.py, Target.activation_table), which both
modes gather from; QAT differentiates the float function of the dequantized input.
"""
from __future__ import annotations

from ..numerics.activations import real_function


def run(ctx, node, x):
    kind, attrs = node.op, dict(node.attrs)
    function = real_function(kind, attrs)

    def codes(inputs, out, lo, hi):
        return ctx.target.activation(kind, inputs[0].codes, inputs[0].qparams, out, attrs)

    return ctx.new_grid(node, [x], lambda: function(ctx.dequantize(x)), codes)
