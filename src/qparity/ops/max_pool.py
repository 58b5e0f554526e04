"""max_pool2d: the exact window maximum of the codes (the grid is kept)."""
from __future__ import annotations

import torch

from ..graph import QValue
from ..numerics import pooling


def run(ctx, node, x):
    codes = pooling.max_pool2d(x.codes, node.attrs)  # float codes in fake mode: differentiable
    return QValue(codes if ctx.fake else codes.to(torch.int64), x.qparams)
