"""input: the model's float inputs quantized with the target's QUANTIZE rule onto an observed grid."""
from __future__ import annotations

import torch

from ..errors import InputError
from ..graph import QValue


def run(ctx, node, x):
    if not ctx.fake:
        return QValue(ctx.target.arrange_input(x), ctx.mode.qparams[node.name])  # IntegerModel.run checked them
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise InputError(f"input '{node.name}' must be a float tensor, got "
                         f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    x = ctx.target.arrange_input(x)
    qp = ctx.mode.observe(node, x)
    codes = ctx.target.quantize(x.detach(), qp)
    return ctx.emit(codes, x.to(torch.float32), qp, qp.qmin, qp.qmax)
