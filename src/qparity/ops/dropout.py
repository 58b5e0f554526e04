"""dropout: the identity in eval mode and in the integer program; in QAT training, dropout of the dequantized
values requantized on the same grid."""
from __future__ import annotations

import torch.nn.functional as F

READS_NARROW_CODES = True  # the identity outside training


def run(ctx, node, x):
    if not ctx.fake or not ctx.mode.training or node.attrs["p"] == 0:
        return x
    qp = x.qparams
    real = F.dropout(ctx.dequantize(x), node.attrs["p"], True)
    codes = ctx.target.quantize(real.detach(), qp)
    return ctx.emit(codes, real, qp, qp.qmin, qp.qmax)
