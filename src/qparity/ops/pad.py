"""pad: F.pad / nn.ZeroPad2d / nn.ConstantPad2d with the value 0, which is the zero point's code: the codes
are padded with the input's zero point, on the input's grid (TFLite's PAD and ONNX's Pad with the zero point,
PyTorch's quantized constant_pad_nd do the same)."""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

from ..graph import QValue


def padding_per_dimension(pad, rank: int) -> List[Tuple[int, int]]:
    """F.pad's flat list (last dimension first: left, right, top, bottom, ...) as (before, after) per dimension,
    first dimension first: what the exporters write."""
    pad = list(pad) + [0] * (2 * rank - len(pad))
    return [(pad[2 * (rank - 1 - d)], pad[2 * (rank - 1 - d) + 1]) for d in range(rank)]


def run(ctx, node, x):
    zero_point = float(x.qparams.zero_point)
    codes = x.codes if ctx.fake else x.codes.to(torch.float32)
    padded = F.pad(codes, tuple(node.attrs["pad"]), value=zero_point)  # keeps channels-last, like PyTorch
    return QValue(padded if ctx.fake else padded.to(torch.int64), x.qparams)
