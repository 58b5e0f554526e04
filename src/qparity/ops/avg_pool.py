"""avg_pool2d (and adaptive pools, spatial means): the target's average of exact window sums, same grid."""
from __future__ import annotations

import torch

from ..graph import QValue
from ..numerics import pooling
from .surrogates import straight_through


def run(ctx, node, x):
    attrs = ctx.average_pool_attrs(node, x.codes.shape[-2:])
    codes = ctx.target.average_pool(x.codes.detach().to(torch.int64), x.qparams, attrs)
    if not ctx.fake:
        return QValue(codes, x.qparams)
    sums, counts = pooling.window_sums_and_counts(x.codes, float(x.qparams.zero_point), attrs)
    surrogate = (sums / counts + float(x.qparams.zero_point)).to(torch.float32)
    return QValue(straight_through(codes, surrogate), x.qparams)
