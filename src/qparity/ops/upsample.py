"""upsample_nearest and upsample_bilinear (nn.Upsample, F.interpolate), on the input's grid.

upsample_nearest upsamples by integer factors, which copies codes: output[y, x] = input[y // k_h, x // k_w].
upsample_bilinear resizes to any size with the target's integer interpolation (numerics/resampling.py).

Runtimes compute the source index in float32 (TFLite: floor(y * f(in / out)); PyTorch: likewise; ONNX
Runtime's asymmetric/floor Resize: floor(y / k)); capture accepts a factor only where every output index
maps to y // k under the float32 rule, so all of them copy the same codes.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..graph import QValue
from .surrogates import straight_through


def float32_rule_is_exact(input_size: int, factor: int) -> bool:
    """Whether floor(y * f(in / out)) == y // k for every output index y (no float rounding below an integer)."""
    scale = np.float32(input_size) / np.float32(input_size * factor)
    y = np.arange(input_size * factor, dtype=np.float32)
    return bool(np.array_equal(np.floor(y * scale).astype(np.int64), np.arange(input_size * factor) // factor))


def run(ctx, node, x):
    if node.op == "upsample_bilinear":
        return bilinear(ctx, node, x)
    factors = tuple(node.attrs["scale_factor"])
    codes = x.codes if ctx.fake else x.codes.to(torch.float32)  # exact: codes are small integers
    upsampled = F.interpolate(codes, scale_factor=factors, mode="nearest")  # keeps channels-last, like PyTorch
    return QValue(upsampled if ctx.fake else upsampled.to(torch.int64), x.qparams)


def bilinear(ctx, node, x):
    out_hw, align_corners = tuple(node.attrs["size"]), node.attrs["align_corners"]
    codes = ctx.target.bilinear(x.codes.detach().to(torch.int64), x.qparams, out_hw, align_corners)
    if not ctx.fake:
        return QValue(codes, x.qparams)
    surrogate = F.interpolate(x.codes, size=out_hw, mode="bilinear", align_corners=align_corners)
    return QValue(straight_through(codes, surrogate), x.qparams)
