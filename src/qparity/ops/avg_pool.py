"""avg_pool2d (and adaptive pools, spatial means): the target's average of exact window sums, same grid.

An adaptive pool whose output size does not divide the input has windows of differing sizes (PyTorch's
start/end rule, numerics/pooling.py); only targets whose runtime has such a kernel run it."""
from __future__ import annotations

import torch

from ..errors import UnsupportedOpError
from ..graph import QValue
from ..numerics import TARGETS, get_target
from ..numerics import pooling
from .surrogates import straight_through


# Narrow codes go to the targets whose average_pool takes them (Target.average_pool_takes_narrow_codes): at batch 32
# the bench model's global pool made two int64 copies of its input (2 MiB), the integer run's peak tensor memory.
READS_NARROW_CODES = True


def run(ctx, node, x):
    attrs = ctx.average_pool_attrs(node, x.codes.shape[-2:])
    refuse_uneven_windows(ctx.target, attrs)
    codes = x.codes.detach()
    if ctx.fake or not ctx.target.average_pool_takes_narrow_codes:
        codes = codes.to(torch.int64)
    codes = ctx.target.average_pool(codes, x.qparams, attrs)
    if not ctx.fake:
        return QValue(codes, x.qparams)
    sums, counts = pooling.window_sums_and_counts(x.codes, float(x.qparams.zero_point), attrs)
    surrogate = (sums / counts + float(x.qparams.zero_point)).to(torch.float32)
    return QValue(straight_through(codes, surrogate), x.qparams)


def refuse_uneven_windows(target, attrs: dict) -> None:
    """Raise UnsupportedOpError for an adaptive pool with windows of differing sizes on a target without a kernel."""
    if "uneven_output_size" in attrs and not target.uneven_adaptive_pool:
        raise UnsupportedOpError(
            f"adaptive_avg_pool2d to {tuple(attrs['uneven_output_size'])} cannot run on target {target.name!r}: the "
            "output size does not divide the input, so the windows differ in size, and its runtime has no kernel "
            f"for that (only uniform windows); targets that run it: "
            f"{', '.join(t for t in TARGETS if get_target(t).uneven_adaptive_pool)}; or use an output size that "
            "divides the input")
