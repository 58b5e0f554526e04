"""upsample_nearest: nearest-neighbour upsampling by integer factors (nn.Upsample, F.interpolate), which copies
codes: output[y, x] = input[y // k_h, x // k_w], on the input's grid.

Runtimes compute the source index in float32 (TFLite: floor(y * f(in / out)); PyTorch: likewise; ONNX
Runtime's asymmetric/floor Resize: floor(y / k)); capture accepts a factor only where every output index
maps to y // k under the float32 rule, so all of them copy the same codes.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..graph import QValue


def float32_rule_is_exact(input_size: int, factor: int) -> bool:
    """Whether floor(y * f(in / out)) == y // k for every output index y (no float rounding below an integer)."""
    scale = np.float32(input_size) / np.float32(input_size * factor)
    y = np.arange(input_size * factor, dtype=np.float32)
    return bool(np.array_equal(np.floor(y * scale).astype(np.int64), np.arange(input_size * factor) // factor))


def run(ctx, node, x):
    factors = tuple(node.attrs["scale_factor"])
    codes = x.codes if ctx.fake else x.codes.to(torch.float32)  # exact: codes are small integers
    upsampled = F.interpolate(codes, scale_factor=factors, mode="nearest")  # keeps channels-last, like PyTorch
    return QValue(upsampled if ctx.fake else upsampled.to(torch.int64), x.qparams)
