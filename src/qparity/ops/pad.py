"""pad: F.pad / nn.ZeroPad2d / nn.ConstantPad2d with the value 0, which is the zero point's code: the codes
are padded with the input's zero point, on the input's grid (TFLite's PAD and ONNX's Pad with the zero point,
PyTorch's quantized constant_pad_nd do the same)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..graph import QValue


def run(ctx, node, x):
    zero_point = float(x.qparams.zero_point)
    codes = x.codes if ctx.fake else x.codes.to(torch.float32)
    padded = F.pad(codes, tuple(node.attrs["pad"]), value=zero_point)  # keeps channels-last, like PyTorch
    return QValue(padded if ctx.fake else padded.to(torch.int64), x.qparams)
