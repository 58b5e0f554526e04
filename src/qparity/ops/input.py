"""input: the model's float inputs quantized with the target's QUANTIZE rule onto an observed grid."""
from __future__ import annotations

import torch

from ..errors import InputError
from ..graph import QValue


def require_float_input(node, x) -> None:
    """Refuse what no code represents, in the fake forward and the integer model alike (one check per input):
    a non-float tensor, NaN or an infinity (which would also poison the input's observer)."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"input '{node.name}' must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"input '{node.name}' must be a float tensor, got {x.dtype}; integer codes go to "
                         "IntegerModel.run()")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"input '{node.name}' has {bad} NaN or infinite value(s); no integer code represents them")


def run(ctx, node, x):
    if not ctx.fake:
        return QValue(ctx.target.arrange_input(x), ctx.mode.qparams[node.name])  # IntegerModel.run checked them
    require_float_input(node, x)
    x = ctx.target.arrange_input(x)
    qp = ctx.mode.observe(node, x)
    codes = ctx.target.quantize(x.detach(), qp)
    return ctx.emit(codes, x.to(torch.float32), qp, qp.qmin, qp.qmax)
