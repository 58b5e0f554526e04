"""amax: the maximum of the codes over dimensions (torch.amax), on the input's grid.

The maximum commutes with every grid's monotone dequantization, so each runtime's reduce-max kernel
(TFLite REDUCE_MAX, ONNX ReduceMax on the codes, PyTorch's quantized max over a dim) returns these codes.
"""
from __future__ import annotations

import torch

from ..graph import QValue


def run(ctx, node, x):
    codes = torch.amax(x.codes, dim=tuple(node.attrs["dim"]), keepdim=node.attrs["keepdim"])  # fake: differentiable
    return QValue(codes if ctx.fake else codes.to(torch.int64), x.qparams)
