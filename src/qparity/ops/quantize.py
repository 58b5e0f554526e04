"""quantize: a float32 value (an aten_float node's) put on a grid of its own by the target's QUANTIZE rule, as
a PT2E graph's quantize_per_tensor after an operator its quantizer left in float32."""
from __future__ import annotations

import torch

from ..errors import UnsupportedOpError
from .registry import refuse_if_target_cannot_run


def run(ctx, node, x):
    if ctx.fake:
        raise UnsupportedOpError(f"quantize at {node.path}: a float32 value read from a PT2E graph is not trained")
    refuse_if_target_cannot_run("quantize", node.path, ctx.target.name)  # a graph handed to another target
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise UnsupportedOpError(f"quantize at {node.path} takes a float32 tensor, got {type(x).__name__}")
    return ctx.new_grid(node, [], None, lambda inputs, out, lo, hi: ctx.target.quantize(x, out).clamp_(lo, hi))
