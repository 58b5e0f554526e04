"""max_pool2d: the exact window maximum of the codes (the grid is kept)."""
from __future__ import annotations

import torch

from ..graph import QValue
from ..numerics import pooling
from ..qparams import TORCH_DTYPES

READS_NARROW_CODES = True  # any integer dtype: the maximum is taken in float32, exact for every code

def run(ctx, node, x):
    codes = pooling.max_pool2d(x.codes, node.attrs)  # float codes in fake mode: differentiable
    if ctx.fake:
        return QValue(codes, x.qparams)
    # the grid is kept, so the narrow mode stores the codes in its dtype
    return QValue(codes.to(TORCH_DTYPES[x.qparams.dtype] if ctx.narrow else torch.int64), x.qparams)
