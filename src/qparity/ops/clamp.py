"""clamp (a ReLU, ReLU6, Hardtanh or clamp not fused into the layer before it): a clamp of the codes."""
from __future__ import annotations

from ..graph import QValue
from .surrogates import clamp


def run(ctx, node, x):
    lo, hi = ctx.target.activation_bounds(node.attrs.get("min"), node.attrs.get("max"), x.qparams)
    return QValue(ctx.target.clamp_codes(x.codes, lo, hi, clamp), x.qparams)
